"""``mean``: predict the training-set mean expression of every gene at every spot.

A floor for MAE and MSE. It predicts the same vector for every spot by design, so the spec declares it
a constant predictor and its correlation metrics are reported as undefined (with the count of constant
predictions), which is the honest number for a method that knows nothing about where a spot is.

Like every closed-form method (the rule in :mod:`stbench.method`), it has nothing to select on the
inner validation slides, so it averages over all training patients: training and validation slides.
"""

from dataclasses import dataclass

from stbench import hookimpl
from stbench.specs import MethodSpec


@dataclass
class MeanConfig:
    """The mean baseline has no hyperparameters."""


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="mean",
            factory="stbench_plugins.mean.model:MeanBaseline",
            config=MeanConfig,
            needs=frozenset({"expression"}),
            constant_predictor=True,
            description="training-set mean expression at every spot (MAE/MSE floor; PCC undefined)",
        )
    )
