"""PHG2ST's options for the PH2ST code's behaviour (METHODS.md §8.2-8.4): each changes what it names,
checked against a hand computation, and the phg2st_code preset turns them all on."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from stbench import config as cfg_module
from stbench.benchmark import resolve_config
from stbench.method import FitContext
from stbench.prompts import n_prompts
from stbench_plugins.phg2st import PHG2STConfig
from stbench_plugins.phg2st.hypergraph import HypergraphConv, code_neighbour_hypergraphs, code_spot_hypergraph
from stbench_plugins.phg2st.model import PHG2ST
from test_phg2st import TINY, _fit, _ready, _slide, _spy_fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESET = REPO / "benchmarks/stbench_benchmarks/her2/phg2st_code.yaml"
CPU = REPO / "benchmarks/stbench_benchmarks/her2/cpu.yaml"
#: every option of the code's behaviour, at its code value
CODE = dict(spot_hyperedges="code", neighbour_hyperedges="code", pyg_compat=True, hgnn_variant="code", fusion="code",
            heads="code", prompt_residual=True, eval_dropout=True, batching="spots", batch_size=256, train_prompt_ratio=0.1,
            optimizer="code")


def test_every_code_option_is_off_by_default():
    default = PHG2STConfig()
    for key, value in CODE.items():
        if key != "batch_size":  # only read with batching="spots"
            assert getattr(default, key) != value, key


def test_the_preset_is_cpu_size_plus_every_code_option():
    preset = cfg_module.read_yaml(PRESET, "preset")["methods"]["phg2st"]
    cpu = cfg_module.read_yaml(CPU, "preset")["methods"]["phg2st"]
    assert preset == {**cpu, **CODE}
    conf, _ = resolve_config("her2", str(PRESET))
    assert conf.preset.startswith("phg2st_code")
    method = PHG2ST(cfg_module.build(PHG2STConfig, conf.methods["phg2st"], "methods.phg2st"))
    assert all(getattr(method.config, k) == v for k, v in CODE.items())


# --------------------------------------------------------------------------------------- hypergraphs


def test_code_spot_hyperedges_are_used():
    s = _slide()
    paper, paper_state = _ready(PHG2STConfig(**TINY), s)
    code, state = _ready(PHG2STConfig(**TINY, spot_hyperedges="code"), s)
    edges, weights = code_spot_hypergraph(s.features["spot"], s.positions_um(), k=4)
    np.testing.assert_array_equal(state.parts[0].edges, edges)
    np.testing.assert_array_equal(state.parts[0].weights, weights)
    assert not np.array_equal(paper_state.parts[0].edges, edges)


def test_code_neighbour_hyperedges_are_used():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY, neighbour_hyperedges="code"), s)
    raw, mask = state.nb_raw[:6], state.nb_mask[:6]
    edges, weights = m._neighbour_graph(raw, mask)
    want_edges, want_weights = code_neighbour_hypergraphs(raw)
    assert torch.equal(edges, want_edges) and torch.equal(weights, want_weights)
    assert edges.shape[1] > 6 * 25 * 5  # complete, not 5 per hyperedge
    paper_edges, _ = _ready(PHG2STConfig(**TINY), s)[0]._neighbour_graph(raw, mask)
    assert paper_edges.shape[1] < edges.shape[1]


def test_code_hypergraph_block_is_two_convolutions_with_a_residual():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY, hgnn_variant="code"), s)
    block, t = m.net.spot_hg, state.tensors[0]
    assert block.hops == 2
    x = m.net.proj(state.spot[t["inputs"]])
    with torch.no_grad():
        n = len(t["weights"])
        h = block.norm(F.relu(block.conv(x, t["edges"], t["weights"], num_edges=n)))
        torch.testing.assert_close(block(x, t["edges"], t["weights"]), block.conv2(h, t["edges"], t["weights"], num_edges=n) + x)


def test_pyg_compat_reaches_every_convolution_and_is_pyg():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY, pyg_compat=True), s)
    convs = [mod for mod in m.net.modules() if isinstance(mod, HypergraphConv)]
    assert len(convs) == 2 and all(c.pyg_compat for c in convs)
    assert not any(c.pyg_compat for c in _ready(PHG2STConfig(**TINY), s)[0].net.modules() if isinstance(c, HypergraphConv))
    t, conv = state.tensors[0], m.net.spot_hg.conv
    x = m.net.proj(state.spot[t["inputs"]])
    pyg = HypergraphConv(16, 16)
    pyg.load_state_dict({k: v for k, v in conv.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(conv(x, t["edges"], t["weights"]), pyg(x, t["edges"], t["weights"]))
        conv.pyg_compat = False  # the documented formula differs with unequal weights
        assert not torch.allclose(conv(x, t["edges"], t["weights"]), pyg(x, t["edges"], t["weights"]))


# ------------------------------------------------------------------------------------ fusion and heads


def test_code_fusion_and_code_heads():
    s = _slide()
    m, state = _ready(PHG2STConfig(**TINY, fusion="code", heads="code"), s)
    y = np.zeros_like(s.expr)
    y[::5] = s.expr[::5]
    with torch.no_grad():
        p_z, branches = m._forward_part(state, 0, y)
        t_s = m._spot_tokens(state, 0)
        t_n, mask = m._neighbour_tokens([(state, state.parts[0].core)])
        q = m.net.prompt(torch.from_numpy(y))[:, None]
        # Z = LN(Cross(Φ_p, T_s) + Cross(Φ_p, T_n)), the second cross-attention without the key mask
        z = m.net.fusion_norm(m.net.cross(q, t_s[:, None])[:, 0] + m.net.cross(q, t_n)[:, 0])
        torch.testing.assert_close(p_z, m.net.head_z(z))
        expected = [m.net.head_prompt(q[:, 0]), m.net.head_nb(t_n.mean(1)), m.net.head_spot(t_s)]
    assert len(branches) == 3
    for got, want in zip(branches, expected):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------- evaluation dropout


@pytest.mark.parametrize("which", ["hypergraph", "attention"])
def test_eval_dropout_stays_on_at_prediction_and_is_seeded(which):
    s = _slide()
    # one dropout at a time: the hypergraph blocks' (0.5) or the global encoder's attention's (0.3)
    tiny = {**TINY, "dropout_hypergraph": 0.5 * (which == "hypergraph"), "attn_dropout_global": 0.3 * (which == "attention")}
    m = _fit(PHG2STConfig(**tiny, eval_dropout=True), [s])
    masked = s.masked(np.arange(6))
    first = m.predict(masked)
    np.testing.assert_array_equal(first, m.predict(masked))  # seeded: a prediction repeats
    m.seed = 1
    assert not np.allclose(first, m.predict(masked))  # but it is random
    switches = [mod for mod in m.net.modules() if hasattr(mod, "eval_dropout") or hasattr(mod, "at_eval")]
    assert len(switches) == 2 + 2  # the two hypergraph blocks and the global encoder's two attentions
    for mod in switches:  # the same weights, the switch off: no randomness left at prediction
        mod.eval_dropout = mod.at_eval = False
    off = m.predict(masked)
    m.seed = 0
    np.testing.assert_array_equal(off, m.predict(masked))
    assert not np.allclose(off, first)


# --------------------------------------------------------------------------------- batches, optimiser


def test_spot_batches_pooled_across_slides(monkeypatch):
    a, b = _slide(seed=1, name="A"), _slide(seed=2, n_side=6, name="B")
    batches, encoded = [], []
    forward, tokens = PHG2ST._forward_spots, PHG2ST._spot_tokens
    monkeypatch.setattr(PHG2ST, "_forward_spots", lambda self, groups, y: batches.append(
        [(len(st.nb), len(idx)) for st, idx in groups]) or forward(self, groups, y))
    monkeypatch.setattr(PHG2ST, "_spot_tokens", lambda self, st, i: encoded.append(len(st.parts[i].local)) or tokens(self, st, i))
    m, prompts = _spy_fit(PHG2STConfig(**{**TINY, "epochs": 1}, batching="spots", batch_size=40, train_prompt_ratio=0.1),
                          [a, b], monkeypatch=monkeypatch)
    sizes = [sum(n for _, n in batch) for batch in batches]
    assert sizes == [40, 40, 20]  # 64 + 36 spots in batches of 40
    assert any(len(batch) == 2 for batch in batches)  # pooled across slides
    assert [len(p) for p in prompts] == [n_prompts(n, 0.1) for n in sizes]  # 10 % of each batch
    # each batch encodes the whole slide (one part each here) of every slide it draws from
    assert encoded == [slide for batch in batches for slide, _ in batch]


def test_spot_batches_read_the_right_rows(monkeypatch):
    a, b = _slide(seed=1, name="A"), _slide(seed=2, n_side=6, name="B")
    m, _ = _ready(PHG2STConfig(**TINY), a)
    m._prepare(b)
    sa, sb = m._states["A"], m._states["B"]
    ia, ib = np.array([3, 60, 7]), np.array([35, 0])
    y = np.zeros((5, a.n_genes), np.float32)
    with torch.no_grad():
        p_z, _ = m._forward_spots([(sa, ia), (sb, ib)], y)
        whole_a, _ = m._forward_part(sa, 0, np.zeros((64, a.n_genes), np.float32))
        whole_b, _ = m._forward_part(sb, 0, np.zeros((36, a.n_genes), np.float32))
    torch.testing.assert_close(p_z, torch.cat([whole_a[ia], whole_b[ib]]))


def test_code_optimizer_is_adamw_with_a_plateau_schedule(monkeypatch):
    s, v = _slide(seed=4), _slide(seed=5, name="V")
    monkeypatch.setattr(PHG2ST, "_validate", lambda self, val: 0.1)  # never improves
    built = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: built.append("AdamW") or adamw(*a, **k))
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 13, "patience": 50, "lr": 1e-3}, optimizer="code"), [s], [v])
    lrs = [h["lr"] for h in m.history]
    assert built == ["AdamW"]
    assert lrs[:12] == [1e-3] * 12 and lrs[12] == pytest.approx(1e-4)  # after 10 + 1 epochs without improvement
    paper = _fit(PHG2STConfig(**{**TINY, "epochs": 5, "patience": 50, "lr": 1e-3, "step_size": 2, "gamma": 0.5}), [s], [v])
    assert [h["lr"] for h in paper.history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert built == ["AdamW"]  # the paper's optimiser is Adam


def test_the_code_preset_trains_and_predicts():
    s, v = _slide(seed=1), _slide(seed=3, name="V")
    m = PHG2ST(PHG2STConfig(**{**TINY, **CODE, "batch_size": 32}))
    m.fit([s], [v], FitContext(seed=0, genes=s.genes))
    pred = m.predict(s.masked(np.arange(6)))
    assert pred.shape == s.expr.shape and np.isfinite(pred).all()
