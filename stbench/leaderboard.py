"""Leaderboard tables generated from run directories (never edited by hand).

Aggregation, stated in every table's header: a slide-level metric is averaged over the test slides of a
fold (unweighted), then reported as mean ± sample standard deviation (ddof = 1) over folds. A slide
where a metric is undefined (fewer than two scored spots, every gene constant) is left out of that mean
but counted: every number says how many slides and folds it used, and rows with fewer are flagged. A
constant prediction is not undefined: it scores PCC 0 (:mod:`stbench.metrics`). Fold-level metrics (pooled PCC, PCC@k) are mean ± std
over folds directly. Post hoc metrics (genes chosen by their test score) are kept off by default.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.errors import ConfigError

#: the columns of a leaderboard by default: (column in the results, header label)
DEFAULT_COLUMNS = [
    ("pcc", "PCC"),
    ("pcc_all", "PCC (all spots)"),
    ("ccc", "CCC"),
    ("mae", "MAE"),
    ("mse", "MSE"),
    ("rvd", "RVD"),
    ("pcc_pooled", "PCC pooled"),
    ("pcc@50_train", "PCC@50 (train-chosen)"),
]
#: the headline columns, printed on a terminal (files get DEFAULT_COLUMNS)
COMPACT_COLUMNS = [
    ("pcc", "PCC"),
    ("pcc_all", "PCC all spots"),
    ("mae", "MAE"),
    ("pcc@50_train", "PCC@50 train"),
]
FORMATS = ("md", "csv", "latex", "html")


def _read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    needed = ["results.csv", "fold_results.csv", "run.json"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise ConfigError(f"{run_dir} is not a finished stbench run directory (missing {', '.join(missing)}); pass the --out folder of a run")
    versions = json.loads((run_dir / "versions.json").read_text()) if (run_dir / "versions.json").exists() else {}
    return {
        "dir": run_dir,
        "results": _read_rows(run_dir / "results.csv"),
        "folds": _read_rows(run_dir / "fold_results.csv"),
        "run": json.loads((run_dir / "run.json").read_text()),
        "versions": versions,
        "prompts": json.loads((run_dir / "prompts.json").read_text()) if (run_dir / "prompts.json").exists() else {},
    }


def _read_rows(path: Path) -> list[dict]:
    """CSV rows (plain csv, no pandas: ``stbench run`` prints a table at its end and stays fast)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _number(text) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _higher_is_better(plugins, column: str) -> Optional[bool]:
    base = column[:-4] if column.endswith("_all") else column
    if base in plugins.metrics:
        return plugins.metrics.get(base).higher_is_better
    return None


def _column_stats(res: list[dict], folds: list[dict], col: str) -> dict:
    """Mean ± std over folds of one column of one method's rows, with how many slides and folds it used.

    A slide-level column is averaged over the slides of each fold where it is defined, then over the
    folds where it is defined on at least one slide. Slides where it is undefined are counted, never
    silently dropped: the caller flags numbers that used fewer slides than the row has.
    """
    if res and col in res[0]:
        by_fold: dict[str, list[float]] = {}
        for r in res:
            value = _number(r[col])
            if not math.isnan(value):
                by_fold.setdefault(r["fold"], []).append(value)
        per_fold = np.array([np.mean(v) for v in by_fold.values()])
        n_slides = sum(len(v) for v in by_fold.values())
    else:
        values = [_number(r.get(col)) for r in folds]
        per_fold = np.array([v for v in values if not math.isnan(v)])
        n_slides = None  # a fold-level metric uses every test slide of the folds it is defined on
    return {"mean": float(per_fold.mean()) if per_fold.size else math.nan,
            "std": float(per_fold.std(ddof=1)) if per_fold.size > 1 else math.nan,
            "folds": int(per_fold.size), "slides": n_slides}


def summary_rows(run_dirs: list[Path], columns=None) -> tuple[list[dict], dict]:
    """Mean and std over folds per method and metric: one dict per table row, and the protocol.

    Per row: ``folds`` and ``slides`` (how many the method was scored on), and per column
    ``COL:mean``, ``COL:std``, ``COL:folds`` and ``COL:slides`` (how many that number used).
    ``missing`` counts the columns whose number used fewer slides or folds than the row has: such a
    row is flagged in every table, so a method cannot drop the slides it scores badly on unnoticed.
    A column that is undefined everywhere (the correlations of a constant predictor) is "undefined",
    not missing.
    """
    runs = [_read_run(d) for d in run_dirs]
    protocol = runs[0]["run"]["protocol"]
    for other in runs[1:]:
        if other["run"]["protocol"] != protocol:
            raise ConfigError(f"runs {runs[0]['dir']} and {other['dir']} used different protocols; a leaderboard compares one protocol")
        if other["run"].get("folds") != runs[0]["run"].get("folds"):
            raise ConfigError(f"runs {runs[0]['dir']} and {other['dir']} used different folds; a leaderboard compares the same test sets")
    columns = columns or DEFAULT_COLUMNS
    rows = []
    configs: dict[str, list[dict]] = {}  # method -> the hyperparameters of each of its rows
    sweep = _sweep_ratios(runs)
    headline = None
    if sweep:  # a prompt-ratio sweep: the main table at the benchmark's ratio (else the largest)
        stated = float((protocol.get("prompt") or {}).get("ratio", sweep[-1]))
        headline = stated if stated in sweep else sweep[-1]
    for run in runs:
        for method in dict.fromkeys(r["method"] for r in run["results"]):
            res = [r for r in run["results"] if r["method"] == method and _at(r, headline)]
            folds = [r for r in run["folds"] if r["method"] == method and _at(r, headline)]
            config = run["run"].get("methods", {}).get(method, {})
            if config in configs.get(method, []):
                raise ConfigError(f"method {method} with the same settings appears in more than one run directory")
            configs.setdefault(method, []).append(config)
            n_folds, n_slides = len({r["fold"] for r in res}), len(res)
            row = {"method": method, "folds": n_folds, "slides": n_slides, "config": config, "missing": 0,
                   # per test slide, for the paired comparisons (stbench.significance); not a table column
                   "_per_slide": {col: {(r["fold"], r["slide"]): _number(r[col]) for r in res}
                                  for col, _ in columns if res and col in res[0]}}
            for col, _ in columns:
                st = _column_stats(res, folds, col)
                row.update({f"{col}:{k}": v for k, v in st.items()})
                short = st["folds"] < n_folds or (st["slides"] is not None and st["slides"] < n_slides)
                if st["folds"] > 0 and short:
                    row["missing"] += 1
            if res and "pcc_skipped" in res[0]:
                row["pcc_skipped"] = float(np.mean([_number(r["pcc_skipped"]) for r in res]))
            rows.append(row)
    # a method that appears with several settings (ablations) is labelled by how each row differs
    # from its first appearance (the reference, e.g. the full model)
    for row in rows:
        reference = configs[row["method"]][0]
        keys = sorted(k for k in row["config"] if row["config"].get(k) != reference.get(k))
        if keys:
            differing = ", ".join(f"{k}={row['config'][k]}" for k in keys)
            row["method"] = f"{row['method']} ({differing})"
    encoders = {json.dumps(r["run"].get("encoder"), sort_keys=True) for r in runs if r["run"].get("encoder")}
    if len(encoders) > 1:
        raise ConfigError("the runs used different image encoders; a leaderboard compares one feature set")
    meta = {"protocol": protocol, "versions": runs[0]["versions"], "runs": [str(r["dir"]) for r in runs],
            "encoder": json.loads(encoders.pop()) if encoders else None, "configs": configs}
    if sweep:
        meta["sweep"] = {"ratios": sweep, "headline": headline, "table": sweep_table(runs, sweep, rows),
                         "nested": all(r["prompts"].get("nested", False) for r in runs),
                         "strategy": (protocol.get("prompt") or {}).get("strategy")}
    for row in rows:
        del row["config"]
    return rows, meta


def published_for(run_dirs: list[Path]):
    """The published numbers of the runs' benchmark (``--published``); a one-line error when it has none."""
    from stbench import published

    name = _read_run(Path(run_dirs[0]))["run"]["protocol"].get("benchmark")
    found = published.for_benchmark(name) if name else None
    if found is None:
        raise ConfigError(f"benchmark {name} ships no {published.FILE} beside its definition; drop --published "
                          "or add the file (see benchmarks/stbench_benchmarks/her2/published.yaml)")
    return found


def columns_with(published=None) -> list:
    """The table's columns: :data:`DEFAULT_COLUMNS`, plus any metric the published numbers report that
    the defaults leave out (e.g. HyperST's post hoc PCC@k), labelled as such."""
    columns = list(DEFAULT_COLUMNS)
    if published is not None:
        have = {c for c, _ in columns}
        for ours in published.columns():
            if ours not in have:
                label = ours.replace("_posthoc", " (post hoc)").replace("pcc", "PCC").replace("mse", "MSE").replace("mae", "MAE")
                columns.append((ours, label))
                have.add(ours)
    return columns


def _sweep_ratios(runs: list[dict]) -> list[float]:
    """The prompt ratios of a sweep run (results have a ``prompt_ratio`` column), else []."""
    ratios = {float(r["prompt_ratio"]) for run in runs for r in run["results"] if r.get("prompt_ratio") not in (None, "")}
    return sorted(ratios)


def _at(row: dict, ratio: Optional[float]) -> bool:
    return ratio is None or float(row.get("prompt_ratio") or "nan") == ratio


#: the metrics of the sweep table: (column, label)
SWEEP_COLUMNS = [("pcc", "PCC"), ("mae", "MAE")]


def sweep_table(runs: list[dict], ratios: list[float], rows: list[dict]) -> dict:
    """Per table row (label as in the main table), per metric and ratio: mean, std, folds, slides.
    Every ratio is scored on the same spots (those prompted at none), so the columns compare."""
    out: dict = {}
    labels = iter([r["method"] for r in rows])
    for run in runs:
        for method in dict.fromkeys(r["method"] for r in run["results"]):
            label = next(labels)
            for col, _ in SWEEP_COLUMNS:
                for ratio in ratios:
                    res = [r for r in run["results"] if r["method"] == method and _at(r, ratio)]
                    folds = [r for r in run["folds"] if r["method"] == method and _at(r, ratio)]
                    out.setdefault(label, {}).setdefault(col, {})[ratio] = _column_stats(res, folds, col)
    return out


#: protocol keys that only name or describe a benchmark: a study labels runs by the others
_DESCRIPTIVE = {"benchmark", "version", "description", "caveats", "preset", "dataset_options"}


STUDY_COLUMNS = [("pcc", "PCC"), ("pcc_all", "PCC (all spots)"), ("mae", "MAE"), ("mae_all", "MAE (all spots)"),
                 ("ccc", "CCC")]


def render_study(run_dirs: list[Path], plugins, fmt: str = "md") -> str:
    """A protocol study: the same methods under several protocols, one run directory per protocol.

    Unlike a leaderboard (one protocol), the runs may differ in their protocol: each row is labelled by
    the protocol settings that differ from the first run (the reference, e.g. the honest default), and
    by LEAKY where a source's choice lets test data into training or selection. The folds must be the
    same (the same test sections), so the rows compare slide sets; the numbers of different protocols
    are different quantities, which is the point of the table."""
    if fmt not in ("md", "csv"):
        raise ConfigError(f"a protocol study is written as md or csv, not {fmt!r} (option --format)")
    from tabulate import tabulate

    from stbench import config as cfg

    runs = [_read_run(Path(d)) for d in run_dirs]
    ref = cfg.flatten(runs[0]["run"]["protocol"])
    tests = {json.dumps([f.get("test") if isinstance(f, dict) else f for f in r["run"].get("folds") or []]) for r in runs}
    if len(tests) > 1:
        raise ConfigError("the runs of a protocol study must test the same sections in the same folds")
    body, records = [], []
    for run in runs:
        flat = cfg.flatten(run["run"]["protocol"])
        diff = [f"{k}={flat.get(k)}" for k in sorted(set(flat) | set(ref))
                if k.split(".")[0] not in _DESCRIPTIVE and flat.get(k) != ref.get(k)]
        preset = run["run"]["protocol"].get("preset")
        if preset != runs[0]["run"]["protocol"].get("preset"):  # other model settings: name the preset
            diff.append(f"preset {str(preset).split(' ', 1)[0]}")
        label = ", ".join(diff) or "reference protocol"
        leaky = "LEAKY" if leaky_choices(run["run"]["protocol"]) else ""
        rows, _ = summary_rows([run["dir"]], STUDY_COLUMNS)
        for row in rows:
            cells = [row["method"], label, leaky, int(row["folds"]), int(row["slides"])] + [_cell(row, c) for c, _ in STUDY_COLUMNS]
            body.append(cells)
            records.append({"method": row["method"], "protocol": label, "leaky": bool(leaky), "run": str(run["dir"]),
                            **{k: v for k, v in row.items() if ":" in k and k.split(":")[0] in dict(STUDY_COLUMNS)}})
    labels = ["method", "protocol (differs from the first row's)", "", "folds", "slides"] + [lbl for _, lbl in STUDY_COLUMNS]
    p = runs[0]["run"]["protocol"]
    head = (f"stbench protocol study: the same methods under the protocols of the sources, one choice at a time "
            f"(reference: benchmark {p.get('benchmark')}, normalisation {p.get('normalisation')}, "
            f"smoothing {p.get('smoothing', 'none')}, selection {p.get('selection', 'inner_val')}, split {p.get('split')}). "
            "Rows measure different quantities (other targets, other scored spots): read them as what each choice "
            "does to a number, never as a ranking; a study table is never mixed into the main boards. "
            f"Generated {_dt.date.today().isoformat()} from {len(runs)} run directories.")
    notes = [f"LEAKY rows: {'; '.join(sorted({c for r in runs for c in leaky_choices(r['run']['protocol'])}))}."]
    if fmt == "csv":
        return f"# {head}\n" + "".join(f"# {n}\n" for n in notes) + _csv_table(records)
    return (f"{head}\n\n" + tabulate(body, headers=labels, tablefmt="github", disable_numparse=True) + "\n"
            + "".join(f"\n{n}\n" for n in notes))


def summarise(run_dirs: list[Path], columns=None):
    """:func:`summary_rows` as a pandas DataFrame (for notebooks and tests), and the protocol."""
    import pandas as pd

    rows, meta = summary_rows(run_dirs, columns)
    return pd.DataFrame(rows), meta


def _best_row(rows: list[dict], plugins, metric: str) -> Optional[dict]:
    defined = [r for r in rows if not math.isnan(r.get(f"{metric}:mean", math.nan))]
    if not defined:
        return None
    sign = -1.0 if _higher_is_better(plugins, metric) is False else 1.0
    return max(defined, key=lambda r: sign * r[f"{metric}:mean"])


def add_significance(rows: list[dict], plugins, metric: str = "pcc", baseline: Optional[str] = None) -> list[str]:
    """Compare every row with the best row and with ``baseline`` (a row's label) slide by slide
    (:mod:`stbench.significance`); adds ``vs_best:*`` and ``vs_baseline:*`` entries to the rows and
    returns the lines that explain them (the reference rows, the tests, and whether any difference can
    be significant with this many slides)."""
    from stbench import significance as sig

    if not rows or f"{metric}:mean" not in rows[0]:
        raise ConfigError(f"metric {metric!r} is not a column of these runs (option --significance-metric)")
    best = _best_row(rows, plugins, metric)
    if best is None:
        return [f"No paired comparison: {metric} is undefined for every row."]
    references = [("best", best)]
    if baseline is not None:
        named = [r for r in rows if r["method"] == baseline]
        if not named:
            raise ConfigError(f"--baseline {baseline!r} is not a row of this leaderboard; choose one of "
                              + ", ".join(r["method"] for r in rows))
        references.append(("baseline", named[0]))
    reachable = True
    for row in rows:
        for key, ref in references:
            if row is ref:
                row[f"vs_{key}:reference"] = True
                continue
            c = sig.compare(row["_per_slide"].get(metric, {}), ref["_per_slide"].get(metric, {}))
            if c is None:
                continue
            row.update({f"vs_{key}:delta": c.mean_diff, f"vs_{key}:ci_low": c.ci_low, f"vs_{key}:ci_high": c.ci_high,
                        f"vs_{key}:n": c.n, f"vs_{key}:p": c.p})
            if key == "best":
                reachable = reachable and sig.can_reach(c.n)
    ns = sorted({r[f"vs_{k}:n"] for r in rows for k, _ in references if f"vs_{k}:n" in r})
    if not ns:
        return [f"No paired comparison on {metric}: no other row shares two or more scored slides with {best['method']}."]
    if reachable:
        for row in rows:
            if row is not best and "vs_best:p" in row:
                row["vs_best:indistinguishable"] = row["vs_best:p"] >= sig.ALPHA
    lines = [f"Paired comparison on {metric} over test slides: Δ = row − reference, per-slide differences over "
             f"the slides both rows were scored on (n); p from the two-sided Wilcoxon signed-rank test (exact "
             f"for small n); 95 % CI of the mean Δ from a percentile bootstrap over slides ({sig.N_RESAMPLES:,} "
             f"resamples, seed {sig.SEED}). Reference rows: best = {best['method']}"
             + (f", baseline = {references[1][1]['method']}" if len(references) > 1 else "") + "."]
    if not reachable:
        n = min(ns) if ns else 0
        lines.append(f"With {n} paired slides the smallest two-sided exact p is {sig.smallest_p(n):.4g} > "
                     f"{sig.ALPHA}: no row can be shown to differ from the best, so none is marked.")
    else:
        lines.append(f"≈ marks rows not distinguishable from the best (p ≥ {sig.ALPHA}).")
    return lines


def _comparison_cell(row: dict, key: str) -> str:
    if row.get(f"vs_{key}:reference"):
        return f"({key})"
    if f"vs_{key}:n" not in row:
        return "-"  # fewer than two slides pair up (e.g. a metric undefined for the row)
    mark = " ≈" if row.get(f"vs_{key}:indistinguishable") else ""
    return (f"{row[f'vs_{key}:delta']:+.3f} [{row[f'vs_{key}:ci_low']:+.3f}, {row[f'vs_{key}:ci_high']:+.3f}]"
            f" n={int(row[f'vs_{key}:n'])} p={row[f'vs_{key}:p']:.3g}{mark}")


def settings_lines(meta: dict, plugins) -> list[str]:
    """One line per method whose settings differ from its config dataclass defaults: those of its first
    row, the reference that its other rows are labelled against (so every row's settings are known)."""
    import dataclasses

    lines = []
    for method, variants in meta.get("configs", {}).items():
        if method not in plugins.methods:
            continue
        defaults = dataclasses.asdict(plugins.methods.get(method).config())
        changed = {k: v for k, v in variants[0].items() if defaults.get(k) != v}
        if changed:
            diffs = ", ".join(f"{k}={v} (default {defaults.get(k)})" for k, v in sorted(changed.items()))
            more = " (other rows: as labelled)" if len(variants) > 1 else ""
            lines.append(f"{method} settings{more}: {diffs}")
    return lines


def leaky_choices(protocol: dict) -> list[str]:
    """The protocol choices of the sources that let test data into training or selection, as the
    header states them (the protocol study turns them on one at a time)."""
    out = []
    if protocol.get("smoothing", "none") != "none":
        out.append(f"targets smoothed ({protocol['smoothing']}) before prompts are drawn, so prompt values carry "
                   "their non-prompt neighbours' expression")
    if protocol.get("selection", "inner_val") == "test_fold":
        out.append("model selection (checkpoint, penalty, early stopping) on the test slides themselves")
    return out


def header_line(meta: dict) -> str:
    p = meta["protocol"]
    v = meta["versions"]
    panel = p.get("panel", {})
    panel_text = (f"panel {panel.get('file')}" if panel.get("file") else
                  f"panel {panel.get('hvg')} HVGs per fold (training sections)" if panel.get("hvg") else
                  f"panel {panel.get('hmhvg')} HMHVGs per fold (training sections)" if panel.get("hmhvg") else
                  f"panel {panel.get('top_expressed')} most expressed genes per fold (training sections)" if panel.get("top_expressed") else
                  "dataset panel")
    prompt = p.get("prompt", {})
    ft = p.get("finetune", {})
    finetune = (f"; methods that allow it are fine-tuned on each test slide's prompts ({ft.get('epochs')} epochs)"
                if ft.get("enabled") else "")
    date = _dt.date.today().isoformat()
    enc = meta.get("encoder")
    if enc:
        label = " (RANDOM INITIALISATION)" if enc.get("weights_id") == "random-init" else ""
        finetune += (f"; image features: encoder {enc.get('name')}{label}, weights {enc.get('weights_id')}, "
                     f"{p.get('images', {}).get('spot_um')} µm patches at {enc.get('input_size')} px")
    caveats = "".join(f" Caveat: {c}." for c in p.get("caveats") or [])
    caveats += "".join(f" LEAKY: {text}." for text in leaky_choices(p))
    return (
        f"stbench leaderboard: benchmark {p.get('benchmark')} v{p.get('version')}, dataset {p.get('dataset')}, "
        f"split {p.get('split')} (protocol level {p.get('protocol_level')}), {panel_text}, "
        f"normalisation {p.get('normalisation')}, prompts {prompt.get('ratio')} {prompt.get('strategy')} "
        f"(seed {p.get('seed')}){finetune}; metrics on non-prompt spots unless marked 'all spots'; "
        f"mean ± sample std over folds of the per-fold mean over test slides; a slide whose prediction is "
        f"constant scores PCC 0, and a method that predicts one vector everywhere by design shows 'undefined'."
        f"{caveats} Generated {date} with stbench {v.get('stbench')} (git {str(v.get('stbench_git'))[:10]}), "
        f"numpy {v.get('numpy')}, python {v.get('python')}."
    )


def _cell(row, col: str, digits: int = 3) -> str:
    mean, std = row[f"{col}:mean"], row[f"{col}:std"]
    if math.isnan(mean):
        return "undefined"
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    used_slides = row.get(f"{col}:slides")
    if used_slides is not None and not math.isnan(used_slides) and used_slides < row["slides"]:
        text += f" [{int(used_slides)}/{int(row['slides'])} slides]"
    elif row[f"{col}:folds"] < row["folds"]:
        text += f" [{int(row[f'{col}:folds'])}/{int(row['folds'])} folds]"
    return text


def _sweep_parts(meta: dict, rows: list[dict]) -> tuple[list, list, list]:
    """The prompt-ratio sweep table (headers, body) and its notes; empty without a sweep."""
    sweep = meta.get("sweep")
    if not sweep:
        return [], [], []
    ratios = sweep["ratios"]
    labels = ["method"] + [f"{label} @ {r:g}" for col, label in SWEEP_COLUMNS for r in ratios]
    body = []
    for row in rows:
        by = sweep["table"].get(row["method"], {})
        cells = [row["method"]]
        for col, _ in SWEEP_COLUMNS:
            for r in ratios:
                st = by.get(col, {}).get(r)
                cells.append("-" if st is None else _cell({**{f"{col}:{k}": v for k, v in st.items()},
                                                           "slides": st["slides"] or 0, "folds": st["folds"]}, col))
        body.append(cells)
    nesting = ("nested (each ratio's prompts are a subset of the next larger one's)" if sweep["nested"] else
               f"NOT nested: strategy {sweep['strategy']} draws each ratio with its own construction")
    notes = [f"Prompt-ratio sweep over {', '.join(f'{r:g}' for r in ratios)}: each fold fitted once and predicted at "
             f"every ratio; every ratio scored on the same spots, those prompted at none of them (so the main table, "
             f"at ratio {sweep['headline']:g}, is not comparable with a run at that ratio alone); prompts {nesting}."]
    return labels, body, notes


def _published_cell(row: dict, col: str, digits: int = 3) -> str:
    mean, std = row.get(f"{col}:mean", math.nan), row.get(f"{col}:std", math.nan)
    if math.isnan(mean):
        return "-"  # not reported
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


MISSING_NOTE = ("⚠ marks rows with numbers computed on fewer slides or folds than the method was tested on "
                "(the metric is undefined there, e.g. fewer than two scored spots); brackets give how many were used.")


def _csv_table(rows: list[dict]) -> str:
    out = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else f"{v:.6g}")
            else:
                cells.append("" if v is None else str(v))
        writer.writerow(cells)
    return out.getvalue()


def render(table, meta: dict, plugins, fmt: str = "md", columns=None, compact: bool = False,
           significance: Optional[dict] = None, published=None) -> str:
    """The table (rows of :func:`summary_rows`, or the DataFrame of :func:`summarise`) as text.
    ``compact``: the headline columns only (for terminals); files get all. ``significance``:
    ``{"metric": "pcc", "baseline": None}`` adds the paired comparisons of :func:`add_significance`
    (a second table; columns ``vs_best:*`` / ``vs_baseline:*`` in csv). ``published``: a
    :class:`stbench.published.Published` whose rows are added after ours, labelled, with the protocol
    differences under the table."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown leaderboard format {fmt!r} (option --format); choose one of {', '.join(FORMATS)}")
    rows = [dict(r) for r in (table.to_dict("records") if hasattr(table, "to_dict") else table)]
    sig_notes = add_significance(rows, plugins, **significance) if significance else []
    extra_rows, published_notes = [], []
    if published is not None:  # after the comparisons: a published row is never the best row
        from stbench import published as pub

        extra_rows = [{**r, "method": pub.label(published, r["method"])} for r in published.rows]
        published_notes = pub.protocol_lines(published, meta["protocol"])
    present = set(rows[0]) if rows else set()
    columns = [c for c in (columns or (COMPACT_COLUMNS if compact else DEFAULT_COLUMNS)) if f"{c[0]}:mean" in present]
    header = header_line(meta)
    if fmt == "csv":
        preset = [f"Preset: {meta['protocol']['preset']}."] if meta["protocol"].get("preset") else []
        for row in rows:
            for col, by_ratio in meta.get("sweep", {}).get("table", {}).get(row["method"], {}).items():
                for ratio, st in by_ratio.items():
                    row[f"{col}@ratio{ratio:g}:mean"], row[f"{col}@ratio{ratio:g}:std"] = st["mean"], st["std"]
        notes = "".join(f"# {line}\n" for line in preset + settings_lines(meta, plugins) + sig_notes + published_notes
                        + _sweep_parts(meta, rows)[2])
        return f"# {header}\n" + notes + _csv_table(rows + [{**r, "published": True} for r in extra_rows])
    from tabulate import tabulate

    labels = ["method", "folds", "slides"]
    for col, label in columns:
        hib = _higher_is_better(plugins, col)
        labels.append(label + ("" if hib is None else " ↑" if hib else " ↓"))
    labels.append("genes skipped (PCC, per slide)" if not compact else "skipped")
    body = []
    for row in rows:
        flag = " ⚠" if row.get("missing", 0) else ""
        cells = [row["method"] + flag, int(row["folds"]), int(row["slides"])]
        cells += [_cell(row, c) for c, _ in columns]
        cells.append(f"{row.get('pcc_skipped', math.nan):.2f}")
        body.append(cells)
    for row in extra_rows:
        body.append([row["method"], "-", "-"] + [_published_cell(row, c) for c, _ in columns] + ["-"])
    notes = settings_lines(meta, plugins)
    if meta["protocol"].get("preset"):
        notes.insert(0, f"Preset: {meta['protocol']['preset']}.")
    if any(r.get("missing", 0) for r in rows):
        notes.append(MISSING_NOTE)
    notes += published_notes
    sweep_labels, sweep_body, sweep_notes = _sweep_parts(meta, rows)
    sig_labels, sig_body = ["method", "vs best: Δ [95% CI] n p"], []
    if sig_notes:
        keys = ["best"] + (["baseline"] if significance.get("baseline") else [])
        if "baseline" in keys:
            sig_labels.append("vs baseline: Δ [95% CI] n p")
        sig_body = [[r["method"]] + [_comparison_cell(r, k) for k in keys] for r in rows]
    if fmt == "md":
        if compact:  # for a terminal: the header wrapped, the table narrow
            header = textwrap.fill(header, width=120)
        footer = "".join(f"\n{line}\n" for line in notes)
        if sweep_body:
            footer += ("\n" + tabulate(sweep_body, headers=sweep_labels, tablefmt="github", disable_numparse=True) + "\n"
                       + "".join(f"\n{line}\n" for line in sweep_notes))
        if sig_body:
            footer += ("\n" + tabulate(sig_body, headers=sig_labels, tablefmt="github", disable_numparse=True) + "\n"
                       + "".join(f"\n{line}\n" for line in sig_notes))
        return f"{header}\n\n" + tabulate(body, headers=labels, tablefmt="github", disable_numparse=True) + "\n" + footer
    if fmt == "html":
        import html

        footer = "".join(f"<p>{html.escape(line)}</p>\n" for line in notes)
        if sweep_body:
            footer += (tabulate(sweep_body, headers=sweep_labels, tablefmt="html", disable_numparse=True) + "\n"
                       + "".join(f"<p>{html.escape(line)}</p>\n" for line in sweep_notes))
        if sig_body:
            footer += (tabulate(sig_body, headers=sig_labels, tablefmt="html", disable_numparse=True) + "\n"
                       + "".join(f"<p>{html.escape(line)}</p>\n" for line in sig_notes))
        title = html.escape(f"stbench leaderboard: {meta['protocol'].get('benchmark')}")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{title}</title>\n</head>\n<body>\n<p>{html.escape(header)}</p>\n"
                + tabulate(body, headers=labels, tablefmt="html", disable_numparse=True) + "\n" + footer
                + "</body>\n</html>\n")
    latex_body = [[str(c).replace("±", r"$\pm$").replace("⚠", r"$\dagger$").replace("_", r"\_") for c in r] for r in body]
    latex_labels = [lbl.replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("_", r"\_")
                    for lbl in labels]
    footer = "".join(f"% {line}\n" for line in notes)
    if sweep_body:
        footer += (tabulate([[str(c).replace("±", r"$\pm$").replace("_", r"\_") for c in r] for r in sweep_body],
                            headers=sweep_labels, tablefmt="latex_raw", disable_numparse=True) + "\n"
                   + "".join(f"% {line}\n" for line in sweep_notes))
    if sig_body:
        body_tex = [[c.replace("≈", r"$\approx$").replace("_", r"\_") for c in r] for r in sig_body]
        footer += (tabulate(body_tex, headers=[lbl.replace("Δ", r"$\Delta$") for lbl in sig_labels], tablefmt="latex_raw",
                            disable_numparse=True) + "\n" + "".join(f"% {line}\n" for line in sig_notes))
    return f"% {header}\n" + tabulate(latex_body, headers=latex_labels, tablefmt="latex_raw", disable_numparse=True) + "\n" + footer
