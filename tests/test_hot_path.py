"""The GPU-ready hot path, checked on CPU: fused QKV, §1.3 precision, no host syncs in a step,
compile without graph breaks, batch buckets, selective checkpointing, FSDP2 teacher, peak FLOPs and
the FLOP accounting against torch's FlopCounterMode."""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from shortcut_ray.config import ModelConfig
from shortcut_ray.model import ShortcutDiT


def tiny(depth: int = 2, hidden: int = 64, heads: int = 2) -> ShortcutDiT:
    torch.manual_seed(0)
    m = ShortcutDiT(ModelConfig(hidden_size=hidden, depth=depth, num_heads=heads), 8, 4, 10)
    g = torch.Generator().manual_seed(1)  # the zero-initialised final layer would hide every difference
    torch.nn.init.normal_(m.final.linear.weight, std=0.1, generator=g)
    torch.nn.init.normal_(m.final.adaLN[1].weight, std=0.1, generator=g)
    return m


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g),
            torch.randint(0, 8, (b,), generator=g), torch.randint(0, 11, (b,), generator=g))


# -- fused QKV ----------------------------------------------------------------------------------------

def _split_qkv(sd: dict) -> dict:
    """The state dict of the old layout (separate q/k/v Linears), as old checkpoints and importers emit."""
    out = {}
    for key, val in sd.items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", val.chunk(3)):
                out[key.replace(".qkv.", f".{part}.")] = chunk.clone()
        else:
            out[key] = val
    return out


def test_fused_qkv_equals_three_separate_linears():
    m = tiny()
    attn = m.blocks[0].attn
    assert not any(k.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")) for k in m.state_dict())
    x = torch.randn(2, 5, 64)
    w = attn.qkv.weight
    d = 64
    q, k, v = (F.linear(x, w[i * d:(i + 1) * d], attn.qkv.bias[i * d:(i + 1) * d]) for i in range(3))
    q, k, v = (z.view(2, 5, 2, 32).transpose(1, 2) for z in (q, k, v))
    ref = attn.proj(((q @ k.transpose(-1, -2) / 32).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-6)
    # initialised as three D x D Xavier blocks (bound sqrt(6 / 2D)), not one D x 3D block
    bound = (6 / (2 * d)) ** 0.5
    for block in w.detach().chunk(3):
        assert block.abs().max() <= bound and block.abs().max() > 0.9 * bound


def test_legacy_qkv_checkpoint_loads_strict():
    src = tiny()
    legacy = _split_qkv(src.state_dict())
    assert "blocks.1.attn.q.weight" in legacy and "blocks.1.attn.qkv.weight" not in legacy
    dst = ShortcutDiT(ModelConfig(hidden_size=64, depth=2, num_heads=2), 8, 4, 10)
    dst.load_state_dict(legacy, strict=True)
    for key, val in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], val), key
    args = inputs()
    assert torch.equal(dst(*args), src(*args))
