"""``ridge``: ridge regression from frozen spot-patch features to expression.

The standard linear probe of encoder benchmarks (HEST-Benchmark, Jaume et al., NeurIPS 2024 Datasets
and Benchmarks, arXiv:2406.16192; github.com/mahmoodlab/HEST). Deviations: the penalty is chosen on
the inner validation slides (training patients) by mean per-slide PCC, never on the test fold; no PCA.
Fine-tuning on prompt spots (METHODS.md §9.1) refits with the test slide's prompt spots added to the
training spots, at the chosen penalty.
"""

from dataclasses import dataclass, field

from stbench import hookimpl
from stbench.specs import MethodSpec


@dataclass
class RidgeConfig:
    #: penalties tried (on standardised features); the best on the inner validation slides is kept
    alphas: list = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])
    #: how the penalty is chosen on the validation slides: "pcc" (mean per-slide PCC) or "mse"
    select_by: str = "pcc"


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="ridge",
            factory="stbench_plugins.ridge.model:Ridge",
            config=RidgeConfig,
            needs=frozenset({"expression", "image_features"}),
            test_settings={"alphas": [1.0, 100.0]},
            description="ridge regression on frozen spot features, penalty chosen on inner validation (HEST probe)",
            reference="Jaume et al., HEST-1k, NeurIPS 2024 Datasets and Benchmarks, arXiv:2406.16192",
        )
    )
