"""The names `objective.train_type` accepts: the single source, importable without torch (config uses it).

Each name maps to "module:Class" inside `shortcut_ray.objectives`; the class is imported only when an
objective is built. The paper's code names (ALGORITHM §10) are accepted as aliases and normalised.
"""

from __future__ import annotations

import importlib

OBJECTIVE_PATHS: dict[str, str] = {
    "shortcut": "shortcut:ShortcutObjective",  # §2
    "flow_matching": "flow_matching:FlowMatchingObjective",  # §6.1 ('naive')
    "consistency": "consistency:ConsistencyTraining",  # §6.2
    "consistency_distillation": "consistency:ConsistencyDistillation",  # §6.3
    "progressive": "progressive:ProgressiveDistillation",  # §6.4
    "live_reflow": "reflow:LiveReflow",  # §6.5
    "reflow": "reflow:PairedFlowMatching",  # §6.1 paired data / §6.6 two-stage reflow
    "diffusion": "diffusion:DiffusionObjective",  # §6.6
}

ALIASES: dict[str, str] = {
    "naive": "flow_matching",
    "livereflow": "live_reflow",
    "consistency-distillation": "consistency_distillation",
}


def names() -> tuple[str, ...]:
    """Canonical train types, in registry order."""
    return tuple(OBJECTIVE_PATHS)


def canonical(train_type: str) -> str:
    """The canonical name of `train_type` (aliases resolved); ValueError listing the choices otherwise."""
    name = ALIASES.get(train_type, train_type)
    if name not in OBJECTIVE_PATHS:
        raise ValueError(f"objective.train_type must be one of {names()} (or an alias {tuple(ALIASES)}), "
                         f"got {train_type!r}")
    return name


def objective_class(train_type: str):
    """The objective class registered under `train_type` (imports its module, hence torch)."""
    module, cls = OBJECTIVE_PATHS[canonical(train_type)].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
