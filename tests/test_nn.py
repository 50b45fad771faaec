"""Shared torch building blocks (stbench.nn) against the specification (METHODS.md §3, §7.2, §8)."""

import pytest
import torch
from torch import nn

from stbench.nn import PEG, CrossEncoder, NeighborEncoder, PromptProjection, ResMLP, relative_offsets


def test_relative_offsets_have_25_distinct_values_symmetric():
    off = relative_offsets(5)
    assert off.shape == (25, 25) and len(torch.unique(off)) == 25
    assert torch.equal(off, off.T) and (off.diagonal() == 0).all()
    assert off[0, 24] == 4 * 5 + 4 and off[12, 13] == 1 and off[12, 7] == 5  # (|Δrow|, |Δcol|)


def test_key_mask_hides_sub_patches_outside_the_image():
    torch.manual_seed(0)
    enc = CrossEncoder(8, 1, 2, 2.0, 0.0).eval()
    q = torch.randn(3, 1, 8)
    kv = torch.randn(3, 25, 8)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[:, 20:] = False
    changed = kv.clone()
    changed[:, 20:] = 100 * torch.randn(3, 5, 8)  # anything outside the image must not matter
    a = enc(q, kv, mask)
    b = enc(q, changed, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(enc(q, kv), enc(q, changed))  # without the mask it would matter


def test_neighbour_encoder_mask_and_bias():
    torch.manual_seed(0)
    enc = NeighborEncoder(8, 2, 2, 2.0, 0.0).eval()
    x = torch.randn(2, 25, 8)
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[:, :5] = False
    y = x.clone()
    y[:, :5] += 50
    out_x, out_y = enc(x, mask), enc(y, mask)
    torch.testing.assert_close(out_x[:, 5:], out_y[:, 5:])  # valid tokens ignore masked keys
    assert all(float(t.detach().abs().sum()) == 0 for t in enc.bias)  # LeViT-style bias starts at 0


def test_peg_reads_back_in_the_original_spot_order():
    torch.manual_seed(0)
    peg = PEG(4)
    grid = torch.tensor([[0, 0], [1, 0], [0, 1], [4, 4], [1, 1]])
    x = torch.randn(5, 4)
    out = peg(x, grid)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(peg(x[perm], grid[perm]), out[perm])
    # an isolated spot sees only itself through the 3x3 kernel: conv(centre) + x
    w, b = peg.conv.weight[:, 0, 1, 1], peg.conv.bias
    torch.testing.assert_close(out[3], x[3] * w + b + x[3])


def test_prompt_projection_gives_every_unprompted_spot_the_same_vector():
    torch.manual_seed(0)
    proj = PromptProjection(6, 8, 0.0).eval()
    y = torch.zeros(4, 6)
    y[0] = torch.rand(6)
    out = proj(y)
    torch.testing.assert_close(out[1], out[2])  # Φ_p(0): METHODS.md §8.4 structural caveat
    assert not torch.allclose(out[0], out[1])


def test_loss_value_on_a_tiny_example():
    from stbench_plugins.phg2st.model import phg2st_loss

    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pz = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # MSE(pz, g) = 1/4
    ps = torch.tensor([[0.0, 2.0], [3.0, 4.0]])  # MSE(ps, g) = 1/4; MSE(ps, pz) = 2/4
    pn = g.clone()  # MSE(pn, g) = 0; MSE(pn, pz) = 1/4
    lam = 0.3
    expected = 0.25 + (0.7 * 0.25 + 0.3 * 0.5) + (0.7 * 0.0 + 0.3 * 0.25)
    assert float(phg2st_loss(pz, [ps, pn], g, lam)) == pytest.approx(expected)


# --- ResMLP (METHODS.md §7.2 item 4) ---------------------------------------------------------------------


def test_resmlp_output_shape():
    net = ResMLP(12, 8, depth=2, mlp_ratio=2, dropout=0.1).eval()
    assert net(torch.randn(5, 12)).shape == (5, 8)
    assert net(torch.randn(2, 3, 12)).shape == (2, 3, 8)  # any leading dims


def test_resmlp_structure():
    net = ResMLP(12, 8, depth=3, mlp_ratio=2, dropout=0.1)
    # LN(in) → Linear(in→D) → depth × [x + MLP(LN(x))] → LN(D)
    ops = list(net.children())
    assert isinstance(ops[0], nn.LayerNorm) and ops[0].normalized_shape == (12,)
    assert isinstance(ops[-1], nn.LayerNorm) and ops[-1].normalized_shape == (8,)
    assert isinstance(net.proj, nn.Linear) and (net.proj.in_features, net.proj.out_features) == (12, 8)
    assert len(net.blocks) == 3
    for block in net.blocks:
        assert isinstance(block.norm, nn.LayerNorm) and block.norm.normalized_shape == (8,)
        kinds = [type(m) for m in block.mlp]
        assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout]
        assert (block.mlp[0].in_features, block.mlp[0].out_features) == (8, 16)
        assert (block.mlp[3].in_features, block.mlp[3].out_features) == (16, 8)
        assert block.mlp[2].p == 0.1 and block.mlp[4].p == 0.1
    # the forward pass is that chain: rebuild it by hand
    net.eval()
    x = torch.randn(4, 12)
    h = net.proj(net.norm_in(x))
    for block in net.blocks:
        h = h + block.mlp(block.norm(h))
    torch.testing.assert_close(net(x), net.norm_out(h))


def test_resmlp_xavier_init_and_zero_biases():
    torch.manual_seed(0)
    net = ResMLP(300, 200, depth=2, mlp_ratio=2)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 + 2 * 2
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform: U(−b, b)
        w = lin.weight.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.95 * bound  # fills the range (torch's default bound 1/√fan_in is smaller)
        assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert lin.bias is not None and float(lin.bias.detach().abs().max()) == 0


def test_resmlp_block_with_zeroed_last_linear_is_the_identity():
    torch.manual_seed(0)
    net = ResMLP(6, 8, depth=2, dropout=0.0).eval()
    block = net.blocks[0]
    x = torch.randn(5, 8)
    assert not torch.allclose(block(x), x)
    with torch.no_grad():
        block.mlp[3].weight.zero_()
        block.mlp[3].bias.zero_()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
