"""``mean``: predict the training-set mean expression of every gene at every spot.

A floor for MAE and MSE. It predicts the same vector for every spot, so its per-slide PCC is undefined
(reported as such, with the count of constant predictions), which is the honest number for a method
that knows nothing about where a spot is.
"""

from dataclasses import dataclass

from stbench import hookimpl
from stbench.specs import MethodSpec


@dataclass
class MeanConfig:
    #: also average in the inner-validation slides (they are training patients too)
    include_val: bool = False


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="mean",
            factory="stbench_plugins.mean.model:MeanBaseline",
            config=MeanConfig,
            needs=frozenset({"expression"}),
            description="training-set mean expression at every spot (MAE/MSE floor; PCC undefined)",
        )
    )
