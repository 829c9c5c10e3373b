"""ShortcutDiT against ALGORITHM §1 and pitfalls 3-7."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shortcut_ray.config import ModelConfig
from shortcut_ray.model import (DIT_SIZES, LN_EPS, ShortcutDiT, model_config, modulate, sincos_2d,
                                timestep_features)


def tiny(**kw) -> ShortcutDiT:
    torch.manual_seed(0)
    return ShortcutDiT(ModelConfig(hidden_size=64, depth=2, num_heads=2, patch_size=2, mlp_ratio=4.0), **{
        "image_size": 8, "channels": 4, "num_classes": 10, **kw})


def _np_timestep_features(v: float) -> np.ndarray:
    # independent numpy statement of §1.1 item 3: freq_i = exp(-ln(1e4) i / 128), [cos, sin], raw value
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    a = v * freqs
    return np.concatenate([np.cos(a), np.sin(a)])


def test_timestep_features_golden():  # pitfall 3 and 4
    f = timestep_features(torch.tensor([0.0, 0.5, 3.0]))
    assert f.shape == (3, 256)
    assert torch.equal(f[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # t = 0: cos first
    for row, v in zip(f[1:], (0.5, 3.0)):  # t = 0.5 and the raw integer level k = 3 (no x1000)
        np.testing.assert_allclose(row.numpy(), _np_timestep_features(v), atol=1e-6)
    # a x1000 scaling would make the t = 0.5 feature that of 500
    assert not np.allclose(f[1].numpy(), _np_timestep_features(500.0), atol=1e-3)


def test_pos_embed_golden():  # pitfall 4: [sin, cos], first half = column index, row-major tokens
    s1, s01, c1, c01 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    zero_half = [0, 0, 1, 1]
    one_half = [s1, s01, c1, c01]
    expected = torch.tensor([
        zero_half + zero_half,  # token 0: (h=0, w=0)
        one_half + zero_half,  # token 1: (h=0, w=1) -> first half encodes w
        zero_half + one_half,  # token 2: (h=1, w=0)
        one_half + one_half,  # token 3: (h=1, w=1)
    ])
    torch.testing.assert_close(sincos_2d(8, 2)[0], expected, atol=1e-6, rtol=0)


def test_attention_scale_is_one_over_head_dim():  # pitfall 5
    m = tiny()
    attn = m.blocks[0].attn
    assert attn.scale == 1.0 / 32
    x = torch.randn(2, 5, 64)
    q, k, v = (lin(x).view(2, 5, 2, 32).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
    logits = (q @ k.transpose(-1, -2)) / 32  # divide by hd, not sqrt(hd)
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_init_output_zero_and_adaln_xavier():  # pitfall 6
    m = tiny()
    out = m(torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 8, (3,)), torch.randint(0, 11, (3,)))
    assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0
    w = torch.cat([b.adaLN[1].weight.flatten() for b in m.blocks])
    expected_std = math.sqrt(2 / (7 * 64))  # Xavier-uniform of a 64 -> 384 linear
    assert abs(w.std().item() - expected_std) / expected_std < 0.05
    for lin in (m.final.adaLN[1], m.final.linear):
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    # the ablation zeroes block adaLN too
    z = ShortcutDiT(ModelConfig(hidden_size=64, depth=1, num_heads=2, zero_block_adaln=True), 8, 4, 10)
    assert torch.count_nonzero(z.blocks[0].adaLN[1].weight) == 0


def test_embedders_init():
    m = tiny()
    for lin in (m.t_embed.mlp[0], m.k_embed.mlp[2]):
        assert abs(lin.weight.std().item() - 0.02) < 0.004
    assert m.y_embed.num_embeddings == 11 and m.null_label == 10  # null id = num_classes (pitfall 14)


def test_layernorm_gelu_modulation():  # pitfall 7
    m = tiny()
    lns = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert lns and all(ln.eps == LN_EPS == 1e-6 and not ln.elementwise_affine for ln in lns)
    gelus = [mod for mod in m.modules() if isinstance(mod, torch.nn.GELU)]
    assert gelus and all(g.approximate == "tanh" for g in gelus)
    x = torch.ones(1, 3, 4)
    out = modulate(x, torch.zeros(1, 4), torch.full((1, 4), 5.0))
    assert torch.all(out == 6.0)  # scale 5 is not clipped to 1


def test_unpatchify_inverts_patch_order():
    m = tiny()
    x = torch.randn(2, 4, 8, 8)
    p = 2  # (B,C,H,W) -> tokens with per-token (patch-row, patch-col, channel) order
    tokens = x.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    torch.testing.assert_close(m.unpatchify(tokens), x)


def test_conditioning_changes_output_and_ignore_k():
    m = tiny()
    torch.nn.init.normal_(m.final.linear.weight, std=0.1)
    torch.nn.init.normal_(m.final.adaLN[1].weight, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    a = m(x, t, torch.tensor([0, 0]), y)
    b = m(x, t, torch.tensor([3, 3]), y)
    assert not torch.allclose(a, b)
    m.ignore_k = True
    torch.testing.assert_close(m(x, t, torch.tensor([0, 0]), y), m(x, t, torch.tensor([3, 3]), y))


def test_k_embedder_receives_raw_float_level(recorder):  # pitfall 2
    m = tiny()
    seen = []
    m.k_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 7]), torch.tensor([1, 2]))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [0.0, 7.0]


@pytest.mark.parametrize("side,channels,patch", [(8, 1, 2), (16, 3, 4), (12, 4, 2)])
def test_any_channels_and_square_side(side, channels, patch):
    m = ShortcutDiT(ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=patch), side, channels, 3)
    assert m(torch.randn(2, channels, side, side), torch.rand(2), torch.zeros(2), torch.zeros(2, dtype=torch.long)).shape \
        == (2, channels, side, side)


def test_bad_side_is_clear_error():
    with pytest.raises(ValueError, match="divisible by patch size"):
        ShortcutDiT(ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=4), 10, 1, 3)


def test_size_table():
    assert model_config("DiT-B/2").hidden_size == 768 and model_config("DiT-XL/2").depth == 28
    m = ShortcutDiT(model_config("DiT-S/2"), 32, 4, 1000)
    n = sum(p.numel() for p in m.parameters())
    assert 30e6 < n < 36e6  # ~33M (§1.4)
    assert {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"} <= set(DIT_SIZES)

