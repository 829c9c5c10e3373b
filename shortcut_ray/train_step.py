"""One optimisation step, Ray-free: objective -> backward -> AdamW -> EMA (ALGORITHM §2.1, §3).

`TrainState` owns the parts of a run (model, its EMA, optimiser, objective, a distillation teacher) and its
step counter; `TrainState.step_on(x1, y)` is the whole hot path and never synchronises with the host:
metrics come back as device tensors that the caller reads only when it logs. The same object runs
inside Ray Train workers and in a plain single-process loop (bench/ray_overhead.py, debugging).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import Config
from .distributed import gathered_teacher, is_sharded, parallelize, resolve_precision, world
from .ema import make_ema, update_ema
from .model import build_model
from .objectives import Networks, Objective, build_objective, data_range_of, objective_class
from .optim import build_optimizer, lr_at, set_lr

if TYPE_CHECKING:
    from .teacher import DistillTeacher


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The draws of a step are a pure function of (seed, step, rank): a resumed run redraws exactly."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63 - 1))
    return g


@dataclass
class TrainState:
    cfg: Config
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    device: torch.device
    rank: int = 0
    world_size: int = 1
    step: int = 0
    distill: "DistillTeacher | None" = None
    """Frozen distillation teacher (teacher.attach; CD / PD only), None otherwise."""

    @classmethod
    def create(cls, cfg: Config, device: torch.device | str = "cpu") -> "TrainState":
        """Build, parallelise and wire every part of a run on this rank (a distillation teacher is added
        by teacher.attach)."""
        device = torch.device(device)
        rank, ws = world()
        torch.manual_seed(cfg.train.seed)  # identical init on every rank before sharding
        model = build_model(cfg, uses_step_level=objective_class(cfg.objective.train_type).uses_step_level)
        ema = make_ema(model)  # theta_ema = theta at init (§3.2)
        model = parallelize(model, cfg.train, device)
        ema = parallelize(ema, cfg.train, device)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        objective = build_objective(cfg.objective, cfg.data.num_classes, cfg.train.global_batch, rank, ws,
                                    data_range=data_range_of(cfg.data))
        lay = objective.layout  # the step's batch sizes: compiled graphs use them unpadded
        for m in (model, ema):
            m.exact_batches = frozenset({lay.local_batch, lay.n_boot, lay.n_boot + lay.n_cfg} - {0})
        return cls(cfg, model, ema, optimizer, objective, device, rank, ws)

    @property
    def local_batch(self) -> int:
        return self.cfg.train.global_batch // self.world_size

    @property
    def networks(self) -> Networks:
        """The networks by role, for the objective's target builder."""
        d = self.distill
        return Networks(online=self.model, ema=self.ema, teacher=d.online if d else None, teacher_ema=d.ema if d else None)

    @property
    def sampling_model(self) -> nn.Module:
        """Weights used for samples and FID: explicit in the config and logged (pitfall 25)."""
        return self.ema if self.cfg.ema.eval_with_ema else self.model

    def autocast(self):
        """bf16 autocast for unsharded models; FSDP2's mixed-precision policy handles sharded ones.
        Either way activations are bf16 (model.LayerNorm keeps its input dtype under autocast) and
        the loss is fp32 (the objective promotes the model output)."""
        if resolve_precision(self.cfg.train, self.device) == "bf16" and not is_sharded(self.model):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step_on(self, x1: torch.Tensor, y: torch.Tensor, x0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step on this rank's slice of the global batch; returns device-side metrics.

        x0: the stored noise of a paired dataset (data.split_paired), for objectives with `uses_pairs`."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        set_lr(self.optimizer, lr)
        gen = step_generator(cfg.train.seed, self.step, self.rank, self.device)
        if self.distill is not None:  # PD: the teacher becomes the student's copy at a stage switch
            self.distill.before_step(self.step, self.model, self.ema)
        if x0 is not None and not getattr(self.objective, "uses_pairs", False):
            raise ValueError(f"the batch carries stored noise x0 (a paired dataset, ALGORITHM §6.6) but "
                             f"objective.train_type={cfg.objective.train_type!r} does not train on pairs")
        pair = {"x0": x0} if x0 is not None else {}  # paired objectives take the stored coupling's noise
        with self.autocast(), gathered_teacher(self.ema):  # one EMA all-gather per step (FSDP2)
            out = self.objective.loss(self.networks, x1, y, gen, self.step, cfg.train.max_steps, **pair)
        out.loss.backward()
        # The official recipe does not clip (pitfall 24); the norm is still computed for logging,
        # without the extra pass over every gradient that clip_grad_norm_(inf) would make.
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, cfg.ema.decay)  # after the optimiser step (§3.2)
        self.step += 1
        metrics = dict(out.metrics)
        metrics["grad_norm"] = _full(grad_norm)  # (lr is a host value: the worker logs it from lr_at)
        return metrics

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules saved and restored with the student besides model/EMA/optimiser (PD's stage teacher)."""
        return self.distill.checkpoint_modules() if self.distill is not None else {}

    def param_norm(self) -> torch.Tensor:
        sq = sum(_full(p.detach()).float().pow(2).sum() for p in self.model.parameters())
        return sq.sqrt()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
