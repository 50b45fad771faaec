"""TRIPLEX (METHODS.md §6): the four heads and the loss by their formulas, the neighbour key mask, the
global branch (spot order, every spot of the slide), named settings, and the plugin end to end on the
synthetic dataset with the trainable and the frozen target encoder, with prompt fine-tuning."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from stbench.benchmark import resolve_config
from stbench.errors import ConfigError
from stbench.method import FitContext
from stbench.plugins import load_plugins
from stbench.run import SlideStore, execute, resolve_plan
from stbench_plugins.triplex import SETTINGS, TRIPLEXConfig, triplex_needs, triplex_patches
from stbench_plugins.triplex.model import TRIPLEX, TRIPLEXNet, triplex_loss

TINY = dict(backbone="test_resnet", backbone_weights="random", input_px=32, dim=16, depth1=1, depth2=2, depth3=1,
            heads1=2, heads2=2, heads3=2, epochs=2, batch_size=16)
DATA = ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]
VARIANTS = {"trainable": {}, "frozen": {"backbone": "frozen"}}
NET = dict(dim=16, depth1=1, depth2=2, depth3=1, heads1=2, heads2=2, heads3=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plugins():
    return load_plugins(entry_points=False)


def _plan(tmp_path, finetune=False, **settings):
    sets = [f"methods.triplex.{k}={v}" for k, v in {**TINY, **settings}.items()] + DATA
    conf, base = resolve_config("synthetic", sets=sets, shorthands={"finetune": {"enabled": finetune}})
    return resolve_plan(conf, ["triplex"], tmp_path / "run", _plugins(), base)


def _fit(tmp_path, fold=0, **settings):
    plan = _plan(tmp_path, **settings)
    store = SlideStore(plan)
    store.prepare_features()
    store.prepare_patches()
    f = plan.folds[fold]
    genes = store.panel(f)
    method = TRIPLEX(dataclasses.replace(plan.methods["triplex"]))
    train, val = [store.slide(s, genes) for s in f.train], [store.slide(s, genes) for s in f.val]
    method.fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    return method, store, f, genes, train, val


def _net(frozen=False, clamp=False, feat_dim=12, n_genes=5):
    torch.manual_seed(0)
    cfg = TRIPLEXConfig(backbone="frozen" if frozen else "test_resnet", clamp=clamp, **NET)
    backbone = None if frozen else timm.create_model("test_resnet", pretrained=False, num_classes=0)
    return TRIPLEXNet(cfg, feat_dim, n_genes, backbone).eval()


def _inputs(b=4, feat_dim=12, px=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, px, px, generator=g)
    nb = torch.randn(b, 25, feat_dim, generator=g)
    mask = torch.rand(b, 25, generator=g) > 0.3
    mask[:, 12] = True  # the centre tile is the target region
    t_g = torch.randn(b, 16, generator=g)
    return target, nb, mask, t_g


# --- the heads and the loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("clamp", [False, True])
def test_the_four_heads_follow_their_definitions(clamp):
    net = _net(clamp=clamp)
    target, nb, mask, t_g = _inputs()
    with torch.no_grad():
        out = net(target, nb, mask, t_g)
        fmap = net.backbone.forward_features(target)  # (B, c, h, w), unpooled
        assert fmap.shape[-2:] == (2, 2)  # 64 px → 2 × 2 = 4 target tokens
        T_t = net.target_proj(fmap.flatten(2).transpose(1, 2))
        assert T_t.shape == (4, 4, 16)
        T_n = net.neighbour_encoder(net.neighbour_proj(nb), mask)
        q = t_g[:, None]
        z = net.fusion_norm(net.fusion(q, T_t) + net.fusion(q, T_n, mask))[:, 0]
        expected = {"f": net.fc(z), "t": net.fc_target(T_t.sum(1) / T_t.shape[1]),
                    "n": net.fc_neighbour(T_n.sum(1) / 25), "g": net.fc_global(t_g)}
    for key, value in expected.items():
        want = value.clamp(min=0) if clamp else value
        torch.testing.assert_close(out[key], want, rtol=1e-5, atol=1e-6)
    if clamp:
        assert all((v >= 0).all() for v in out.values())
    else:
        assert any((v < 0).any() for v in out.values())  # paper-era: no clamp (AMB-14)


def test_the_loss_and_its_gradient_match_the_formula():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 5))
    p = {k: rng.normal(size=(6, 5)) for k in "ftng"}
    alpha = 0.3
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    want = mse(p["f"], y) + sum((1 - alpha) * mse(p[b], y) + alpha * mse(p["f"], p[b]) for b in "tng")
    pt = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    got = triplex_loss(pt, torch.tensor(y), alpha)
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
    got.backward()
    n = y.size
    # no stop-gradient: the distillation term reaches both the fused and each branch prediction
    grad_f = 2 / n * ((p["f"] - y) + alpha * sum(p["f"] - p[b] for b in "tng"))
    np.testing.assert_allclose(pt["f"].grad.numpy(), grad_f, rtol=1e-10)
    for b in "tng":
        grad_b = 2 / n * ((1 - alpha) * (p[b] - y) + alpha * (p[b] - p["f"]))
        np.testing.assert_allclose(pt[b].grad.numpy(), grad_b, rtol=1e-10)


def test_a_masked_neighbour_changes_nothing_but_the_neighbour_mean():
    net = _net()
    target, nb, mask, t_g = _inputs()
    changed = nb.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), nb.shape[-1]) * 10
    with torch.no_grad():
        a, b = net(target, nb, mask, t_g), net(target, changed, mask, t_g)
    for key in ("f", "t", "g"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["n"], b["n"])  # ŷ_n's mean includes the masked tokens (§6)


# --- the global branch ---------------------------------------------------------------------------------


def _slide_grid(n=30, seed=0):
    rng = np.random.default_rng(seed)
    cells = rng.choice(8 * 9, size=n, replace=False)  # a sparse grid with gaps
    return torch.as_tensor(np.stack([cells % 9 + 3, cells // 9 - 2], 1), dtype=torch.int64)


def test_the_global_branch_reads_tokens_back_in_the_spots_order():
    net = _net(frozen=True)
    grid = _slide_grid()
    feats = torch.randn(len(grid), 12, generator=torch.Generator().manual_seed(2))
    perm = torch.as_tensor(np.random.default_rng(5).permutation(len(grid)))
    with torch.no_grad():
        a = net.encode_slide(feats, grid)
        b = net.encode_slide(feats[perm], grid[perm])
    torch.testing.assert_close(b, a[perm], rtol=1e-5, atol=1e-6)
    # and the PEG is not a no-op: moving the spots on the grid changes the tokens
    with torch.no_grad():
        moved = net.encode_slide(feats, grid.flip(0))
    assert not torch.allclose(moved, a, atol=1e-4)


def test_the_global_branch_sees_every_spot_of_the_slide():
    net = _net(frozen=True)
    grid = _slide_grid()
    feats = torch.randn(len(grid), 12, generator=torch.Generator().manual_seed(3))
    # the spot farthest from spot 0 on the grid: beyond the PEG's 3 × 3 reach
    far = int(((grid - grid[0]).abs().max(1).values).argmax())
    assert int((grid[far] - grid[0]).abs().max()) > 1
    changed = feats.clone()
    changed[far] += 5.0
    with torch.no_grad():
        a, b = net.encode_slide(feats, grid), net.encode_slide(changed, grid)
    assert not torch.allclose(a[0], b[0], atol=1e-5)


# --- settings ------------------------------------------------------------------------------------------


def test_each_named_setting_fills_its_values():
    for name, values in SETTINGS.items():
        cfg = TRIPLEXConfig(setting=name)
        assert {k: getattr(cfg, k) for k in values} == values
    her2 = TRIPLEXConfig()
    assert (her2.setting, her2.dim, her2.depth1, her2.depth2, her2.depth3, her2.heads2, her2.mlp_ratio3) == \
        ("her2", 512, 1, 3, 3, 16, 1.0)
    late = TRIPLEXConfig(setting="her2_2024_09")
    assert (late.depth1, late.depth2, late.depth3, late.heads1, late.heads2, late.heads3, late.mlp_ratio3,
            late.dropout1, late.dropout2, late.dropout3) == (1, 5, 4, 4, 8, 4, 4.0, 0.4, 0.3, 0.3)
    assert (her2.lr, her2.epochs, her2.batch_size, her2.patience, her2.step_size, her2.gamma, her2.alpha,
            her2.finetune_lr, her2.clamp, her2.optimizer) == (1e-4, 200, 128, 20, 50, 0.9, 0.3, 1e-6, False, "adam_step")


def test_an_explicit_field_wins_over_the_setting():
    cfg = TRIPLEXConfig(setting="cscc", depth2=4, dropout1=0.0)
    assert (cfg.depth1, cfg.depth2, cfg.depth3, cfg.dropout1, cfg.heads1) == (2, 4, 4, 0.0, 8)


def test_an_unknown_setting_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        TRIPLEXConfig(setting="her3")
    assert "\n" not in str(exc.value) and "methods.triplex.setting" in str(exc.value) and "'her3'" in str(exc.value)
    with pytest.raises(ConfigError, match="methods.triplex.setting"):
        _plan(tmp_path, setting="her3")
    with pytest.raises(ConfigError, match="methods.triplex.depth2"):
        TRIPLEXConfig(depth2=1)


def test_needs_and_patches_follow_the_config():
    base = {"expression", "coords", "neighbour_features", "image_features", "slide_context"}
    assert triplex_needs(TRIPLEXConfig()) == base | {"image_patches"}
    assert triplex_needs(TRIPLEXConfig(backbone="frozen")) == base
    (request,) = triplex_patches(TRIPLEXConfig())
    assert (request.kind, request.size_um, request.out_px) == ("spot", 112.0, 224)


# --- the method on the synthetic dataset ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_loss_decreases(tmp_path, variant):
    method, *_ = _fit(tmp_path, **{**VARIANTS[variant], "epochs": 5, "lr": 1e-3, "patience": 0})
    losses = [r["train_loss"] for r in method.history]
    assert len(losses) == 5 and np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]
    assert all(np.isfinite(r["val_pcc"]) for r in method.history)


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_with_finetuning(tmp_path, variant):
    settings = {**VARIANTS[variant], "epochs": 1}
    plan = _plan(tmp_path, finetune=True, **settings)
    execute(plan, verbose=False)
    out = tmp_path / "run"
    res = pd.read_csv(out / "results.csv")
    assert len(res) == sum(len(f.test) for f in plan.folds) and np.isfinite(res["pcc"]).all()
    assert res["finetuned"].all()
    recorded = json.loads((out / "run.json").read_text())["methods"]["triplex"]
    assert {k: recorded[k] for k in {**TINY, **settings}} == {**TINY, **settings}
    assert recorded["setting"] == "her2" and recorded["dropout1"] == 0.2 and recorded["mlp_ratio3"] == 1.0
    summary = json.loads(pd.read_csv(out / "fold_results.csv")["fit_summary"][0])
    assert summary["epochs_run"] == 1 and summary["backbone"] == settings.get("backbone", "test_resnet")


def test_finetuning_uses_triplex_rate_and_moves_the_weights(tmp_path):
    from stbench.method import FinetuneSettings

    method, store, fold, genes, *_ = _fit(tmp_path, backbone="frozen", epochs=1)
    assert method.finetune_lr == 1e-6
    masked = store.slide(fold.test[0], genes).masked(np.array([1, 4, 9, 16, 25]))
    before = method.predict(masked)
    method.finetune(masked, FinetuneSettings(epochs=2, lr=1e-2, seed=0))
    after = method.predict(masked)
    assert np.isfinite(after).all() and not np.allclose(before, after)


def test_a_ciga_style_lightning_checkpoint_loads_into_the_target_encoder(tmp_path):
    from stbench.errors import DataError
    from stbench_plugins.triplex.checkpoint import load_backbone_file

    source = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    # Ciga's file: {"state_dict": {"model.resnet.<torchvision name>": tensor, ...}, ...} with a classifier
    wrapped = {"state_dict": {f"model.resnet.{k}": v.clone() for k, v in source.state_dict().items()}, "epoch": 3}
    path = tmp_path / "tenpercent_test.ckpt"
    torch.save(wrapped, path)
    target = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    digest = load_backbone_file(target, path, arch="test_resnet", option="methods.triplex.backbone_weights")
    assert isinstance(digest, str) and digest
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, source.state_dict()[k])
    bad = {"state_dict": {f"model.resnet.{k}": v for k, v in list(source.state_dict().items())[2:]}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(DataError, match="missing keys"):
        load_backbone_file(target, tmp_path / "bad.ckpt", arch="test_resnet", option="methods.triplex.backbone_weights")


def test_the_method_trains_from_a_weights_file(tmp_path):
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    path = tmp_path / "w.pth"
    torch.save({f"model.{k}": v for k, v in net.state_dict().items()}, path)
    method, *_ = _fit(tmp_path, backbone_weights=str(path), epochs=1)
    assert method.weights_id not in ("random-init", "none") and len(method.history) == 1
