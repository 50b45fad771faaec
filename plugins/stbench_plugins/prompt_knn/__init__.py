"""``prompt_knn``: image-free spatial interpolation from a slide's prompt spots.

Each spot gets the inverse-distance-weighted mean of its ``k`` nearest prompt spots (distances in µm,
so sections at different pixel scales behave the same). It uses no
image and no training data, so it answers "how much does the image add over the prompts alone?".
"""

from dataclasses import dataclass

from stbench import hookimpl
from stbench.specs import MethodSpec


@dataclass
class PromptKnnConfig:
    #: number of nearest prompt spots averaged
    k: int = 8
    #: weight = 1 / distance ** power (0 gives an unweighted mean)
    power: float = 1.0


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="prompt_knn",
            factory="stbench_plugins.prompt_knn.model:PromptKnn",
            config=PromptKnnConfig,
            needs=frozenset({"expression", "coords"}),
            # nothing is learned from training slides, so there is nothing to fine-tune
            finetune=False,
            # it predicts from the test slide's prompt spots alone
            takes_prompts=True,
            test_settings={"k": 3},
            description="inverse-distance-weighted k nearest prompt spots (no image)",
        )
    )
