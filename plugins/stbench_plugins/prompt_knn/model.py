"""Inverse-distance-weighted k-nearest-prompt interpolation."""

import numpy as np
from scipy.spatial import cKDTree

from stbench.errors import ConfigError
from stbench.method import FittedState, Method


class PromptKnn(Method):
    def __init__(self, config):
        if config.k < 1:
            raise ConfigError(f"prompt_knn: k must be >= 1, got {config.k} (key methods.prompt_knn.k)")
        self.config = config

    def fit(self, train, val, context):
        pass  # nothing to learn: the prediction uses only the test slide's prompts

    # nothing fitted: a saved prompt_knn is its config (k, power)
    def get_state(self) -> FittedState:
        return FittedState()

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        pass

    def predict(self, slide):
        if slide.prompt_idx is None or len(slide.prompt_idx) == 0:
            raise ValueError(f"prompt_knn needs prompt spots on slide {slide.name}")
        pos = slide.positions_um()
        k = min(self.config.k, len(slide.prompt_idx))
        dist, nn = cKDTree(pos[slide.prompt_idx]).query(pos, k=k)
        dist, nn = dist.reshape(len(pos), k), nn.reshape(len(pos), k)
        weights = 1.0 / np.maximum(dist, 1e-6) ** self.config.power
        exact = dist[:, 0] <= 1e-6  # a prompt spot returns its own measurement
        weights[exact] = 0.0
        weights[exact, 0] = 1.0
        weights /= weights.sum(axis=1, keepdims=True)
        values = slide.prompt_expr[nn]  # (N, k, G)
        return np.einsum("nk,nkg->ng", weights, values).astype(np.float32)
