"""Training objectives: shortcut (self-consistency + flow matching) and plain flow matching (ALGORITHM §2, §6.1).

One signature for every train type, resolved once from `OBJECTIVES`:

    obj = OBJECTIVES[cfg.train_type](cfg, num_classes, global_batch, rank, world)
    draws = obj.draw(x1, generator)                       # all randomness of a step
    rows = obj.targets(x1, y, draws, online, teacher)     # pure function of its inputs
    out = obj.loss(online, teacher, x1, y, generator)     # = draw + targets + one MSE forward

Keeping the draws apart from the target construction lets tests feed fixed noise/t/masks and fake
models and compare targets element-wise with values computed by hand.

Row layout of a step on one rank (local batch b = B / world):
    rows [0, n_boot)  bootstrap (self-consistency) rows, levels k laid out over the GLOBAL bootstrap
                      batch B_b = B // bootstrap_every and dealt to ranks round-robin (pitfall 9);
    rows [n_boot, b)  flow-matching rows at the base level k = L = log2(M).
After the per-step permutation of the batch (pitfall 21), bootstrap rows take images [0, n_boot) and
flow rows images [n_boot, b): disjoint slices, which ALGORITHM §2.1 allows as statistically equivalent
to the official overlapping slices (and which uses every image of the batch once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .config import ObjectiveConfig

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """x_t = (1 - (1-eps) t) x0 + t x1; t = 0 is noise, t = 1 is data (§0, pitfall 1)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - (1 - eps) * t) * x0 + t * x1


def flow_velocity(x0: torch.Tensor, x1: torch.Tensor, eps: float) -> torch.Tensor:
    """d x_t / dt = x1 - (1-eps) x0 (§0), the flow-matching target; never clipped."""
    return x1 - (1 - eps) * x0


def bootstrap_levels(b_b: int, num_levels: int, dt_bias: int) -> tuple[torch.Tensor, int]:
    """Deterministic k of the global bootstrap rows and n_cfg (§2.2). Returns ((B_b,) long, n_cfg)."""
    if dt_bias == 0:
        per = b_b // num_levels
        levels = [k for k in range(num_levels - 1, -1, -1) for _ in range(per)]
        n_cfg = per
    else:
        per = (b_b // 2) // num_levels
        levels = [k for k in range(num_levels - 1, 1, -1) for _ in range(per)]
        levels += [1] * (b_b // 4) + [0] * (b_b // 4)
        n_cfg = per
    levels += [0] * (b_b - len(levels))  # remainder padded with k = 0 (d = 1)
    return torch.tensor(levels[:b_b], dtype=torch.long), n_cfg


@dataclass(frozen=True)
class Layout:
    """This rank's rows: bootstrap levels (host copy), CFG prefix, and counts."""

    local_batch: int
    k_boot: torch.Tensor  # (n_boot,) long, CPU
    n_cfg: int  # local bootstrap rows [0, n_cfg) use guided half-steps (bootstrap CFG)
    global_levels: torch.Tensor  # (B_b,) long: the global layout, for tests and logging

    @property
    def n_boot(self) -> int:
        return int(self.k_boot.numel())

    @property
    def n_flow(self) -> int:
        return self.local_batch - self.n_boot


@dataclass
class Draws:
    """All randomness of one step on one rank."""

    perm: torch.Tensor  # (b,) permutation of the local batch
    x0_boot: torch.Tensor  # (n_boot, C, H, W) noise
    t_boot: torch.Tensor  # (n_boot,) on the grid of the target step d = 2^-k
    x0_flow: torch.Tensor  # (n_flow, C, H, W) noise, independent of x0_boot (§2.4)
    t_flow: torch.Tensor  # (n_flow,) on {j / M}
    drop: torch.Tensor  # (n_flow,) bool: label replaced by the null id


@dataclass
class Rows:
    """Inputs and regression targets of the single online forward pass."""

    x_t: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,)
    k: torch.Tensor  # (b,) long
    y: torch.Tensor  # (b,) long
    target: torch.Tensor  # (b, C, H, W) float32, no grad
    n_boot: int
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar with grad
    metrics: dict[str, torch.Tensor]  # detached 0-dim tensors (no host sync in the step)


class Objective(Protocol):
    uses_step_level: bool
    layout: Layout

    def draw(self, x1: torch.Tensor, generator: torch.Generator) -> Draws: ...
    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: Draws, online: VelocityModel,
                teacher: VelocityModel) -> Rows: ...
    def loss(self, online: VelocityModel, teacher: VelocityModel, x1: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> ObjectiveOutput: ...


class FlowMatchingObjective:
    """Flow matching (the paper's 'naive', §6.1): every row is a flow row; the model ignores k."""

    uses_step_level = False

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, global_batch: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} workers")
        self.cfg, self.num_classes = cfg, num_classes
        self.null = num_classes  # the null / unconditional label id
        self.M, self.L = cfg.denoise_timesteps, cfg.num_levels
        self.rank, self.world = rank, world
        self.layout = self._layout(global_batch // world, global_batch)

    def _layout(self, local_batch: int, global_batch: int) -> Layout:
        empty = torch.zeros(0, dtype=torch.long)
        return Layout(local_batch=local_batch, k_boot=empty, n_cfg=0, global_levels=empty)

    def _k_boot(self, device: torch.device) -> torch.Tensor:
        """The layout's levels on `device`, copied once (a per-step host-to-device copy would sync)."""
        cached = getattr(self, "_k_boot_dev", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._k_boot_dev = self.layout.k_boot.to(device)
        return cached

    # -- randomness ----------------------------------------------------------------------------
    def draw(self, x1: torch.Tensor, generator: torch.Generator) -> Draws:
        lay, dev, shape = self.layout, x1.device, x1.shape[1:]
        if x1.shape[0] != lay.local_batch:
            raise ValueError(f"expected a local batch of {lay.local_batch} rows, got {x1.shape[0]}")
        perm = torch.randperm(lay.local_batch, generator=generator, device=dev)
        x0_boot = torch.randn((lay.n_boot, *shape), generator=generator, device=dev)
        u = torch.rand(lay.n_boot, generator=generator, device=dev)
        span = (2 ** self._k_boot(dev)).float()
        t_boot = torch.floor(u * span) / span  # j / 2^k, j uniform in {0..2^k-1} (§2.3)
        x0_flow = torch.randn((lay.n_flow, *shape), generator=generator, device=dev)
        j = torch.randint(0, self.M, (lay.n_flow,), generator=generator, device=dev)
        drop = torch.rand(lay.n_flow, generator=generator, device=dev) < self.cfg.class_dropout_prob
        return Draws(perm, x0_boot, t_boot, x0_flow, j.float() / self.M, drop)

    # -- targets ---------------------------------------------------------------------------------
    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: Draws, online: VelocityModel,
                teacher: VelocityModel) -> Rows:
        lay, eps = self.layout, self.cfg.eps
        x1, y = x1[draws.perm].float(), y[draws.perm]
        if not self.cfg.class_conditional:
            y = torch.full_like(y, self.null)  # unconditional recipe: every label is null (§2.1 step 2)
        nb = lay.n_boot
        diag: dict[str, torch.Tensor] = {}
        parts = []
        if nb:
            parts.append(self._bootstrap_rows(x1[:nb], y[:nb], draws, online, teacher, diag))
        # flow rows (§2.6): label dropout here only, t on {j/M}, unclipped target, level L
        y_f = torch.where(draws.drop, torch.full_like(y[nb:], self.null), y[nb:])
        x_tf = interpolate(draws.x0_flow, x1[nb:], draws.t_flow, eps)
        v = flow_velocity(draws.x0_flow, x1[nb:], eps)
        k_f = torch.full((lay.n_flow,), self.L, dtype=torch.long, device=x1.device)
        parts.append((x_tf, draws.t_flow, k_f, y_f, v))
        diag["label_drop_frac"] = draws.drop.float().mean() if lay.n_flow else x1.new_zeros(())
        x_t, t, k, yy, target = (torch.cat(p) for p in zip(*parts))
        return Rows(x_t, t, k, yy, target.detach(), nb, diag)

    def _bootstrap_rows(self, x1, y, draws, online, teacher, diag):  # pragma: no cover - shortcut only
        raise NotImplementedError

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, online: VelocityModel, teacher: VelocityModel, x1: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> ObjectiveOutput:
        rows = self.targets(x1, y, self.draw(x1, generator), online, teacher)
        return self.loss_on(online, rows)

    def loss_on(self, online: VelocityModel, rows: Rows) -> ObjectiveOutput:
        """Plain MSE over all rows, every row weighted equally (§2.7)."""
        pred = online(rows.x_t, rows.t, rows.k, rows.y).float()
        per_row = (pred - rows.target).pow(2).flatten(1).mean(dim=1)  # (b,)
        loss = per_row.mean()
        nb = rows.n_boot
        with torch.no_grad():
            m = {"loss": loss.detach(), "loss_flow": per_row[nb:].mean(), "rms_pred": _rms(pred),
                 "rms_target_flow": _rms(rows.target[nb:]), "bootstrap_ratio": torch.full((), nb / per_row.numel(), device=loss.device)}
            if nb:
                boot = per_row[:nb]
                m["loss_bootstrap"] = boot.mean()
                # Per-level losses over the GLOBAL layout: every rank emits every level (zero where it
                # holds none), scaled so that the mean over ranks is the global per-level mean.
                glob = self.layout.global_levels
                counts = torch.bincount(glob, minlength=self.L)  # host-known layout: no sync
                sums = boot.new_zeros(self.L).index_add_(0, rows.k[:nb], boot)  # one kernel for all levels
                per_level = sums * (self.world / counts.clamp(min=1).to(sums.device))
                for level in torch.nonzero(counts).flatten().tolist():
                    m[f"loss_bootstrap_k{level}"] = per_level[level]
            m.update(rows.diagnostics)
        return ObjectiveOutput(loss, m)


class ShortcutObjective(FlowMatchingObjective):
    """Shortcut models (§2): flow rows at level L plus self-consistency rows from two teacher half-steps."""

    uses_step_level = True

    def _layout(self, local_batch: int, global_batch: int) -> Layout:
        b_b = global_batch // self.cfg.bootstrap_every
        levels, n_cfg = bootstrap_levels(b_b, self.L, self.cfg.bootstrap_dt_bias)
        if b_b % self.world:
            raise ValueError(f"{b_b} bootstrap rows do not split over {self.world} workers; "
                             f"make train.global_batch a multiple of {self.cfg.bootstrap_every * self.world}")
        # Deal the global rows round-robin: rank r holds global rows r, r+W, ... The global histogram is
        # exactly the single-process one (pitfall 9) and the CFG rows [0, n_cfg) stay a local prefix.
        local = levels[self.rank::self.world].clone()
        local_cfg = len(range(self.rank, n_cfg, self.world)) if self.cfg.bootstrap_cfg else 0
        return Layout(local_batch=local_batch, k_boot=local, n_cfg=local_cfg, global_levels=levels)

    def _teacher_velocity(self, teacher, x, t, k, y):
        """Teacher velocity; guided s = u + w (c - u) on the CFG prefix rows (§2.5, pitfall 15)."""
        n_cfg = self.layout.n_cfg
        if n_cfg == 0:
            return teacher(x, t, k, y).float()
        null = torch.full_like(y[:n_cfg], self.null)
        out = teacher(torch.cat([x, x[:n_cfg]]), torch.cat([t, t[:n_cfg]]), torch.cat([k, k[:n_cfg]]),
                      torch.cat([y, null])).float()  # one batched call: conditional rows + unconditional copies
        s, s_uncond = out[: x.shape[0]], out[x.shape[0]:]
        w = self.cfg.cfg_scale
        guided = s_uncond + w * (s[:n_cfg] - s_uncond)
        return torch.cat([guided, s[n_cfg:]])

    def _bootstrap_rows(self, x1, y, draws, online, teacher, diag):
        """Two clipped half-steps of the teacher at level k+1 give the target of level k (§2.5)."""
        eps, clip = self.cfg.eps, self.cfg.clip_bootstrap
        k = self._k_boot(x1.device)
        d = torch.pow(2.0, -k.float())  # (n_boot,) step size of the row's own level
        half = (d / 2).view(-1, 1, 1, 1)
        t = draws.t_boot
        x_t = interpolate(draws.x0_boot, x1, t, eps)
        # Labels are the un-dropped ones (pitfall 14); no gradient through the targets (pitfall 13).
        with torch.no_grad():
            s1 = self._teacher_velocity(teacher, x_t, t, k + 1, y)
            x_mid = torch.clamp(x_t + half * s1, -clip, clip)
            s2 = self._teacher_velocity(teacher, x_mid, t + d / 2, k + 1, y)
            target = torch.clamp((s1 + s2) / 2, -clip, clip)
            diag.update(rms_s1=_rms(s1), rms_s2=_rms(s2), rms_target_bootstrap=_rms(target))
        return x_t, t, k, y, target


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().pow(2).mean().sqrt() if x.numel() else x.new_zeros((), dtype=torch.float32)


OBJECTIVES: dict[str, type[FlowMatchingObjective]] = {
    "shortcut": ShortcutObjective,
    "flow_matching": FlowMatchingObjective,
}


def build_objective(cfg: ObjectiveConfig, num_classes: int, global_batch: int, rank: int = 0,
                    world: int = 1) -> FlowMatchingObjective:
    return OBJECTIVES[cfg.train_type](cfg, num_classes, global_batch, rank, world)
