"""A checkpoint is a directory: sharded tensors via torch.distributed.checkpoint plus state.json.

    <dir>/.metadata, __<rank>_0.distcp   model, EMA and optimiser state (DCP, resharded on load)
    <dir>/state.json                     step, epoch, resolved config, MLflow run id (rank 0)

`save` runs on every rank (each writes its shards; DCP's coordinator writes .metadata) and writes
state.json last, so a directory with a state.json is complete. Ray-free: the worker reports the
directory to Ray Train, which uploads it to the run's storage (local or gs://). `load_for_inference`
reads the weights into a plain single-process model (jobs/sample.py, jobs/evaluate.py).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from .config import Config
from .storage import atomic_dir, atomic_write

STATE_FILE = "state.json"
DIR_PREFIX = "checkpoint_"


def dir_name(step: int) -> str:
    """The run-storage directory of the checkpoint taken after `step` steps."""
    return f"{DIR_PREFIX}{step:07d}"


def step_of(name: str) -> int | None:
    """Inverse of `dir_name` (None for other names)."""
    rest = name[len(DIR_PREFIX):] if name.startswith(DIR_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, STATE_FILE)) and os.path.exists(os.path.join(path, ".metadata"))


def save(path: str, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, step: int,
         cfg: Config, extra: dict | None = None, rank: int = 0, modules: dict[str, nn.Module] | None = None) -> str:
    """Write a checkpoint into the empty/new directory `path` (every rank calls this).

    modules: further named modules stored beside the student (TrainState.checkpoint_modules(), e.g.
    progressive distillation's current teacher under 'teacher' / 'teacher_ema')."""
    os.makedirs(path, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(ema)}
    state.update({key: get_model_state_dict(m) for key, m in (modules or {}).items()})
    dcp.save(state, checkpoint_id=path, no_dist=not _distributed())
    if rank == 0:
        meta = {"step": step, "config": cfg.to_dict(), **(extra or {})}
        atomic_write(os.path.join(path, STATE_FILE), json.dumps(meta, indent=2, sort_keys=True))
    return path


def save_local_atomic(final_dir: str, *args, **kwargs) -> str:
    """Single-process save that never leaves a half-written `final_dir` behind (tmp dir + rename)."""
    with atomic_dir(final_dir) as tmp:
        save(tmp, *args, **kwargs)
    return final_dir


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load(path: str, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
         modules: dict[str, nn.Module] | None = None) -> dict:
    """Restore model, EMA, optimiser and the named `modules` (see save) in place (any world size: DCP
    reshards); returns state.json."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete shortcut-ray checkpoint (no {STATE_FILE} or .metadata)")
    modules = modules or {}
    _require_entries(path, list(modules))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(ema)}
    state.update({key: get_model_state_dict(m) for key, m in modules.items()})
    dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema, state["ema"])
    for key, m in modules.items():
        set_model_state_dict(m, state[key])
    return read_state(path)


def _require_entries(path: str, keys: list[str]) -> None:
    """A clear error when the checkpoint lacks a module the run needs (e.g. a PD stage teacher)."""
    if not keys:
        return
    stored = {k.split(".", 1)[0] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
    missing = [k for k in keys if k not in stored]
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing} weights (it holds {sorted(stored)}): it was not "
                         f"written by a run of this method, so it cannot be resumed as one; start from it with "
                         f"objective.teacher_checkpoint instead, or resume from a checkpoint of this run")


def load_for_inference(path: str, weights: str = "auto") -> tuple[nn.Module, Config, dict]:
    """A plain (unsharded, fp32, CPU) model from a checkpoint dir. weights: 'online', 'ema' or 'auto'
    (= the run's ema.eval_with_ema choice)."""
    from .model import build_model
    from .objectives import objective_class

    meta = read_state(path)
    cfg = Config.from_dict(meta["config"])
    if weights == "auto":
        weights = "ema" if cfg.ema.eval_with_ema else "online"
    if weights not in ("online", "ema"):
        raise ValueError(f"weights must be 'online', 'ema' or 'auto', got {weights!r}")
    model = build_model(cfg, uses_step_level=objective_class(cfg.objective.train_type).uses_step_level)
    key = "model" if weights == "online" else "ema"
    state = {key: model.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state[key])
    meta["weights"] = weights
    return model.eval(), cfg, meta
