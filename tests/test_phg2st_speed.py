"""PHG2ST's speed options: uniform dropout masks (the distribution of F.dropout, other random numbers)
and the PH2ST code's 16-bit mixed precision. Both are off by default, so published rows reproduce."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from stbench.errors import ConfigError
from stbench.method import FitContext
from stbench_plugins.phg2st import PHG2STConfig
from stbench_plugins.phg2st.model import PHG2ST
from stbench_plugins.phg2st.network import AttentionWithDropout, PHG2STNet, UniformDropout, uniform_dropout
from test_phg2st import TINY, _slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_uniform_dropout_has_the_distribution_of_dropout():
    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    y = uniform_dropout(x, 0.3, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.002  # kept with probability 1 - p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))  # and scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask
    assert uniform_dropout(x, 0.3, False) is x and uniform_dropout(x, 0.0, True) is x
    assert torch.equal(uniform_dropout(x, 1.0, True), torch.zeros_like(x))


def _nets(**changes):
    """Two networks with the same weights: torch masks and uniform masks."""
    cfg = PHG2STConfig(**{**TINY, "dropout_global": 0.3, "dropout_neighbour": 0.3, "dropout_hypergraph": 0.5,
                          "attn_dropout_global": 0.3, **changes})
    torch.manual_seed(0)
    plain = PHG2STNet(cfg, 6, 5)
    torch.manual_seed(0)
    uniform = PHG2STNet(dataclasses.replace(cfg, dropout_masks="uniform"), 6, 5)
    return plain, uniform


def test_uniform_masks_replace_every_dropout_and_change_nothing_else():
    plain, uniform = _nets()
    assert any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert not any(isinstance(m, nn.Dropout) for m in uniform.modules())
    assert [m.p for m in plain.modules() if isinstance(m, nn.Dropout)] == \
        [m.p for m in uniform.modules() if isinstance(m, UniformDropout)]
    for a, b in zip(plain.state_dict().values(), uniform.state_dict().values()):
        assert torch.equal(a, b)  # same layers, same initialisation
    x = torch.randn(3, 25, 16)
    plain.eval(), uniform.eval()
    assert torch.equal(plain.nb_enc(x), uniform.nb_enc(x))  # evaluation: no dropout, same outputs
    plain.train(), uniform.train()
    torch.manual_seed(1)
    a = plain.nb_enc(x)
    torch.manual_seed(1)
    assert not torch.equal(a, uniform.nb_enc(x))  # training: other masks


def test_the_global_attention_with_uniform_masks_is_softmax_dropout_times_v():
    torch.manual_seed(0)
    attn = AttentionWithDropout(8, 2, 0.0, 0.4, uniform_masks=True).train()
    x = torch.randn(1, 7, 8)
    torch.manual_seed(5)
    got = attn(x)
    # by hand, with the same uniform numbers
    q, k, v = attn.qkv(x).view(1, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)
    torch.manual_seed(5)
    keep = torch.empty(probs.shape).uniform_() >= 0.4
    y = (probs * keep / 0.6) @ v
    assert torch.allclose(got, attn.out(y.transpose(1, 2).reshape(1, 7, 8)), atol=1e-6)
    attn.eval()  # evaluation: the fused kernel, no dropout
    assert torch.allclose(attn(x), attn.out((probs @ v).transpose(1, 2).reshape(1, 7, 8)), atol=1e-6)


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_mixed_precision_computes_in_16_bits_and_keeps_float32_weights(precision, dtype):
    train = [_slide(0, name="A"), _slide(1, name="B")]
    seen = []
    m = PHG2ST(PHG2STConfig(**{**TINY, "precision": precision}))
    original = nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Linear, "forward", spy)
        m.fit(train[:1], train[1:], FitContext(seed=0, genes=train[0].genes))
    assert dtype in seen  # the layers ran in 16 bits ...
    assert all(p.dtype == torch.float32 for p in m.net.parameters())  # ... the weights stay float32
    pred = m.predict(train[1].masked(np.arange(5)))
    assert pred.dtype == np.float32 and np.isfinite(pred).all()
    full = PHG2ST(PHG2STConfig(**TINY))
    full.fit(train[:1], train[1:], FitContext(seed=0, genes=train[0].genes))
    assert not np.array_equal(pred, full.predict(train[1].masked(np.arange(5))))


def test_speed_options_are_off_by_default_and_checked():
    cfg = PHG2STConfig()
    assert cfg.precision == "32" and cfg.dropout_masks == "torch"
    with pytest.raises(ConfigError, match="methods.phg2st.precision"):
        PHG2ST(PHG2STConfig(precision="fp8"))
    with pytest.raises(ConfigError, match="methods.phg2st.dropout_masks"):
        PHG2ST(PHG2STConfig(dropout_masks="bernoulli"))
