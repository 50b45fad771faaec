"""The core's own plugin: split protocols, metrics and prompt strategies.

Registered through the same hooks as every other plugin, so ``stbench list`` shows them with their
provenance and a third party can add more the same way. Functions are named lazily
(``"module:attribute"``), so listing them imports neither numpy nor the modules that compute them.
"""

from stbench import hookimpl
from stbench.specs import MetricSpec, PromptSpec, SplitSpec

_PER_SLIDE_GENE_MEAN = "per gene per slide, mean over genes (constant genes skipped), then mean over slides"
_PER_SLIDE_ELEMENT_MEAN = "mean over spots and genes per slide, then mean over slides"
_TOP_K = (10, 50, 200)
_PROMPT_NOTE = "parameters are the project's inference, METHODS.md AMB-27"


def split_specs() -> list[SplitSpec]:
    s = "stbench.splits:"
    return [
        SplitSpec("leave_one_patient_out", s + "leave_one_patient_out", unit="patient", params=s + "PatientParams",
                  description="one fold per patient; one other patient validates"),
        SplitSpec("patient_kfold", s + "patient_kfold", unit="patient", params=s + "KFoldParams",
                  description="patients shuffled (seeded) into k groups; one training patient validates"),
        SplitSpec("leave_one_section_out", s + "leave_one_section_out", unit="section", params=s + "SectionParams",
                  description="one fold per section; sections of one patient are not independent"),
        SplitSpec("random_slide", s + "random_slide", unit="slide-random", params=s + "RandomSlideParams",
                  description="HyperST-like: 5 seeded 80/10/10 shuffles by slide (test sets may overlap; "
                              "not HyperST's own splits)"),
    ]


def file_split_spec() -> SplitSpec:
    """``split: file``: folds read from JSON files (not computed, so not seeded)."""
    s = "stbench.splits:"
    return SplitSpec("file", s + "file_split", unit="file", params=s + "FileSplitParams",
                     description="folds read from JSON files (split_params.path), e.g. HyperST's published splits")


def metric_specs() -> list[MetricSpec]:
    """The metrics the harness reports (METHODS.md §2; headline = ``pcc``)."""
    m = "stbench.metrics:"
    specs = [
        MetricSpec("pcc", m + "pcc", True, _PER_SLIDE_GENE_MEAN, undefined_for_constant=True,
                   description="Pearson r per gene across a slide's spots (headline metric)"),
        MetricSpec("ccc", m + "ccc", True, _PER_SLIDE_GENE_MEAN,
                   description="Lin's concordance correlation per gene, n-1 variances (as torchmetrics)"),
        MetricSpec("mae", m + "mae", False, _PER_SLIDE_ELEMENT_MEAN, description="mean absolute error"),
        MetricSpec("mse", m + "mse", False, _PER_SLIDE_ELEMENT_MEAN, description="mean squared error"),
        MetricSpec("rvd", m + "rvd", False, _PER_SLIDE_GENE_MEAN,
                   description="relative variance distance, Stem: (var_p - var_t)^2 / var_t^2, population variances"),
        MetricSpec("rvd_triplex", m + "rvd_triplex", False, _PER_SLIDE_GENE_MEAN,
                   description="relative variance distance, TRIPLEX RVDMetric: ((var_p - var_t) / (var_t + 0.01))^2"),
        MetricSpec("pcc_pooled", m + "pcc_pooled", True,
                   "per gene over the fold's test spots pooled across slides, mean over genes (constant genes skipped)",
                   level="fold", undefined_for_constant=True,
                   description="Pearson r per gene on all test spots of the fold pooled"),
    ]
    for k in _TOP_K:
        specs.append(MetricSpec(
            f"pcc@{k}_posthoc", f"{m}pcc_at_{k}_posthoc", True,
            f"per gene over the fold's pooled test spots (constant predictions and undefined genes = 0), mean of the {k} highest",
            level="fold", undefined_for_constant=True,
            description=f"HyperST/Stem PCC@{k}: genes ranked by their own test PCC: post hoc, not a leaderboard metric"))
    for k in _TOP_K:
        specs.append(MetricSpec(
            f"pcc@{k}_train", f"{m}pcc_at_{k}_train", True,
            f"per gene per slide on the {k} selected genes, mean over genes (constant genes skipped), then mean over slides",
            level="fold", undefined_for_constant=True,
            description=f"PCC over the top-{k} genes by training mean expression, chosen from training slides only"))
    return specs


def prompt_specs() -> list[PromptSpec]:
    """The four built-in strategies of METHODS.md §9.2."""
    p = "stbench.prompts:"
    return [
        PromptSpec("random", p + "random_prompts", f"uniform random spots without replacement ({_PROMPT_NOTE})",
                   nested_by_subset=True),
        PromptSpec("poisson_disc", p + "poisson_disc_prompts",
                   f"blue-noise spots with a bisected minimum pairwise distance ({_PROMPT_NOTE})"),
        PromptSpec("sparse_square", p + "sparse_square_prompts",
                   f"four square windows, one per median quadrant, n/4 spots each ({_PROMPT_NOTE})"),
        PromptSpec("dense_square", p + "dense_square_prompts",
                   f"one contiguous square window of n spots at a random position ({_PROMPT_NOTE})"),
    ]


@hookimpl
def stbench_register_splits(register):
    for spec in [*split_specs(), file_split_spec()]:
        register(spec)


@hookimpl
def stbench_register_metrics(register):
    for spec in metric_specs():
        register(spec)


@hookimpl
def stbench_register_prompts(register):
    for spec in prompt_specs():
        register(spec)
