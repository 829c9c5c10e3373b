"""Training objectives: one interface (base.py), one module per family, one registry (registry.py).

    from shortcut_ray.objectives import Networks, build_objective
    obj = build_objective(cfg.objective, num_classes, global_batch, rank, world)
    out = obj.loss(Networks(online=model, ema=ema), x1, y, generator, step, max_steps)

Importing this package is cheap (no torch): the names below are loaded on first use, so that
`config.py` can validate `train_type` against `registry` without importing the maths.
"""

from __future__ import annotations

import importlib

from .registry import ALIASES, canonical, names, objective_class

_LAZY = {name: "base" for name in ("Draws", "Layout", "Networks", "Objective", "ObjectiveOutput", "Rows",
                                   "SampleStep", "flow_velocity", "guided_velocity", "interpolate")}
_LAZY.update(bootstrap_levels="shortcut", ShortcutObjective="shortcut", FlowMatchingObjective="flow_matching")


def build_objective(cfg, num_classes: int, global_batch: int, rank: int = 0, world: int = 1,
                    data_range: float | None = None):
    """The objective of `cfg.train_type` for this rank (cfg: config.ObjectiveConfig). data_range: the
    data lives in [-data_range, data_range] (pixels: 1.0, see `data_range_of`); None for latents."""
    obj = objective_class(cfg.train_type)(cfg, num_classes, global_batch, rank, world)
    obj.data_range = data_range
    return obj


def data_range_of(data_cfg) -> float | None:
    """Pixels are scaled to [-1, 1]; latents have no fixed range (config.DataConfig.kind)."""
    return 1.0 if data_cfg.kind == "pixels" else None


def for_sampling(cfg):
    """The objective of a whole run config (config.Config) on one process: its sampler rule and k schedule."""
    return build_objective(cfg.objective, cfg.data.num_classes, cfg.train.global_batch,
                           data_range=data_range_of(cfg.data))


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALIASES", "build_objective", "data_range_of", "for_sampling", "canonical", "names", "objective_class", *_LAZY]
