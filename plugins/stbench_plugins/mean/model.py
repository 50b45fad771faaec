"""The mean-expression baseline."""

import numpy as np

from stbench.method import FinetuneSettings, FittedState, Method, training_slides


class MeanBaseline(Method):
    def __init__(self, config):
        self.config = config
        self.mean_ = None

    def fit(self, train, val, context):
        # nothing to select on validation, so the final model uses all training patients (stbench.method)
        slides = training_slides(train, val, context)
        # spot-weighted mean over all training spots
        self.mean_ = np.concatenate([s.expr for s in slides]).mean(axis=0).astype(np.float32)

    def finetune(self, slide, settings: FinetuneSettings):
        # "fine-tuning" a mean on prompt spots = the prompt spots' mean
        self.mean_ = slide.prompt_expr.mean(axis=0).astype(np.float32)

    def predict(self, slide):
        return np.tile(self.mean_, (slide.n_spots, 1))

    def get_state(self) -> FittedState:
        return FittedState({"mean": self.mean_})

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        self.mean_ = np.asarray(state.arrays["mean"], dtype=np.float32)
