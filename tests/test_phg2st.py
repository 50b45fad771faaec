"""PHG2ST end to end on tiny synthetic slides: wiring against hand computations, prompts, training,
model selection, parts of large slides, the CLI. The PH2ST code's options: tests/test_phg2st_code.py."""

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from stbench.cli import main
from stbench.errors import ConfigError, DataError
from stbench.method import FitContext
from stbench.metrics import pcc
from stbench.prompts import n_prompts
from stbench_plugins.phg2st import PHG2STConfig
from stbench_plugins.phg2st.model import PHG2ST

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: METHODS.md §8.4 "CPU smoke" sizes, without dropout (outputs are then deterministic)
TINY = dict(dim=16, depth_global=2, heads_global=2, depth_neighbour=1, heads_neighbour=2, depth_cross=1,
            heads_cross=2, epochs=2, dropout_global=0.0, dropout_neighbour=0.0, dropout_cross=0.0, dropout_hypergraph=0.0,
            attn_dropout_global=0.0, dropout_prompt=0.0)


def _slide(seed=0, n_side=8, genes=5, dim=6, name="S"):
    """A slide with features that explain expression, and neighbour features around each spot."""
    from stbench.data.model import Slide

    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    grid = np.c_[xs.ravel(), ys.ravel()]
    n = len(grid)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    expr = np.abs(feats[:, :genes] @ rng.normal(size=(genes, genes)) + 3).astype(np.float32)
    nb = (feats[:, None, :] + 0.1 * rng.normal(size=(n, 25, dim))).astype(np.float32)
    mask = np.ones((n, 25), bool)
    mask[:3, :5] = False  # a few sub-patches outside the image
    nb[~mask] = 0.0  # as the harness stores them
    return Slide(name=name, patient="P", spot_ids=np.array([f"{x}x{y}" for x, y in grid]), genes=np.array([f"g{i}" for i in range(genes)]),
                 expr=expr, grid=grid, pixel=grid * 100.0, mpp=1.0,
                 features={"spot": feats, "spot_mask": np.ones(n, bool), "neighbour": nb, "neighbour_mask": mask})


def _fit(cfg, train, val=None):
    """Fit; without validation slides the (expected) warning is checked and silenced."""
    m = PHG2ST(cfg)
    if val is None:
        with pytest.warns(UserWarning, match="no validation slides"):
            m.fit(list(train), [], FitContext(seed=0, genes=train[0].genes))
    else:
        m.fit(list(train), list(val), FitContext(seed=0, genes=train[0].genes))
    return m


def _ready(cfg, slide):
    """A method with an untrained network and the slide's inputs prepared (no training)."""
    m = PHG2ST(cfg)
    m.mu_, m.sd_ = np.zeros(slide.features["spot"].shape[1]), np.ones(slide.features["spot"].shape[1])
    torch.manual_seed(0)
    from stbench_plugins.phg2st.network import PHG2STNet

    m.net = PHG2STNet(cfg, slide.features["spot"].shape[1], slide.n_genes).eval()
    return m, m._prepare(slide)


def _parts(m, state, y):
    """The network's pieces for the one part of a small slide: T_s, T_n, the key mask, the prompt query."""
    t_s = m._spot_tokens(state, 0)
    t_n, mask = m._neighbour_tokens([(state, state.parts[0].core)])
    q = m.net.prompt(torch.from_numpy(y))
    return t_s, t_n, mask, q


# ------------------------------------------------------------------------------------------- wiring


def test_sum_fusion_and_the_paper_heads():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY), s)
    y = np.zeros_like(s.expr)
    y[::7] = s.expr[::7]
    seen = {}
    for name in ("head_z", "head_spot", "head_nb"):
        getattr(m.net, name).register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    with torch.no_grad():
        p_z, branches = m._forward_part(state, 0, y)
        t_s, t_n, mask, q = _parts(m, state, y)
        t_ng = m.net.cross(q[:, None], t_n, mask)[:, 0]
    torch.testing.assert_close(seen["head_z"], t_ng + t_s)  # eq. 6: Z = T_n^G + T_s
    torch.testing.assert_close(seen["head_spot"], t_s)  # p_spot from T_s
    torch.testing.assert_close(seen["head_nb"], t_ng)  # p_neighbor from T_n^G
    assert len(branches) == 2 and m.net.head_prompt is None and m.net.fusion_norm is None
    torch.testing.assert_close(p_z, m.net.head_z(t_ng + t_s))


def test_the_global_encoder_runs_one_block_then_peg_then_the_rest():
    s = _slide()
    m, state = _ready(PHG2STConfig(**{**TINY, "depth_global": 3}), s)
    enc, order = m.net.global_enc, []
    named = [("first", enc.first), ("peg", enc.peg)] + [(f"rest{i}", b) for i, b in enumerate(enc.rest)] + [("norm", enc.norm)]
    for name, module in named:
        module.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
    with torch.no_grad():
        m._spot_tokens(state, 0)
    assert order == ["first", "peg", "rest0", "rest1", "norm"]


def test_the_spot_branch_reads_the_hypergraph_block_output():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY), s)
    t = state.tensors[0]
    with torch.no_grad():
        h = m.net.spot_hg(m.net.proj(state.spot[t["inputs"]]), t["edges"], t["weights"])
        torch.testing.assert_close(m._spot_tokens(state, 0), m.net.global_enc(h, t["grid"]))
        # eq. 3: Dropout(LN(ReLU(HGConv(Φ_s)))) (dropout 0 here)
        conv = m.net.spot_hg.conv(m.net.proj(state.spot), t["edges"], t["weights"])
        torch.testing.assert_close(h, m.net.spot_hg.norm(F.relu(conv)))


def test_relative_position_bias_against_a_hand_computed_attention():
    s = _slide()
    cfg = PHG2STConfig(**{**TINY, "depth_neighbour": 1, "heads_neighbour": 2})
    m, state = _ready(cfg, s)
    enc = m.net.nb_enc
    torch.manual_seed(3)
    with torch.no_grad():
        enc.bias[0].copy_(torch.randn_like(enc.bias[0]))  # non-zero biases, one per head and offset
    x = torch.randn(3, 25, 16)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[1, [0, 4, 20]] = False
    block = enc.blocks[0]
    # by hand: token t sits at (row, col) = divmod(t, 5); the bias of (i, j) is indexed by (|Δrow|, |Δcol|)
    rc = [divmod(t, 5) for t in range(25)]
    offset = torch.tensor([[abs(rc[i][0] - rc[j][0]) * 5 + abs(rc[i][1] - rc[j][1]) for j in range(25)] for i in range(25)])
    with torch.no_grad():
        h = block.norm1(x)
        q, k, v = block.attn.qkv(h).view(3, 25, 3, 2, 8).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(8) + enc.bias[0][:, offset][None]
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 25, 16)
        y = x + block.attn.out(att)
        y = y + block.ffn(block.norm2(y))
        torch.testing.assert_close(enc(x, mask), enc.norm(y), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(enc(x, mask), enc.norm(x + block.attn(h, None, mask) + block.ffn(block.norm2(x))))


@pytest.mark.parametrize("residual", [False, True])
def test_prompt_projection_is_eq_1(residual):
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY, prompt_residual=residual), s)
    proj = m.net.prompt
    y = torch.from_numpy(s.expr.copy())
    y[5:] = 0  # masked expression: prompts at spots 0-4
    with torch.no_grad():
        w, fc, ln = proj.w, proj.fc, proj.norm
        if residual:  # code: LN(Dropout(FC(GELU(YW + b))) + (YW + b))
            z = y @ w.weight.T + w.bias
            expected = F.layer_norm(fc(F.gelu(z)) + z, (16,), ln.weight, ln.bias)
        else:  # paper eq. 1: LN(Dropout(FC(GELU(Y W)))), W without bias
            assert w.bias is None
            expected = F.layer_norm(fc(F.gelu(y @ w.weight.T)), (16,), ln.weight, ln.bias)
        torch.testing.assert_close(proj(y), expected)
        # every non-prompt spot gets the one vector Φ_p(0) (METHODS.md §8.2 (1))
        assert torch.allclose(proj(y)[5:], proj(y)[5:6].expand(len(y) - 5, -1))


def test_prompt_changes_only_the_prediction_of_the_prompted_spot():
    s = _slide()
    m = _fit(PHG2STConfig(**TINY), [s])
    base = m.predict(s.masked(np.array([9])))
    changed = dataclasses.replace(s, expr=s.expr.copy())
    changed.expr[5] += 5.0
    out = m.predict(changed.masked(np.array([5, 9])))
    assert not np.allclose(out[5], base[5])
    # METHODS.md §8.4's structural caveat: a prompt is the query of its own spot only
    others = np.setdiff1d(np.arange(s.n_spots), [5])
    np.testing.assert_allclose(out[others], base[others], atol=1e-5)
    ablated = _fit(PHG2STConfig(**TINY, use_prompt=False), [s])
    np.testing.assert_allclose(ablated.predict(s.masked(np.array([9]))), ablated.predict(changed.masked(np.array([5, 9]))), atol=1e-6)


# ----------------------------------------------------------------------------------------- training


def _spy_fit(cfg, train, val=None, monkeypatch=None):
    """Fit while recording the prompt rows (non-zero rows of Y_masked) of every training step."""
    from stbench_plugins.phg2st import model as model_module

    prompts, original = [], model_module.PHG2STNet

    def build(*args, **kwargs):
        net = original(*args, **kwargs)
        fuse = net.fuse

        def spy(t_s, t_n, mask, y_masked):
            if net.training:
                prompts.append(np.flatnonzero(y_masked.abs().sum(1).cpu().numpy() > 0))
            return fuse(t_s, t_n, mask, y_masked)

        net.fuse = spy
        return net

    monkeypatch.setattr(model_module, "PHG2STNet", build)
    return _fit(cfg, train, val), prompts


def test_training_prompts_are_30_percent_redrawn_every_step(monkeypatch):
    s = _slide()
    m, prompts = _spy_fit(PHG2STConfig(**{**TINY, "epochs": 4}), [s], monkeypatch=monkeypatch)
    assert len(prompts) == 4  # one step per epoch: one slide, one part
    assert all(len(p) == n_prompts(64, 0.3) == 19 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 4  # a new draw every step


def test_loss_on_non_prompt_leaves_the_prompts_out(monkeypatch):
    from stbench_plugins.phg2st import model as model_module

    s = _slide()
    s.expr[:] += np.arange(s.n_spots, dtype=np.float32)[:, None] * 10  # each spot's row identifies it
    targets = []
    loss = model_module.phg2st_loss
    monkeypatch.setattr(model_module, "phg2st_loss", lambda p_z, b, truth, lam: targets.append(truth.numpy().copy()) or loss(p_z, b, truth, lam))
    for loss_on in ("non_prompt", "all"):
        targets.clear()
        m, prompts = _spy_fit(PHG2STConfig(**{**TINY, "loss_on": loss_on}), [s], monkeypatch=monkeypatch)
        assert len(targets) == len(prompts) == 2
        for truth, prompt in zip(targets, prompts):
            rows = [int(np.argmin(np.abs(s.expr[:, 0] - t))) for t in truth[:, 0]]
            np.testing.assert_allclose(truth, s.expr[rows])
            everything = set(range(s.n_spots))
            assert sorted(rows) == sorted(everything - set(prompt.tolist()) if loss_on == "non_prompt" else everything)


def test_feature_statistics_come_from_training_slides_only():
    train = _slide(seed=1)
    train.features["spot"] = train.features["spot"] + 5.0
    val = _slide(seed=2, name="V")
    val.features["spot"] = val.features["spot"] - 50.0
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 1, "standardise_features": True}), [train], [val])
    np.testing.assert_allclose(m.mu_, train.features["spot"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.sd_, train.features["spot"].std(0), rtol=1e-5)


def test_defaults_follow_the_sources():
    cfg = PHG2STConfig()
    assert (cfg.standardise_features, cfg.init, cfg.attn_dropout_global, cfg.dropout_prompt) == (False, "torch", 0.3, 0.4)
    s = _slide()
    m, state = _ready(PHG2STConfig(**{**TINY, "attn_dropout_global": 0.3}), s)
    # PyTorch's default initialisation: linear biases are not zeroed (trunc_normal zeroes them)
    assert m.net.head_spot.bias.abs().sum() > 0 and m.net.prompt.fc.bias.abs().sum() > 0
    vit, _ = _ready(PHG2STConfig(**{**TINY, "init": "trunc_normal"}), s)
    assert vit.net.prompt.fc.bias.abs().sum() == 0 and vit.net.prompt.fc.weight.std() < 0.05
    # the global encoder's attention drops probabilities in training, not at evaluation
    att = m.net.global_enc.first.attn
    assert att.attn_dropout == 0.3
    x = torch.randn(1, 30, 16)
    att.train()
    torch.manual_seed(0)
    a = att(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, att(x))
    att.eval()
    assert torch.equal(att(x), att(x))
    # the neighbour hypergraphs are weighted
    edges, weights = m._neighbour_graph(state.nb_raw[:4], state.nb_mask[:4])
    assert not torch.allclose(weights, torch.ones_like(weights))


def test_tiny_phg2st_overfits_a_tiny_slide():
    s = _slide(seed=1)
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 150, "lr": 3e-3, "step_size": 1000, "dim": 32}), [s])
    pred = m.predict(s.masked(np.arange(0, s.n_spots, 10)))
    mse = float(((pred - s.expr) ** 2).mean())
    baseline = float(((s.expr - s.expr.mean(0)) ** 2).mean())
    assert mse < 0.2 * baseline, (mse, baseline)
    assert m.history[-1]["train_loss"] < m.history[0]["train_loss"]


# ---------------------------------------------------------------------------------- model selection


def test_the_best_checkpoint_is_restored(monkeypatch):
    s, v = _slide(seed=4), _slide(seed=5, name="V")
    scores, snapshots = iter([0.1, 0.5, 0.2, 0.3]), []

    def scripted(self, val):
        snapshots.append(copy.deepcopy(self.net.state_dict()))
        return next(scores)

    monkeypatch.setattr(PHG2ST, "_validate", scripted)
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 4, "lr": 1e-2}), [s], [v])
    final = m.net.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)
    assert m.summary()["selection"] == "val_pcc" and m.summary()["best_epoch"] == 1 and m.summary()["best_val_pcc"] == 0.5


def test_early_stopping_after_patience(monkeypatch):
    s, v = _slide(seed=4), _slide(seed=5, name="V")
    monkeypatch.setattr(PHG2ST, "_validate", lambda self, val: 0.2 if len(self.history) == 0 else 0.1)
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 50, "patience": 3}), [s], [v])
    assert len(m.history) == 4  # epoch 0 is best, three epochs without improvement


def test_validation_scores_the_non_prompt_spots_only():
    s, v = _slide(seed=4), _slide(seed=5, name="V")
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 1}), [s], [v])
    idx = m._val_prompts["V"]
    v.expr[idx] += 40.0 * np.arange(len(idx))[:, None]  # prompt spots far from everything else
    pred = m._predict_with(v, idx, v.expr[idx])
    keep = np.setdiff1d(np.arange(v.n_spots), idx)
    assert m._validate([v]) == pytest.approx(pcc(pred[keep], v.expr[keep]).value)
    assert m._validate([v]) != pytest.approx(pcc(pred, v.expr).value)
    assert len(idx) == n_prompts(v.n_spots, 0.1)


def test_without_validation_the_training_loss_selects_and_says_so():
    s = _slide()
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 3}), [s])  # checks the warning
    summary = m.summary()
    assert summary["selection"] == "train_loss" and "best_val_pcc" not in summary
    losses = [h["train_loss"] for h in m.history]
    assert summary["best_train_loss"] == pytest.approx(min(losses)) and summary["best_epoch"] == int(np.argmin(losses))


def test_undefined_validation_keeps_the_last_weights_and_says_so():
    s, v = _slide(seed=4), _slide(seed=5, name="V")
    v.expr[:] = 1.0  # every gene constant: the validation PCC is undefined
    m = PHG2ST(PHG2STConfig(**{**TINY, "epochs": 2}))
    with pytest.warns(UserWarning, match="undefined at every epoch"):
        m.fit([s], [v], FitContext(seed=0, genes=s.genes))
    assert m.summary()["selection"] == "last_epoch" and m.summary()["best_epoch"] == 1


# ---------------------------------------------------------------------------------- large slides, inputs


def test_a_large_slide_runs_in_parts_and_every_spot_is_predicted_once(monkeypatch):
    s = _slide(seed=6, n_side=12)
    m = _fit(PHG2STConfig(**{**TINY, "max_spots": 40}), [s])
    state = m._prepare(s)
    assert len(state.parts) == 4 and all(len(p.local) > len(p.core) for p in state.parts)  # halos
    calls = []
    forward = PHG2ST._forward_part
    monkeypatch.setattr(PHG2ST, "_forward_part", lambda self, st, i, y: calls.append(i) or forward(self, st, i, y))
    pred = m.predict(s.masked(np.arange(10)))
    assert sorted(calls) == [0, 1, 2, 3] and np.isfinite(pred).all()  # each core predicted once


def test_duplicate_grid_cells_are_refused():
    s = _slide()
    s.grid = s.grid.copy()
    s.grid[1] = s.grid[0]
    with pytest.raises(DataError, match="share grid cells"):
        PHG2ST(PHG2STConfig(**TINY)).fit([s], [_slide(name="V")], FitContext(seed=0, genes=s.genes))


def test_bad_option_is_a_config_error():
    with pytest.raises(ConfigError, match="methods.phg2st.fusion"):
        PHG2ST(PHG2STConfig(fusion="concat"))
    with pytest.raises(ConfigError, match="methods.phg2st.batching"):
        PHG2ST(PHG2STConfig(batching="pooled"))


def _tiny_sets():
    return [f"methods.phg2st.{k}={v}" for k, v in TINY.items()] + ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]


@pytest.mark.parametrize("strategy", ["random", "poisson_disc", "sparse_square", "dense_square"])
def test_cli_run_with_every_prompt_strategy(tmp_path, strategy):
    argv = ["run", "--methods", "phg2st,prompt_knn", "--out", str(tmp_path / strategy), "--quiet", "--prompt-strategy", strategy]
    for item in _tiny_sets():
        argv += ["--set", item]
    assert main(argv) == 0
    res = pd.read_csv(tmp_path / strategy / "results.csv")
    assert set(res["method"]) == {"phg2st", "prompt_knn"} and res["pcc"].notna().any()
