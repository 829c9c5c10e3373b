"""The objective interface shared by every train type (ALGORITHM §2, §6.7), and the helpers they share.

One signature for every method, resolved once from the registry:

    obj = build_objective(cfg, num_classes, global_batch, rank, world)
    draws = obj.draw(x1, generator, step, max_steps)                  # all randomness of a step
    rows = obj.targets(x1, y, draws, nets, step, max_steps)           # pure function of its inputs
    out = obj.loss(nets, x1, y, generator, step, max_steps)           # = draw + targets + one MSE forward

Paired datasets (two-stage reflow, §6.6) add the stored noise: `loss(..., x0=x0)` and
`targets(..., x0=x0)` for objectives with `uses_pairs` (batches are (x1, y, x0), see data.split_paired).

`nets` holds the networks by role (online, ema, teacher, teacher_ema); each objective says which it
calls. `step` is the number of optimiser steps already taken (0-based) and `max_steps` the run's
length; curricula and distillation stages are functions of the two. Keeping the draws apart from the
targets lets tests inject fixed noise/t/masks and fake networks and compare targets element-wise with
values computed by hand.

Each objective also owns how the model is conditioned (`uses_step_level`: whether k reaches TE_k, the
official `ignore_dt`) and how it is sampled (`sample_steps(N)`: the (t, d, k) of each step, and
`sample_update`: Euler by default). `guided_velocity` is the one place classifier-free guidance is
computed, for the sampler and for every objective's target calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ObjectiveConfig

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- paths (§0) ----------------------------------------------------------------------------------------
def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """x_t = (1 - (1-eps) t) x0 + t x1; t = 0 is noise, t = 1 is data (§0, pitfall 1)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - (1 - eps) * t) * x0 + t * x1


def flow_velocity(x0: torch.Tensor, x1: torch.Tensor, eps: float) -> torch.Tensor:
    """d x_t / dt = x1 - (1-eps) x0 (§0), the flow-matching target; never clipped."""
    return x1 - (1 - eps) * x0


def per_row(x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1): a per-row scalar broadcast over an image batch."""
    return x.view(-1, 1, 1, 1)


# -- classifier-free guidance, once ------------------------------------------------------------------
def guided_velocity(net: VelocityModel, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                    w: float, null_label: int | None, n_guided: int | None = None) -> torch.Tensor:
    """s = u + w (c - u) on the first `n_guided` rows (default: all), plain c on the rest (float32).

    c = net(., y), u = net(., null). One call of B + n_guided rows ([x; x[:n]] with labels [y; null]).
    w = 1 is the conditional output alone (one call of B rows); w = 0 on every row is one call with the
    null label. Used by the sampler (§4), shortcut bootstrap CFG (§2.5), progressive distillation (§6.4)
    and the live-reflow rollout (§6.5).
    """
    b = x.shape[0]
    n = b if n_guided is None else n_guided
    if n == 0 or w == 1.0:
        return net(x, t, k, y).float()
    if null_label is None:
        raise ValueError("classifier-free guidance (w != 1) needs the null label (the model's num_classes)")
    null = torch.full_like(y[:n], null_label)
    if w == 0.0 and n == b:
        return net(x, t, k, null).float()
    out = net(torch.cat([x, x[:n]]), torch.cat([t, t[:n]]), torch.cat([k, k[:n]]), torch.cat([y, null])).float()
    s, u = out[:b], out[b:]
    guided = u + w * (s[:n] - u)
    return guided if n == b else torch.cat([guided, s[n:]])


# -- networks by role -----------------------------------------------------------------------------------
@dataclass
class Networks:
    """The networks a target builder may call (§6.7). Callables f(x, t, k, y) -> velocity.

    online: the network being trained; ema: its EMA; teacher / teacher_ema: a frozen pretrained model
    and its EMA weights (distillation), None when the run has none.
    """

    online: VelocityModel
    ema: VelocityModel | None = None
    teacher: VelocityModel | None = None
    teacher_ema: VelocityModel | None = None

    def require(self, role: str, who: str) -> VelocityModel:
        net = getattr(self, role)
        if net is None:
            hint = (" (a pretrained flow-matching checkpoint: give the run a teacher)" if "teacher" in role
                    else "")
            raise ValueError(f"{who} needs the {role!r} network{hint}, but none was given")
        return net


# -- result types ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """This rank's rows: front-row levels (host copy), CFG prefix, and counts. Front rows are the
    shortcut's bootstrap rows or live reflow's reflow rows; objectives without them have none."""

    local_batch: int
    k_boot: torch.Tensor  # (n_boot,) long, CPU
    n_cfg: int  # local front rows [0, n_cfg) use guided half-steps (bootstrap CFG)
    global_levels: torch.Tensor  # (B_b,) long: the global layout, for tests and logging

    @property
    def n_boot(self) -> int:
        return int(self.k_boot.numel())

    @property
    def n_flow(self) -> int:
        return self.local_batch - self.n_boot


def empty_layout(local_batch: int) -> Layout:
    empty = torch.zeros(0, dtype=torch.long)
    return Layout(local_batch=local_batch, k_boot=empty, n_cfg=0, global_levels=empty)


@dataclass
class Draws:
    """All randomness of one shortcut / flow-matching / live-reflow step on one rank."""

    perm: torch.Tensor  # (b,) permutation of the local batch
    x0_boot: torch.Tensor  # (n_boot, C, H, W) noise of the front rows
    t_boot: torch.Tensor  # (n_boot,) front-row times
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
    n_boot: int = 0  # front rows (bootstrap / reflow) at [0, n_boot)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar with grad
    metrics: dict[str, torch.Tensor]  # detached 0-dim tensors (no host sync in the step)


@dataclass(frozen=True)
class SampleStep:
    """One sampler step: the model is queried at (t, k); the step moves time from t to t + d."""

    t: float
    d: float
    k: int


# -- the interface ------------------------------------------------------------------------------------
class Objective:
    """Base of every train type: construction, the MSE loss (§2.7), Euler sampling, FLOP accounting.

    Subclasses implement `draw` and `targets`, and override the class attributes below as needed.
    """

    uses_step_level: bool = False  # whether k reaches TE_k (official: False = ignore_dt, §1.1 item 3)
    needs_teacher: bool = False  # needs Networks.teacher / teacher_ema (two-stage methods, teacher.py)
    refreshes_teacher: bool = False  # the teacher becomes a copy of the student at stage switches (PD)
    uses_pairs: bool = False  # trains on a stored (x0, x1) coupling: batches carry x0
    sampler: str = "euler"  # 'euler' | 'multistep' (consistency) | 'ddim' (diffusion)

    data_range: float | None = None  # set by build_objective: pixels in [-1, 1]; None (latents) = unbounded

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, global_batch: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} workers")
        self.cfg, self.num_classes = cfg, num_classes
        self.null = num_classes  # the null / unconditional label id
        self.M, self.L = cfg.denoise_timesteps, cfg.num_levels
        self.rank, self.world = rank, world
        self.global_batch = global_batch
        self.layout = self._layout(global_batch // world, global_batch)

    def _layout(self, local_batch: int, global_batch: int) -> Layout:
        return empty_layout(local_batch)

    # -- to implement -------------------------------------------------------------------------------
    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1):
        raise NotImplementedError

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    @property
    def extra_forwards_per_row(self) -> float:
        """No-grad forwards per training row besides the online pass (teacher calls, rollouts), averaged
        over the local batch and over the run; for FLOP / MFU accounting (DESIGN §5)."""
        return 0.0

    def _check_batch(self, x1: torch.Tensor) -> None:
        if x1.shape[0] != self.layout.local_batch:
            raise ValueError(f"expected a local batch of {self.layout.local_batch} rows, got {x1.shape[0]}")

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """Unconditional recipe: every label is the null id (§2.1 step 2); otherwise unchanged."""
        return y if self.cfg.class_conditional else torch.full_like(y, self.null)

    def loss(self, nets: Networks, x1: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             step: int = 0, max_steps: int = 1, x0: torch.Tensor | None = None) -> ObjectiveOutput:
        draws = self.draw(x1, generator, step, max_steps)
        if x0 is not None and not self.uses_pairs:
            raise ValueError(f"{type(self).__name__} does not train on stored (x0, x1) pairs, but x0 was given")
        pair = {"x0": x0} if self.uses_pairs else {}
        return self.loss_on(nets.online, self.targets(x1, y, draws, nets, step, max_steps, **pair))

    def loss_on(self, online: VelocityModel, rows: Rows) -> ObjectiveOutput:
        """Plain MSE over all rows, every row weighted equally (§2.7)."""
        pred = online(rows.x_t, rows.t, rows.k, rows.y).float()
        row_mse = (pred - rows.target).pow(2).flatten(1).mean(dim=1)  # (b,)
        loss = row_mse.mean()
        with torch.no_grad():
            m = {"loss": loss.detach(), "rms_pred": rms(pred)}
            m.update(self._metrics(row_mse, rows))
            m.update(rows.diagnostics)
        return ObjectiveOutput(loss, m)

    def _metrics(self, row_mse: torch.Tensor, rows: Rows) -> dict[str, torch.Tensor]:
        return {"rms_target": rms(rows.target)}

    # -- sampling (§4) ---------------------------------------------------------------------------------
    def sample_steps(self, num_steps: int) -> list[SampleStep]:
        """Euler schedule: d = 2^-k, t_i the running sum (any N in 1..M, see sampler.step_schedule)."""
        from ..sampler import step_schedule

        return [SampleStep(t, 2.0 ** -k, k) for t, k in step_schedule(num_steps, self.M)]

    def sample_update(self, x: torch.Tensor, s: torch.Tensor, step: SampleStep,
                      noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Euler: x <- x + d s. `noise()` gives fresh fixed-seed noise to updates that re-noise."""
        return x + step.d * s


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().pow(2).mean().sqrt() if x.numel() else x.new_zeros((), dtype=torch.float32)


def level_grid_t(j: torch.Tensor, k: int) -> torch.Tensor:
    """t = j / 2^k (exact in float32 for k <= 24)."""
    return j.float() / float(2 ** k)
