"""ST-Net: recipes (defaults, explicit fields, the record), ST-Net's head initialisation, the 8-fold test-time
augmentation, the clamp, the summed-squared-error loss, and the plugin end to end through the harness (both
recipes and the frozen variant, with prompt fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from stbench import weights as stbench_weights
from stbench.benchmark import resolve_config
from stbench.errors import ConfigError
from stbench.images.augment import dihedral, to_float
from stbench.images.patches import PatchRequest, PatchSet
from stbench.method import FitContext
from stbench.plugins import load_plugins
from stbench.run import SlideStore, execute, resolve_plan
from stbench_plugins.stnet import RECIPE_FIELDS, STNetConfig, stnet_needs, stnet_patches
from stbench_plugins.stnet.model import STNet, STNetNet, sse_loss

TINY = dict(backbone="test_efficientnet", backbone_weights="random", input_px=32, epochs=2, batch_size=16)
DATA = ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plugins():
    return load_plugins(entry_points=False)


def _plan(out: Path, finetune: bool = False, **stnet):
    sets = [f"methods.stnet.{k}={v}" for k, v in {**TINY, **stnet}.items()] + DATA
    sets.append(f"finetune.enabled={str(finetune).lower()}")
    conf, base = resolve_config("synthetic", sets=sets)
    return resolve_plan(conf, ["stnet"], out, _plugins(), base)


# --- recipes --------------------------------------------------------------------------------------------

TRIPLEX = dict(optimizer="adamw", lr=1e-4, weight_decay=0.01, batch_size=128, epochs=1000, patience=20,
               scheduler="plateau", select_on="pcc", loss="mse", head_init="default", input_norm="imagenet",
               clamp=True, tta=False)
ORIGINAL = dict(optimizer="sgd", lr=1e-6, weight_decay=0.0, momentum=0.9, batch_size=32, epochs=50, patience=0,
                scheduler="none", select_on="loss", loss="sse", head_init="mean", input_norm="estimated",
                clamp=False, tta=True)


def test_recipe_defaults():
    default = STNetConfig()
    assert default.recipe == "triplex" and default.backbone == "densenet121" and default.backbone_weights is None
    assert (default.spot_um, default.input_px, default.plateau_factor, default.plateau_patience) == (112.0, 224, 0.1, 10)
    assert {k: getattr(default, k) for k in TRIPLEX} == TRIPLEX
    original = STNetConfig(recipe="original")
    assert {k: getattr(original, k) for k in ORIGINAL} == ORIGINAL
    assert original.norm_batches == 12 and original.augment and default.augment


def test_an_explicit_field_wins_over_the_recipe(tmp_path):
    cfg = STNetConfig(recipe="original", lr=1e-3, tta=False, batch_size=8)
    assert (cfg.lr, cfg.tta, cfg.batch_size) == (1e-3, False, 8)
    assert (cfg.optimizer, cfg.loss, cfg.head_init, cfg.epochs) == ("sgd", "sse", "mean", 50)  # the rest: the recipe's
    # the same through the harness's settings (a --set value written as 1e-3 arrives as a string)
    plan = _plan(tmp_path / "r", recipe="original", lr="1e-3", clamp="true")
    resolved = plan.methods["stnet"]
    assert resolved.lr == 1e-3 and resolved.clamp is True and resolved.optimizer == "sgd" and resolved.tta is True
    assert resolved.batch_size == 16  # TINY sets it explicitly: it wins over the recipe's 32


def test_unknown_recipe_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        STNetConfig(recipe="paper")
    assert "methods.stnet.recipe" in str(err.value) and "\n" not in str(err.value)
    assert "triplex" in str(err.value) and "original" in str(err.value)
    with pytest.raises(ConfigError, match="methods.stnet.recipe"):
        _plan(tmp_path / "r", recipe="paper")
    assert not (tmp_path / "r").exists()


def test_missing_densenet_weights_stop_the_run_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(stbench_weights, "find_cached_timm_weights", lambda cfg: None)  # an empty local cache
    conf, base = resolve_config("synthetic", sets=DATA)
    with pytest.raises(ConfigError) as err:
        resolve_plan(conf, ["stnet"], tmp_path / "r", _plugins(), base)
    msg = str(err.value)
    assert "\n" not in msg and "densenet121" in msg and "methods.stnet.backbone_weights=PATH" in msg
    assert not (tmp_path / "r").exists()


def test_needs_and_patches_follow_the_config(tmp_path):
    assert stnet_needs(STNetConfig()) == {"expression", "image_patches"}
    assert stnet_needs(STNetConfig(backbone="frozen")) == {"expression", "image_features"}
    assert stnet_patches(STNetConfig()) == (PatchRequest("spot", 112.0, 224),)
    cnn, frozen = _plan(tmp_path / "a"), _plan(tmp_path / "b", backbone="frozen")
    assert [r.name for r in cnn.patch_requests] == ["spot-112um-32px"] and cnn.encoder is None
    assert frozen.patch_requests == [] and frozen.encoder is not None


# --- the network, its head, its loss and its clamp ------------------------------------------------------


def _features_slide(n=6, d=5, g=4, seed=0):
    """A stand-in test slide that carries only frozen features (frozen variant)."""
    rng = np.random.default_rng(seed)
    return SimpleNamespace(n_spots=n, n_genes=g, features={"spot": rng.normal(size=(n, d)).astype(np.float32),
                                                           "spot_mask": np.ones(n, bool)}, patches={})


def _frozen_method(recipe, d=5, g=4, bias=0.0):
    method = STNet(STNetConfig(recipe=recipe, backbone="frozen"))
    method.model = STNetNet(d, g, None, clamp=method.config.clamp).eval()
    method.mu_, method.sd_ = np.zeros(d, np.float32), np.ones(d, np.float32)
    with torch.no_grad():
        method.model.head.weight.normal_()
        method.model.head.bias.fill_(bias)
    return method


def test_clamp_at_zero_in_the_triplex_recipe_only():
    slide = _features_slide()
    triplex, original = _frozen_method("triplex", bias=-3.0), _frozen_method("original", bias=-3.0)
    triplex.model.load_state_dict(original.model.state_dict())
    a, b = triplex.predict(slide), original.predict(slide)
    assert (b < 0).any() and (a >= 0).all()
    np.testing.assert_allclose(a, np.maximum(b, 0), rtol=1e-6, atol=1e-6)


def test_summed_squared_error_loss_is_the_formula():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.5, -1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    truth = torch.tensor([[1.5, 2.0, 1.0, 4.0], [1.0, 0.0, -1.0, 0.0], [2.0, 4.0, 3.0, 0.0]])
    # squared errors: 0.25 + 0 + 4 + 0, 1 + 0.25 + 0 + 4, 1 + 1 + 0 + 9 = 20.5, summed over spots and genes, / G
    assert float(sse_loss(pred, truth)) == pytest.approx(20.5 / 4)
    assert float(sse_loss(pred, truth)) == pytest.approx(float(((pred - truth) ** 2).sum(1).mean() * 3 / 4))
    # the original recipe trains (and fine-tunes) with it; the re-implementation with the mean
    slide = _features_slide()
    spots = np.array([0, 2, 5])
    truth = torch.rand(3, 4)
    for recipe, expected in (("original", lambda p: ((p - truth) ** 2).sum() / 4), ("triplex", lambda p: ((p - truth) ** 2).mean())):
        method = _frozen_method(recipe)
        with torch.no_grad():
            pred = method.model(torch.as_tensor(slide.features["spot"][spots]))
            assert float(method.spot_loss(slide, spots, truth)) == pytest.approx(float(expected(pred)), rel=1e-6)


def _slide_store(tmp_path, **stnet):
    plan = _plan(tmp_path / "run", **stnet)
    store = SlideStore(plan)
    store.prepare_features()
    store.prepare_patches()
    fold = plan.folds[0]
    genes = store.panel(fold)
    train = [store.slide(s, genes) for s in fold.train]
    val = [store.slide(s, genes) for s in fold.val]
    return plan, train, val, genes


def test_original_recipe_starts_the_head_at_zero_weights_and_the_training_mean(tmp_path, monkeypatch):
    plan, train, val, genes = _slide_store(tmp_path, recipe="original", epochs=1)
    seen = {}
    make_optimizer = STNet.make_optimizer

    def spy(self, params, lr):  # called once the network is built, before the first step
        seen["weight"] = self.model.head.weight.detach().clone()
        seen["bias"] = self.model.head.bias.detach().clone()
        return make_optimizer(self, params, lr)

    monkeypatch.setattr(STNet, "make_optimizer", spy)
    STNet(plan.methods["stnet"]).fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    used = [s.expr[s.patches["spot-112um-32px"].mask[:, 0]] for s in train]
    assert seen["weight"].abs().max() == 0
    np.testing.assert_allclose(seen["bias"].numpy(), np.concatenate(used).mean(0), rtol=1e-5)
    # the re-implementation keeps PyTorch's default initialisation
    seen.clear()
    STNet(STNetConfig(**{**TINY, "epochs": 1})).fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    assert seen["weight"].abs().max() > 0


# --- test-time augmentation -----------------------------------------------------------------------------


class SpatialMean(nn.Module):
    """Averages each channel over the image: invariant to every flip and turn."""

    num_features = 3

    def forward(self, x):
        return x.mean(dim=(-2, -1))


def _patch_slide(images: np.ndarray, px: int):
    request = PatchRequest("spot", 112.0, px)
    n = len(images)
    patches = PatchSet(images[:, None], np.ones((n, 1), bool), request, Path("in-memory"))
    return SimpleNamespace(n_spots=n, n_genes=4, patches={request.name: patches}, features={})


def _patch_method(backbone: nn.Module, in_dim: int, px: int, **cfg):
    method = STNet(STNetConfig(recipe="original", backbone="test_efficientnet", backbone_weights="random",
                               input_px=px, **cfg))
    method.model = STNetNet(in_dim, 4, backbone, clamp=method.config.clamp).eval()
    method.input_mean_ = np.array([0.6, 0.5, 0.7], np.float32)  # what fit estimates in the original recipe
    method.input_std_ = np.array([0.2, 0.15, 0.1], np.float32)
    return method


def _orbit(px=8, seed=0) -> np.ndarray:
    """A random patch and its 8 dihedral transforms (the first is the patch itself)."""
    patch = np.random.default_rng(seed).integers(0, 256, (1, px, px, 3), dtype=np.uint8)
    return np.concatenate([dihedral(patch, k, channels_last=True) for k in range(8)])


def test_an_invariant_network_predicts_one_value_for_a_patch_and_its_8_transforms():
    torch.manual_seed(0)
    method = _patch_method(SpatialMean(), 3, px=8)
    assert method.uses_tta
    slide = _patch_slide(_orbit(), 8)
    pred = method.predict(slide)
    assert np.ptp(pred, axis=0).max() < 1e-5 and np.ptp(pred, axis=1).max() > 1e-3
    # the mean of 8 equal predictions is that prediction: TTA returns what the plain network does
    plain = _patch_method(SpatialMean(), 3, px=8, tta=False)
    plain.model = method.model
    np.testing.assert_allclose(pred, plain.predict(slide), rtol=1e-5, atol=1e-6)


def test_tta_averages_the_8_transforms_of_each_patch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))  # not invariant
    method = _patch_method(net, 6, px=8)
    images = _orbit()
    pred = method.predict(_patch_slide(images, 8))
    with torch.no_grad():
        def one(k):
            x = to_float(torch.from_numpy(dihedral(images, k, channels_last=True)), "none")
            x = (x - torch.tensor(method.input_mean_).view(3, 1, 1)) / torch.tensor(method.input_std_).view(3, 1, 1)
            return method.model(x).numpy()

        separate = [one(k) for k in range(8)]
    np.testing.assert_allclose(pred, np.mean(separate, axis=0), rtol=1e-5, atol=1e-5)
    assert np.abs(pred - separate[0]).max() > 1e-3  # averaging changed something
    assert np.ptp(pred, axis=0).max() < 1e-4  # and made the prediction invariant over the orbit
    # without TTA (the re-implementation): the plain prediction, which differs over the orbit
    plain = _patch_method(net, 6, px=8, tta=False)
    plain.model = method.model
    plain = plain.predict(_patch_slide(images, 8))
    np.testing.assert_allclose(plain, separate[0], rtol=1e-5, atol=1e-5)
    assert np.ptp(plain, axis=0).max() > 1e-3


def test_a_one_spot_batch_trains_on_batchnorm_running_statistics():
    from stbench_plugins.stnet.model import build_backbone

    cfg = STNetConfig(**TINY)
    backbone, _ = build_backbone(cfg)  # test_efficientnet: BatchNorm on 1 x 1 maps at 32 px
    method = STNet(cfg)
    method.model = STNetNet(backbone.num_features, 4, backbone, clamp=True).train()
    slide = _patch_slide(_orbit(px=32)[:2], 32)
    running = {k: v.clone() for k, v in method.model.state_dict().items() if "running" in k}
    loss = method.spot_loss(slide, np.array([1]), torch.rand(1, 4))
    loss.backward()
    assert torch.isfinite(loss) and method.model.training
    assert all(torch.equal(v, method.model.state_dict()[k]) for k, v in running.items())
    assert all(m.training for m in method.model.modules())  # BatchNorm back in training mode


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,backbone", [("triplex", "test_efficientnet"), ("original", "test_efficientnet"),
                                             ("triplex", "frozen"), ("original", "frozen")])
def test_runs_end_to_end_with_prompt_fine_tuning(tmp_path, recipe, backbone):
    out = tmp_path / "run"
    plan = _plan(out, finetune=True, recipe=recipe, backbone=backbone)
    execute(plan, verbose=False)
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 6 and res["finetuned"].all() and np.isfinite(res["pcc"]).all() and np.isfinite(res["mae"]).all()
    # the resolved recipe is recorded with the run: explicit fields as given, the rest from the recipe
    recorded = json.loads((out / "run.json").read_text())["methods"]["stnet"]
    expected = {**(TRIPLEX if recipe == "triplex" else ORIGINAL), **TINY, "recipe": recipe, "backbone": backbone}
    assert {k: recorded[k] for k in expected} == expected
    assert all(recorded[k] is not None for k in RECIPE_FIELDS)
    summary = json.loads(pd.read_csv(out / "fold_results.csv")["fit_summary"][0])
    assert summary["recipe"] == recipe and summary["epochs_run"] == 2
    assert summary["tta"] == (recipe == "original" and backbone != "frozen")
    if recipe == "original":
        assert "4-fold CV inside the training patients" in summary["epoch_selection"]
    if recipe == "triplex":  # clamped at zero
        for slide in res["slide"]:
            assert (anndata.read_h5ad(out / "predictions" / "stnet" / f"{slide}.h5ad").X >= 0).all()


def test_fine_tuning_fits_the_prompt_spots(tmp_path):
    errors = {}
    for ft in (False, True):
        out = tmp_path / f"ft{ft}"
        execute(_plan(out, finetune=ft, backbone="frozen", lr=1e-2), verbose=False)
        assert pd.read_csv(out / "results.csv")["finetuned"].tolist() == [ft] * 6
        errors[ft] = []
        for path in sorted((out / "predictions" / "stnet").glob("*.h5ad")):
            ad = anndata.read_h5ad(path)
            prompt = ad.obs["is_prompt"].to_numpy(bool)
            errors[ft].append(float(((ad.X[prompt] - ad.layers["truth"][prompt]) ** 2).mean()))
    # 5 epochs of the recipe's loss on the prompts bring every test slide's prompt predictions closer
    assert all(tuned < 0.9 * plain for tuned, plain in zip(errors[True], errors[False]))


@pytest.mark.parametrize("backbone,extra", [("test_efficientnet", {}), ("frozen", {}),
                                            ("test_efficientnet", {"recipe": "original", "lr": 1e-3})])
def test_training_loss_decreases(tmp_path, backbone, extra):
    settings = {"backbone": backbone, "epochs": 4, "lr": 1e-2, **extra}
    plan, train, val, genes = _slide_store(tmp_path, **settings)
    method = STNet(plan.methods["stnet"])
    method.fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    losses = [h["train_loss"] for h in method.history]
    # (the original recipe starts from the training mean, so its loss has less to lose)
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < 0.97 * losses[0]
    assert all("val_pcc" in h and "val_loss" in h for h in method.history)
    if backbone == "frozen":  # standardised with the training spots' statistics
        stack = np.concatenate([s.features["spot"][s.features["spot_mask"]] for s in train])
        np.testing.assert_allclose(method.mu_, stack.mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["triplex", "original"])
def test_the_best_inner_validation_epoch_is_kept_and_training_stops_early(tmp_path, monkeypatch, recipe):
    stop = {"patience": 2, "plateau_patience": 0} if recipe == "triplex" else {}  # the original: its own (none)
    plan, train, val, genes = _slide_store(tmp_path, recipe=recipe, backbone="frozen", epochs=8, lr=1e-2, **stop)
    # scripted validation: the best PCC at epoch 1 (triplex: then two worse epochs), the lowest loss at epoch 2
    scores = iter([(0.1, 9.0), (0.3, 7.0), (0.2, 5.0), (0.25, 6.0)] + [(0.0, 99.0)] * 4)
    best = 1 if recipe == "triplex" else 2
    heads = []

    def scripted(self, val):
        heads.append(self.model.head.weight.detach().clone())
        return next(scores)

    monkeypatch.setattr(STNet, "_validate", scripted)
    method = STNet(plan.methods["stnet"])
    method.fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    if recipe == "triplex":  # early stopping after `patience` epochs without a better PCC
        assert len(method.history) == 4 and method.best_epoch == best
        # ReduceLROnPlateau on the PCC (patience 0 here): ×0.1 after the first worse epoch
        assert [h["lr"] for h in method.history] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3])
    else:  # the original: all epochs run (no early stopping, no schedule); the epoch of the lowest loss is kept
        assert len(method.history) == 8 and method.best_epoch == best
        assert {h["lr"] for h in method.history} == {1e-2}
    assert torch.equal(method.model.head.weight, heads[best]) and not torch.equal(heads[best], heads[-1])
    summary = method.summary()
    assert summary["best_epoch"] == best and summary["best_val_pcc"] == [0.1, 0.3, 0.2][best]


def test_without_validation_slides_every_epoch_runs_and_the_last_is_kept(tmp_path):
    plan, train, _, genes = _slide_store(tmp_path, backbone="frozen", epochs=3)
    method = STNet(plan.methods["stnet"])
    with pytest.warns(UserWarning, match="no inner-validation slides"):
        method.fit(train, [], FitContext(seed=0, genes=np.asarray(genes)))
    assert len(method.history) == 3 and method.best_epoch == 2
    assert method.summary()["epoch_selection"].startswith("last epoch")
