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


def build_objective(cfg, num_classes: int, global_batch: int, rank: int = 0, world: int = 1):
    """The objective of `cfg.train_type` for this rank (cfg: config.ObjectiveConfig)."""
    return objective_class(cfg.train_type)(cfg, num_classes, global_batch, rank, world)


def for_sampling(cfg):
    """The objective of a whole run config (config.Config) on one process: its sampler rule and k schedule."""
    return build_objective(cfg.objective, cfg.data.num_classes, cfg.train.global_batch)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALIASES", "build_objective", "for_sampling", "canonical", "names", "objective_class", *_LAZY]
