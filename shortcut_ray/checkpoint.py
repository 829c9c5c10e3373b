"""A checkpoint is a directory: sharded tensors via torch.distributed.checkpoint plus state.json.

    <dir>/.metadata, __<rank>_0.distcp   model, EMA and optimiser state (DCP, resharded on load)
    <dir>/state.json                     step, epoch, resolved config, MLflow run id (rank 0)
    <dir>/weights.safetensors            portable weights: online.* and ema.*, state.json in the header

Loading never runs code from the checkpoint: DCP metadata goes through safe_dcp's allow-list, and
`load_for_inference` prefers weights.safetensors (or a bare .safetensors file), which holds no pickle.

`save` runs on every rank (each writes its shards; DCP's coordinator writes .metadata) and writes
state.json last, so a directory with a state.json is complete. Ray-free: the worker reports the
directory to Ray Train, which uploads it to the run's storage (local or gs://). `load_for_inference`
reads the weights into a plain single-process model (jobs/sample.py, jobs/evaluate.py). A checkpoint
written before the fused q/k/v projection is converted on load into a private copy (`fuse_legacy_qkv`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from . import safe_dcp
from .config import Config
from .storage import atomic_dir, atomic_write
from .storage import local_copy as storage_local_copy
from .faults import PermanentError

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
DIR_PREFIX = "checkpoint_"


def dir_name(step: int) -> str:
    """The run-storage directory of the checkpoint taken after `step` steps."""
    return f"{DIR_PREFIX}{step:07d}"


def step_of(name: str) -> int | None:
    """Inverse of `dir_name` (None for other names)."""
    rest = name[len(DIR_PREFIX):] if name.startswith(DIR_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def dcp_coordinated() -> bool:
    """Coordinate DCP over the process group only when there is more than one rank. A one-rank group (Ray
    Train makes one even for a single worker) gains nothing from it, and a DCP save in distributed mode left
    the 2-thread CPU worker's steps ~40% slower for the rest of the run (bench.ray_overhead: 0.14 s/step
    before the first checkpoint, 0.19-0.20 after; reproduced in a plain process with a one-rank gloo group,
    saving only the optimizer state sufficed; none with no_dist)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    with safe_dcp.single_process_quiet():
        dcp.save(state, checkpoint_id=path, no_dist=not dcp_coordinated())
    meta = {"step": step, "config": cfg.to_dict(), **(extra or {})}
    export_weights(os.path.join(path, WEIGHTS_FILE), model, ema, meta, rank)
    if rank == 0:
        atomic_write(os.path.join(path, STATE_FILE), json.dumps(meta, indent=2, sort_keys=True))
    return path


STAGING_PREFIX = "shortcut-ckpt-"


def staging_dir() -> str:
    """A new local folder to write a checkpoint into before Ray uploads it; named after this process
    so that `clean_stale_staging` can tell folders of dead processes (killed workers) from live ones."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def clean_stale_staging(root: str | None = None) -> list[str]:
    """Remove staging folders left in the temp dir by processes that no longer exist (a killed worker
    never reaches its `finally`: 1.5 GB after six kills). Returns the removed paths."""
    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        pid = name[len(STAGING_PREFIX):].split("-", 1)[0] if name.startswith(STAGING_PREFIX) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_local_atomic(final_dir: str, *args, **kwargs) -> str:
    """Single-process save that never leaves a half-written `final_dir` behind (tmp dir + rename)."""
    with atomic_dir(final_dir) as tmp:
        save(tmp, *args, **kwargs)
    return final_dir


def export_weights(file: str, model: nn.Module, ema: nn.Module, meta: dict, rank: int = 0) -> None:
    """Full (gathered, CPU) online and EMA weights as safetensors on rank 0; every rank calls this (the
    gather is a collective). `meta` (state.json's content) goes into the header as JSON."""
    from safetensors.torch import save_file

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    roles = {"online": get_model_state_dict(model, options=full), "ema": get_model_state_dict(ema, options=full)}
    if rank != 0:
        return
    tensors = {f"{role}.{k}": v.detach().contiguous() for role, sd in roles.items() for k, v in sd.items()}
    save_file(tensors, f"{file}.tmp", metadata={"format": "shortcut-ray", "state": json.dumps(meta, sort_keys=True)})
    os.replace(f"{file}.tmp", file)


def read_weights(file: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({'online': state_dict, 'ema': state_dict}, state) from a weights.safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            roles: dict[str, dict[str, torch.Tensor]] = {"online": {}, "ema": {}}
            for key in f.keys():
                role, _, name = key.partition(".")
                roles.setdefault(role, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise PermanentError(f"{file} is not a readable safetensors file ({e})") from None
    if header.get("format") != "shortcut-ray" or "state" not in header:
        raise PermanentError(f"{file} is a safetensors file but not a shortcut-ray export (no 'state' header); "
                             f"export one with checkpoint.export_weights")
    return roles, json.loads(header["state"])


def read_state(path: str) -> dict:
    """state.json of a checkpoint directory (or the header of a .safetensors export)."""
    if path.endswith(".safetensors"):
        return read_weights(path)[1]
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        what = "does not exist" if not os.path.exists(path) else f"has no {STATE_FILE}"
        raise PermanentError(f"{path} {what}: give a checkpoint directory (…/checkpoint_NNNNNNN, with "
                             f"{STATE_FILE} and .metadata) or a weights.safetensors file")
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def local_copy(uri: str) -> str:
    """A local path for a checkpoint dir or .safetensors file (remote URIs copied once to the cache by
    storage.local_copy); a missing one is a PermanentError that says what to give."""
    try:
        return storage_local_copy(uri)
    except FileNotFoundError:
        raise PermanentError(f"{uri} does not exist (or is not reachable): give a checkpoint directory "
                             f"(…/checkpoint_NNNNNNN) or a weights.safetensors file") from None


def load_weights(path: str, model: nn.Module, ema: nn.Module) -> dict:
    """Online and EMA weights only (no optimiser) from a .safetensors export, into (possibly sharded)
    modules; every rank reads the file. Returns the export's state."""
    roles, meta = read_weights(path)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, roles["online"], options=full)
    set_model_state_dict(ema, roles["ema"], options=full)
    return meta


def load(path: str, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
         modules: dict[str, nn.Module] | None = None) -> dict:
    """Restore model, EMA, optimiser and the named `modules` (see save) in place (any world size: DCP
    reshards); returns state.json."""
    if not is_complete(path):
        raise PermanentError(f"{path} is not a complete shortcut-ray checkpoint (no {STATE_FILE} or .metadata)")
    modules = modules or {}
    _require_entries(path, list(modules))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(ema)}
    state.update({key: get_model_state_dict(m) for key, m in modules.items()})
    _checked_load(state, path, not dcp_coordinated())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema, state["ema"])
    for key, m in modules.items():
        set_model_state_dict(m, state[key])
    return read_state(path)


def _require_entries(path: str, keys: list[str]) -> None:
    """A clear error when the checkpoint lacks a module the run needs (e.g. a PD stage teacher)."""
    if not keys:
        return
    stored = {k.split(".", 1)[0] for k in safe_dcp.SafeReader(path).read_metadata().state_dict_metadata}
    missing = [k for k in keys if k not in stored]
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing} weights (it holds {sorted(stored)}): it was not "
                         f"written by a run of this method, so it cannot be resumed as one; start from it with "
                         f"objective.teacher_checkpoint instead, or resume from a checkpoint of this run")


def load_for_inference(path: str, weights: str = "auto") -> tuple[nn.Module, Config, dict]:
    """A plain (unsharded, fp32, CPU) model from a checkpoint dir or a .safetensors export (preferred when
    the dir has one). weights: 'online', 'ema' or 'auto' (= the run's ema.eval_with_ema choice)."""
    from .model import build_model
    from .objectives import objective_class

    if os.path.isdir(path) and os.path.exists(os.path.join(path, WEIGHTS_FILE)):
        path = os.path.join(path, WEIGHTS_FILE)
    meta = read_state(path)
    cfg = Config.from_dict(meta["config"])
    if weights == "auto":
        weights = "ema" if cfg.ema.eval_with_ema else "online"
    if weights not in ("online", "ema"):
        raise ValueError(f"weights must be 'online', 'ema' or 'auto', got {weights!r}")
    model = build_model(cfg, uses_step_level=objective_class(cfg.objective.train_type).uses_step_level)
    if path.endswith(".safetensors"):
        _load_state_dict(model, read_weights(path)[0][weights], path)
    else:
        key = "model" if weights == "online" else "ema"
        state = {key: model.state_dict()}
        _checked_load(state, path, True)
        _load_state_dict(model, state[key], path)
    meta["weights"] = weights
    return model.eval(), cfg, meta


_LEGACY_QKV = re.compile(r"^(.*\.attn)\.([qkv])\.(weight|bias)((?:\..+)?)$")
"""An attention projection entry of a checkpoint written before the fused q/k/v projection."""


def fuse_legacy_qkv(flat: dict) -> dict:
    """A flat checkpoint dict (safe_dcp.read_all) of the three-projection attention, in today's layout:
    `*.attn.q/k/v.{weight,bias}[.exp_avg|.exp_avg_sq|.step]` stacked into `*.attn.qkv.*` (rows [q; k; v],
    as model.Attention and its load hook do; Adam's step counters are equal, q's is kept), and the
    optimiser's param-group name lists with q/k/v replaced by qkv at q's place (the model's order)."""
    out, parts = {}, {}
    for key, value in flat.items():
        m = _LEGACY_QKV.match(key)
        if m:
            parts.setdefault((m[1], m[3], m[4]), {})[m[2]] = value
        else:
            out[key] = value
    for (attn, kind, suffix), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise PermanentError(f"checkpoint entry {attn}.{{q,k,v}}.{kind}{suffix} has only {sorted(qkv)}: "
                                 f"it is not a complete pre-fusion checkpoint")
        q = qkv["q"]
        out[f"{attn}.qkv.{kind}{suffix}"] = q if q.dim() == 0 else torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    for key, value in out.items():
        if key.endswith(".params") and isinstance(value, list):
            out[key] = [_fused_name(n) for n in value if _fused_name(n)]
    return out


def _fused_name(name: str) -> str:
    """A parameter name in the fused layout: q's becomes qkv's, k's and v's become "" (dropped)."""
    m = _LEGACY_QKV.match(name)
    return name if not m else f"{m[1]}.qkv.{m[3]}{m[4]}" if m[2] == "q" else ""


@contextlib.contextmanager
def _current_layout(path: str):
    """The checkpoint at `path`, or a private converted copy of it (removed afterwards) when it was
    written before the fused q/k/v projection, so such runs still resume and sample. Every process
    converts its own copy: the whole checkpoint in host memory and in the temp dir, once, per rank."""
    if not any(_LEGACY_QKV.match(k) for k in safe_dcp.SafeReader(path).read_metadata().state_dict_metadata):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="shortcut-fused-qkv-")
    try:
        with safe_dcp.single_process_quiet():
            dcp.save(fuse_legacy_qkv(safe_dcp.read_all(path)), checkpoint_id=tmp, no_dist=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_load(state: dict, path: str, no_dist: bool) -> None:
    """safe_dcp.load (of a pre-fusion checkpoint: of its converted copy), with a size mismatch (a
    checkpoint of another model size) said plainly."""
    try:
        with _current_layout(path) as current:
            safe_dcp.load(state, current, no_dist)
    except (PermanentError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException (per-rank errors) is a BaseException
        if "mismatch" in str(e).lower() or "size" in str(e).lower():
            raise PermanentError(f"{path} holds a model of another shape than this config builds ({_first_line(e)}): "
                                 f"use the checkpoint's own config (model.* settings) or another checkpoint") from None
        raise


def _load_state_dict(model: nn.Module, sd: dict, path: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise PermanentError(f"{path} does not fit the model its config builds ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "mismatch" in ln.lower()), lines[0] if lines else type(e).__name__)

