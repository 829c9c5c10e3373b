"""Optimiser and learning-rate schedule as pure functions (ALGORITHM §3.1).

Defaults match optax.adamw in the official code: lr 1e-4, betas (0.9, 0.999), eps 1e-8, decoupled
weight decay 0.1 on EVERY parameter (one param group: no exclusion of biases, norms or embeddings),
constant lr, no warm-up, no gradient clipping (pitfall 24).
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with a single param group; fused kernels on GPU unless told otherwise."""
    params = list(params)
    if fused is None:
        fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
