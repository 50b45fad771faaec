"""Closed-form multi-output ridge regression with the penalty chosen on validation slides."""

import warnings

import numpy as np

from stbench.errors import ConfigError
from stbench.method import FinetuneSettings, FittedState, Method, training_slides
from stbench.metrics import mse, pcc


def _design(slides, with_truth=True):
    """Stack the spot features (and truth) of slides, keeping spots whose patch lies in the image."""
    xs, ys = [], []
    for s in slides:
        keep = s.features["spot_mask"]
        xs.append(s.features["spot"][keep])
        if with_truth:
            ys.append(s.expr[keep])
    return np.concatenate(xs).astype(np.float64), (np.concatenate(ys).astype(np.float64) if with_truth else None)


class Ridge(Method):
    def __init__(self, config):
        if config.select_by not in ("pcc", "mse"):
            raise ConfigError(f"ridge: select_by must be 'pcc' or 'mse', got {config.select_by!r} (key methods.ridge.select_by)")
        if not config.alphas or min(config.alphas) < 0:
            raise ConfigError("ridge: alphas must be a non-empty list of non-negative penalties (key methods.ridge.alphas)")
        self.config = config
        self.alpha_ = None

    # -- linear algebra -------------------------------------------------------------------------
    def _solve(self, x, y, alphas):
        """Weights for each alpha, on features standardised with this data's statistics."""
        self.x_mean_, self.x_std_ = x.mean(0), x.std(0)
        self.x_std_[self.x_std_ == 0] = 1.0
        self.y_mean_ = y.mean(0)
        xs = (x - self.x_mean_) / self.x_std_
        yc = y - self.y_mean_
        if xs.shape[1] <= xs.shape[0]:
            # w = V (Λ + α)⁻¹ Vᵀ Xᵀy from the eigendecomposition XᵀX = V Λ Vᵀ: one d×d problem instead
            # of an SVD of the N×d design (N spots ≫ d features), and the same weights
            lam, v = np.linalg.eigh(xs.T @ xs)
            lam = np.clip(lam, 0.0, None)
            vtxy = v.T @ (xs.T @ yc)
            # a zero eigenvalue with α = 0 (a constant feature) gets weight 0, as a pseudo-inverse would
            inverse = [np.divide(1.0, lam + a, out=np.zeros_like(lam), where=lam + a > 1e-12) for a in alphas]
            stacked = v @ np.concatenate([vtxy * inv[:, None] for inv in inverse], axis=1)  # one product
            return np.split(stacked, len(alphas), axis=1)
        u, sv, vt = np.linalg.svd(xs, full_matrices=False)
        uty = u.T @ yc
        return [vt.T @ ((sv / (sv**2 + a))[:, None] * uty) for a in alphas]

    def _predict_x(self, x, w):
        return ((x - self.x_mean_) / self.x_std_) @ w + self.y_mean_

    # -- Method API -----------------------------------------------------------------------------
    def fit(self, train, val, context):
        x, y = _design(train)
        val = list(val)
        if not val and len(train) > 1:  # no validation patient: hold out the last training slide
            warnings.warn("ridge: no inner validation slides; choosing the penalty on the last training slide", stacklevel=2)
            train, val = train[:-1], train[-1:]
            x, y = _design(train)
        alphas = [float(a) for a in self.config.alphas]
        weights = self._solve(x, y, alphas)
        if val and len(alphas) > 1:
            per_slide = [[] for _ in alphas]
            stacked = np.concatenate(weights, axis=1)  # every penalty in one product (few large BLAS calls)
            for s in val:
                # score only spots whose patch lies in the image, as in training (_design)
                keep = s.features["spot_mask"]
                xs = (s.features["spot"][keep].astype(np.float64) - self.x_mean_) / self.x_std_
                truth = s.expr[keep]
                for a, pred in enumerate(np.split(xs @ stacked, len(alphas), axis=1)):
                    pred = pred + self.y_mean_
                    m = pcc(pred, truth) if self.config.select_by == "pcc" else mse(pred, truth)
                    per_slide[a].append(m.value if self.config.select_by == "pcc" else -m.value)
            scores = [np.nanmean(v) if np.isfinite(v).any() else -np.inf for v in per_slide]
            best = int(np.argmax(scores))
        else:
            best = len(alphas) // 2
        self.alpha_ = alphas[best]
        # refit on all training spots (validation included: they are training patients) at that penalty
        x, y = _design(training_slides(train, val, context))
        self.train_x_, self.train_y_ = x, y
        self.w_ = self._solve(x, y, [self.alpha_])[0]

    def finetune(self, slide, settings: FinetuneSettings):
        keep = slide.features["spot_mask"][slide.prompt_idx]
        x = np.concatenate([self.train_x_, slide.features["spot"][slide.prompt_idx][keep].astype(np.float64)])
        y = np.concatenate([self.train_y_, slide.prompt_expr[keep].astype(np.float64)])
        self.w_ = self._solve(x, y, [self.alpha_])[0]

    def predict(self, slide):
        return self._predict_x(slide.features["spot"].astype(np.float64), self.w_).astype(np.float32)

    def summary(self):
        return {"alpha": self.alpha_}

    #: the arrays of a fitted ridge; the training design is kept because fine-tuning refits with it
    STATE = ("x_mean_", "x_std_", "y_mean_", "w_", "train_x_", "train_y_")

    def get_state(self) -> FittedState:
        return FittedState({k: getattr(self, k) for k in self.STATE}, {"alpha": self.alpha_})

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        for k in self.STATE:
            setattr(self, k, np.asarray(state.arrays[k], dtype=np.float64))
        self.alpha_ = float(state.meta["alpha"])
