"""The prompt fine-tuning protocol of METHODS.md §9.1, implemented once in the harness."""

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import torch

from stbench.benchmark import resolve_config
from stbench.method import FinetuneSettings, Method
from stbench.plugins import load_plugins
from stbench.run import execute, resolve_plan
from stbench.specs import MethodSpec
from stbench.torch_method import TorchMethod


@dataclass
class MLPConfig:
    lr: float = 1e-2
    epochs: int = 30


class CoordMLP(TorchMethod):
    """A tiny torch baseline: expression from spot coordinates (enough to test the protocol)."""

    calls: list = []

    def __init__(self, config):
        self.config, self.lr, self.batch_size = config, config.lr, 32

    def _x(self, slide, spots):
        pos = slide.positions_um()[spots]
        return torch.as_tensor((pos - pos.mean(0)) / 1000.0, dtype=torch.float32)

    def spot_loss(self, slide, spots, truth):
        return torch.nn.functional.mse_loss(self.model(self._x(slide, spots)), truth)

    def make_optimizer(self, params, lr):
        CoordMLP.calls.append(("optimizer", lr))
        return super().make_optimizer(params, lr)

    def fit(self, train, val, context):
        torch.manual_seed(context.seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, len(context.genes)))
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        for _ in range(self.config.epochs):
            for s in train:
                opt.zero_grad()
                self.spot_loss(s, np.arange(s.n_spots), torch.tensor(s.expr)).backward()
                opt.step()

    def predict(self, slide):
        with torch.no_grad():
            return self.model(self._x(slide, np.arange(slide.n_spots))).numpy()


def _plugins():
    p = load_plugins(entry_points=False)
    p.methods.add(MethodSpec("coord_mlp", CoordMLP, MLPConfig, needs=frozenset({"expression", "coords"})), "test", "test")
    # the same class (it implements finetune), but its spec declares the protocol does not apply
    p.methods.add(MethodSpec("coord_mlp_frozen", CoordMLP, MLPConfig, needs=frozenset({"expression", "coords"}),
                             finetune=False), "test", "test")
    return p


def _run(tmp_path, name, finetune, methods=("coord_mlp",), **ft):
    shorthands = {"finetune": {"enabled": finetune, **ft}}
    conf, base = resolve_config("synthetic", sets=["dataset_options.spots_per_section=80"], shorthands=shorthands)
    out = tmp_path / name
    execute(resolve_plan(conf, list(methods), out, _plugins(), base), verbose=False)
    return pd.read_csv(out / "results.csv")


def test_torch_baseline_is_fine_tuned_on_prompts_of_a_copy(tmp_path, monkeypatch):
    CoordMLP.calls.clear()
    steps = []
    original = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        steps.append(len(self.param_groups[0]["params"]))
        return original(self, *a, **k)

    plain = _run(tmp_path, "plain", False)
    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    tuned = _run(tmp_path, "tuned", True)
    assert tuned["finetuned"].all() and not plain["finetuned"].any()
    # one optimiser per test slide, at the method's own training rate, over all 4 parameter tensors
    assert CoordMLP.calls == [("optimizer", 1e-2)] * 8
    # 5 epochs over 8 prompt spots in one batch per test slide (+ the fold trainings)
    train_steps = 4 * 30 * 4  # folds x epochs x training slides
    assert len(steps) == train_steps + 8 * 5 and set(steps) == {4}
    assert not np.allclose(plain["mse"], tuned["mse"])


def test_finetune_learning_rate_and_epochs_are_settings(tmp_path):
    CoordMLP.calls.clear()
    _run(tmp_path, "lr", True, lr=1e-5, epochs=1)
    assert {lr for _, lr in CoordMLP.calls} == {1e-5}


def test_methods_that_declare_no_finetuning_are_not_finetuned(tmp_path):
    assert CoordMLP.supports_finetune()
    res = _run(tmp_path, "mixed", True, methods=("coord_mlp", "coord_mlp_frozen", "prompt_knn"))
    assert res.groupby("method")["finetuned"].agg(set).to_dict() == {
        "coord_mlp": {True}, "coord_mlp_frozen": {False}, "prompt_knn": {False}}
    # the declaration is what stops it: the same class fine-tuned and not gives different predictions
    scores = res.pivot_table(index="slide", columns="method", values="mse")
    assert not np.allclose(scores["coord_mlp"], scores["coord_mlp_frozen"])


def test_finetune_on_the_method_does_not_touch_the_fold_model():
    from stbench.method import FitContext
    from test_phg2st import _slide  # a slide with features and coordinates

    s = _slide()
    m = CoordMLP(MLPConfig(epochs=2))
    m.fit([s], [], FitContext(seed=0, genes=s.genes))
    import copy

    before = [p.detach().clone() for p in m.model.parameters()]
    twin = copy.deepcopy(m)
    twin.finetune(s.masked(np.arange(5)), FinetuneSettings(epochs=3))
    assert all(torch.equal(a, b) for a, b in zip(before, m.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, twin.model.parameters()))


@dataclass
class DriftConfig:
    pass


class Drift(Method):
    """Fine-tuning mutates the model in place: it adds the prompt spots' mean to the stored vector. A
    harness that fine-tuned the fold's model itself (no copy) would carry slide 1's prompts into slide 2."""

    fitted: dict = {}  # fold -> the vector fit() produced (a record for the test, not a model copy)

    def __init__(self, config):
        self.vector = None

    def fit(self, train, val, context):
        self.vector = np.concatenate([s.expr for s in train + val]).mean(axis=0).astype(np.float64)
        Drift.fitted[context.fold] = self.vector.copy()

    def finetune(self, slide, settings):
        self.vector += slide.prompt_expr.mean(axis=0)  # in place, on whatever object the harness passed

    def predict(self, slide):
        return np.tile(self.vector, (slide.n_spots, 1))


def test_harness_fine_tunes_a_fresh_copy_of_the_fold_model_per_slide(tmp_path):
    Drift.fitted.clear()
    p = load_plugins(entry_points=False)
    p.methods.add(MethodSpec("drift", Drift, DriftConfig), "test", "test")
    conf, base = resolve_config("synthetic", sets=["dataset_options.spots_per_section=60"],
                                shorthands={"finetune": {"enabled": True}})
    out = tmp_path / "drift"
    plan = resolve_plan(conf, ["drift"], out, p, base)
    assert all(len(f.test) >= 2 for f in plan.folds), "each fold must test several slides for a leak to show"
    execute(plan, verbose=False)
    res = pd.read_csv(out / "results.csv")
    assert res["finetuned"].all() and len(res) == sum(len(f.test) for f in plan.folds)
    for row in res.itertuples():
        ad = anndata.read_h5ad(out / "predictions" / "drift" / f"{row.slide}.h5ad")
        prompts = ad.obs["is_prompt"].to_numpy()
        # the fold's model, fine-tuned on this slide's prompts only
        expected = Drift.fitted[row.fold] + ad.layers["truth"][prompts].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(ad.X, np.tile(expected, (ad.n_obs, 1)), rtol=1e-5, atol=1e-5,
                                   err_msg=f"slide {row.slide} of fold {row.fold}")
