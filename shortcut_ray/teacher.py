"""Distillation teachers (ALGORITHM §6.3, §6.4): check, load, freeze and shard them. Ray-free (engine layer).

Driver side, before any cluster work: `check_teacher(cfg)` reads the teacher checkpoint's state.json
(local path or any fsspec URI, e.g. gs://) and refuses a missing URI, a teacher that is not a
flow-matching run, or one whose model shape / image size / channels / classes differ from the run's,
with a message that says what to change.

Worker side: `attach(state)` builds the frozen teacher -- online and EMA weights, eval mode,
requires_grad False, FSDP2-sharded exactly like the student through `distributed.parallelize` -- and
initialises the student (model + EMA) from the same checkpoint with the fresh optimiser of
`TrainState.create` and step 0. A Ray restore / train.resume_from loaded afterwards overrides the
student (and, for progressive distillation, the teacher).

Progressive distillation (§6.4): the teacher of stage s is the student at the start of stage s, with
stage s = floor(7 step / max_steps) clamped to 0..6 (so k = 6 - s). `DistillTeacher.before_step`
copies the student (params + EMA) into the teacher when the stage of the step about to run is newer
than the teacher's, i.e. exactly at each stage switch (the official loop refreshes every
max_steps // 7 steps on its loop index, 0-3 steps earlier; §6.4 allows either). A PD checkpoint
stores the teacher's weights (`checkpoint_modules`: DCP keys `teacher`, `teacher_ema`), so resuming
mid-stage restores the teacher of that stage; after a restore at step S the teacher is that of
stage(S - 1), the last step run, and the next switch happens when stage(step) first exceeds it.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from .config import Config, ConfigError
from .storage import local_copy

FLOW_MATCHING_TYPES = ("flow_matching", "naive")
"""train_type values of a valid teacher ('naive' is the paper's name for flow matching)."""
_NEEDS_TEACHER = frozenset({"consistency_distillation", "progressive"})
_REFRESHES_TEACHER = frozenset({"progressive"})
PD_STAGES = 7
MODEL_FIELDS = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio")
DATA_FIELDS = ("image_size", "channels", "num_classes", "kind")


def _registry_flag(train_type: str, name: str, fallback: frozenset) -> bool:
    """The registry class's `needs_teacher` / `refreshes_teacher` attribute (the built-in set for a name
    the registry does not know)."""
    from .objectives import objective_class

    try:
        cls = objective_class(train_type)
    except ValueError:
        return train_type in fallback
    return bool(getattr(cls, name, False))


def needs_teacher(train_type: str) -> bool:
    """True for methods distilled from a pretrained flow-matching checkpoint (CD, PD)."""
    return _registry_flag(train_type, "needs_teacher", _NEEDS_TEACHER)


def refreshes_teacher(train_type: str) -> bool:
    """True for progressive distillation: the teacher becomes a copy of the student at each stage."""
    return _registry_flag(train_type, "refreshes_teacher", _REFRESHES_TEACHER)


def pd_stage(step: int, max_steps: int) -> int:
    """Stage 0..6 of progressive distillation at 0-based `step` (k = 6 - stage, pitfall 22; clamped): the
    formula of objectives.progressive.ProgressiveDistillation.stage."""
    from .objectives.consistency import curriculum_level

    return curriculum_level(step, max_steps, PD_STAGES)


# -- driver side: checks ---------------------------------------------------------------------------

def read_checkpoint_state(uri: str) -> dict:
    """state.json of a checkpoint directory at a local path or fsspec URI; clear errors if it is not one."""
    from .storage import filesystem, join_uri

    fs, root = filesystem(uri)
    hint = ("objective.teacher_checkpoint must be a checkpoint directory (…/checkpoint_NNNNNNN) of a "
            "flow-matching run, e.g. runs/RUN/checkpoint_0001500 or gs://BUCKET/runs/RUN/checkpoint_0020000")
    if not fs.exists(join_uri(root, "state.json")):
        raise ConfigError(f"no state.json at {uri}: not a (complete) shortcut-ray checkpoint; {hint}")
    if not fs.exists(join_uri(root, ".metadata")):
        raise ConfigError(f"{uri} has a state.json but no .metadata: the checkpoint is incomplete; {hint}")
    with fs.open(join_uri(root, "state.json"), "rb") as f:
        return json.load(f)


def validate_teacher(cfg: Config, teacher: Config, uri: str) -> None:
    """Refuse a teacher that is not flow matching or whose shape differs from the run's (`cfg`)."""
    tt = teacher.objective.train_type
    if tt not in FLOW_MATCHING_TYPES:
        raise ConfigError(
            f"teacher checkpoint {uri} was trained with objective.train_type={tt!r}; "
            f"{cfg.objective.train_type} distils a flow-matching teacher (§6.3, §6.4). Train one with "
            f"`python -m jobs.train --preset digits_flow_matching` (or --set objective.train_type=flow_matching) "
            f"and set objective.teacher_checkpoint to one of its checkpoints")
    diffs = [(f"model.{f}", getattr(teacher.model, f), getattr(cfg.model, f)) for f in MODEL_FIELDS]
    diffs += [(f"data.{f}", getattr(teacher.data, f), getattr(cfg.data, f)) for f in DATA_FIELDS]
    diffs = [(k, have, want) for k, have, want in diffs if have != want]
    if diffs:
        listing = "; ".join(f"{k}: teacher {have!r}, this run {want!r}" for k, have, want in diffs)
        fix = " ".join(f"--set {k}={have}" for k, have, _ in diffs)
        raise ConfigError(
            f"teacher checkpoint {uri} does not match this run ({listing}). The student starts from the "
            f"teacher's weights, so both need the same model and data shape: use `{fix}`, or a teacher "
            f"trained with this run's settings")


def check_teacher_checkpoint(cfg: Config, uri: str) -> dict:
    """Read and validate the teacher at `uri` against `cfg`; returns its state.json."""
    meta = read_checkpoint_state(uri)
    validate_teacher(cfg, Config.from_dict(meta["config"]), uri)
    return meta


def _preset_hint(cfg: Config) -> str:
    """' (preset X leaves it empty: train the teacher with `--preset BASE_flow_matching`)' for the
    distillation presets of presets.py (named BASE_METHOD), else ''."""
    tt, name = cfg.objective.train_type, getattr(cfg, "preset", "") or ""
    if not name.endswith(f"_{tt}"):
        return ""
    teacher = f"{name[: -len(tt) - 1]}_flow_matching"
    return (f" (preset {name!r} leaves it empty on purpose: train the teacher first with "
            f"`python -m jobs.train --preset {teacher}`)")


def check_teacher(cfg: Config) -> dict | None:
    """Driver-side check (launch.build_trainer, jobs): the teacher's state.json, or None without a teacher."""
    tt, uri = cfg.objective.train_type, cfg.objective.teacher_checkpoint
    if not needs_teacher(tt):
        if uri:
            raise ConfigError(f"objective.teacher_checkpoint={uri!r} is set but objective.train_type={tt!r} "
                              f"uses no teacher; remove it (`--set objective.teacher_checkpoint=`)")
        return None
    if not uri:
        raise ConfigError(
            f"objective.train_type={tt!r} distils a pretrained flow-matching model but "
            f"objective.teacher_checkpoint is empty{_preset_hint(cfg)}; set it to a flow-matching checkpoint, e.g. "
            f"`--set objective.teacher_checkpoint=runs/RUN/checkpoint_0001500` (local or gs://)")
    return check_teacher_checkpoint(cfg, uri)


# -- worker side: loading --------------------------------------------------------------------------

def load_weights(path: str, modules: dict[str, nn.Module]) -> None:
    """Load checkpoint entries ('model', 'ema', ...) into modules, plain or FSDP2-sharded (DCP reshards).

    Every rank calls this; DCP coordinates the ranks only when there are several (checkpoint.dcp_coordinated)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from . import safe_dcp
    from .checkpoint import dcp_coordinated

    state = {key: get_model_state_dict(m) for key, m in modules.items()}
    # never unpickle code from a checkpoint (allow-listed metadata, weights_only entries: safe_dcp.py)
    safe_dcp.load(state, path, no_dist=not dcp_coordinated())
    for key, m in modules.items():
        set_model_state_dict(m, state[key])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's shard of an FSDP2 DTensor


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst <- src, parameter- and buffer-wise on local shards (both sharded the same way)."""
    d = [_local(p) for p in (*dst.parameters(), *dst.buffers())]
    s = [_local(p) for p in (*src.parameters(), *src.buffers())]
    if len(d) != len(s):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_copy_(d, s)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class DistillTeacher:
    """The frozen teacher networks by role: `online` and `ema` (§6.3 and §6.4 use the EMA by default)."""

    def __init__(self, online: nn.Module, ema: nn.Module, source: str, max_steps: int, progressive: bool):
        self.online, self.ema = freeze(online), freeze(ema)
        self.source, self.max_steps, self.progressive = source, max_steps, progressive
        self.stage: int | None = None  # PD stage of the current teacher; None = derive from the step

    def network(self, use_ema: bool = True) -> nn.Module:
        return self.ema if use_ema else self.online

    def before_step(self, step: int, model: nn.Module, ema: nn.Module) -> bool:
        """PD: make the teacher the student's copy when `step` starts a newer stage; True if it did."""
        if not self.progressive:
            return False
        if self.stage is None:  # fresh (step 0: the loaded teacher) or restored at step S (stage(S - 1))
            self.stage = pd_stage(step - 1, self.max_steps) if step > 0 else 0
        want = pd_stage(step, self.max_steps)
        if want <= self.stage:
            return False
        copy_weights(self.online, model)
        copy_weights(self.ema, ema)
        self.stage = want
        return True

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules a checkpoint must hold besides the student: PD's current teacher; none for CD (its
        teacher never changes and is reloaded from objective.teacher_checkpoint)."""
        return {"teacher": self.online, "teacher_ema": self.ema} if self.progressive else {}


def build_teacher(cfg: Config, path: str, device: torch.device, progressive: bool = False) -> DistillTeacher:
    """Frozen teacher (online + EMA) from the local checkpoint dir `path`, sharded like the student."""
    from .distributed import parallelize
    from .model import build_model
    from .objectives import objective_class

    uses_k = objective_class("flow_matching").uses_step_level  # the teacher is a flow-matching DiT
    online, ema = build_model(cfg, uses_step_level=uses_k), build_model(cfg, uses_step_level=uses_k)
    online = parallelize(freeze(online), cfg.train, device)
    ema = parallelize(freeze(ema), cfg.train, device)
    load_weights(path, {"model": online, "ema": ema})
    return DistillTeacher(online, ema, path, cfg.train.max_steps, progressive)


def init_student(state, path: str) -> None:
    """Student model + EMA <- the checkpoint at `path`; the optimiser stays fresh and the step is 0 (§6.3)."""
    load_weights(path, {"model": state.model, "ema": state.ema})
    state.step = 0


def attach(state, uri: str | None = None) -> DistillTeacher | None:
    """Worker hook after TrainState.create: for distillation methods, build the teacher into
    `state.distill` and start the student from the same checkpoint. No-op for other methods."""
    cfg = state.cfg
    if not needs_teacher(cfg.objective.train_type):
        return None
    path = local_copy(uri or cfg.objective.teacher_checkpoint)  # remote: copied once to the cache
    state.distill = build_teacher(cfg, path, state.device, refreshes_teacher(cfg.objective.train_type))
    init_student(state, path)
    return state.distill
