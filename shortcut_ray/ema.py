"""Exponential moving average of a module's parameters (ALGORITHM §3.2).

theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimiser step, starting from
theta_ema = theta, no warm-up or bias correction. Works on plain modules and on FSDP2-sharded ones
(each rank updates its own shards: the two modules must be sharded the same way).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (before any parallel wrapping), in eval mode, used as the teacher."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # DTensor shard under FSDP2


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter-wise, in place (one fused foreach op)."""
    e = [_local(p) for p in ema.parameters()]
    m = [_local(p) for p in model.parameters()]
    if len(e) != len(m):
        raise ValueError("EMA and model have different parameter lists")
    torch._foreach_lerp_(e, m, 1.0 - decay)
