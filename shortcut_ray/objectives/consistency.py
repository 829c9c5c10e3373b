"""Consistency training (ALGORITHM §6.2) and consistency distillation (§6.3).

Both regress the online network at (x_t, t) onto
    target = (x1_hat - x_t) / (1 - t),   x1_hat = x_t2 + (1 - t2) f(x_t2, t2),   t2 = t + d,
i.e. with F(x, t) = x + (1 - t) f(x, t) the loss is ||F_theta(x_t, t) - F_target(x_t2, t2)||^2 / (1 - t)^2.
At t2 = 1, F is the identity (the boundary condition, pitfall 23). No clip on the target, no label
dropout, no CFG; every network call is a no-grad eval call; the DiT ignores k (official ignore_dt).

Step counter: `step` is the number of optimiser steps already taken (0..max_steps-1). The official CT
counter runs 1..max_steps from scratch, so its stage switches land one step earlier than ours; the
level formula k = floor(step / (max_steps / L)) is evaluated in integers as step * L // max_steps and
clamped to 0..L-1 (at step == max_steps it would give L, pitfall 22).

Sampling: Euler (the official eval/FID code, the default) or multistep consistency sampling
(`objective.sampler = 'multistep'`, the official inference script): x1_hat = x + (1 - t) f, then re-noise
x <- (t + d) x1_hat + (1 - t - d) z with fresh fixed-seed noise z; the last step returns x1_hat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Networks, Objective, Rows, SampleStep, interpolate, level_grid_t, per_row, rms


@dataclass
class LevelDraws:
    """Randomness of a CT / CD / PD step: one level for the whole batch, t on its grid, fresh noise."""

    x0: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,) = j / 2^k, j uniform in {0..2^k-1}
    k: int  # the level of every row (CT: curriculum, CD: L, PD: stage)


def curriculum_level(step: int, max_steps: int, num_levels: int) -> int:
    """CT's coarse-to-fine level floor(step / (max_steps / L)), in integers, clamped to 0..L-1 (pitfall 22)."""
    return min(num_levels - 1, max(0, step * num_levels // max_steps))


def consistency_target(x_t: torch.Tensor, t: torch.Tensor, x_t2: torch.Tensor, t2: torch.Tensor,
                       f: torch.Tensor) -> torch.Tensor:
    """(x_t2 + (1 - t2) f - x_t) / (1 - t); t < 1 always (t is on a grid that stops one step short of 1)."""
    x1_hat = x_t2 + per_row(1 - t2) * f
    return (x1_hat - x_t) / per_row(1 - t)


def draw_level(x1: torch.Tensor, generator: torch.Generator, k: int) -> LevelDraws:
    """t integers first, then the noise: the two independent draws of §6.2."""
    b = x1.shape[0]
    j = torch.randint(0, 2 ** k, (b,), generator=generator, device=x1.device)
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    return LevelDraws(x0, level_grid_t(j, k), k)


class ConsistencyTraining(Objective):
    """CT (§6.2): same-path pair (x_t, x_t2), target network = EMA (bootstrap_ema) called at level k."""

    @property
    def sampler(self) -> str:  # type: ignore[override]
        return self.cfg.sampler

    @property
    def extra_forwards_per_row(self) -> float:
        return 1.0

    def level(self, step: int, max_steps: int) -> int:
        return curriculum_level(step, max_steps, self.L)

    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1) -> LevelDraws:
        self._check_batch(x1)
        return draw_level(x1, generator, self.level(step, max_steps))

    def target_network(self, nets: Networks):
        return nets.require("ema", "consistency training with bootstrap_ema") if self.cfg.bootstrap_ema \
            else nets.online

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: LevelDraws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        net, eps = self.target_network(nets), self.cfg.eps
        x1, y = x1.float(), self.labels(y)  # no label dropout (§6.2)
        t = draws.t
        t2 = t + 2.0 ** -draws.k
        k = torch.full_like(y, draws.k)
        x_t = interpolate(draws.x0, x1, t, eps)
        x_t2 = interpolate(draws.x0, x1, t2, eps)  # the SAME path: same x0 and x1
        with torch.no_grad():
            f = net(x_t2, t2, k, y).float()  # level k itself, not k+1 (§6.2)
            target = consistency_target(x_t, t, x_t2, t2, f)
        diag = {"level": torch.full((), float(draws.k), device=x1.device), "rms_f": rms(f)}
        return Rows(x_t, t, k, y, target.detach(), 0, diag)

    def sample_update(self, x: torch.Tensor, s: torch.Tensor, step: SampleStep, noise) -> torch.Tensor:
        if self.cfg.sampler == "euler":
            return x + step.d * s
        x1_hat = x + (1 - step.t) * s
        t_next = step.t + step.d
        if t_next >= 1:
            return x1_hat
        return t_next * x1_hat + (1 - t_next) * noise()


class ConsistencyDistillation(ConsistencyTraining):
    """CD (§6.3): one clipped ODE step of the frozen teacher's EMA, then the student's EMA at t2 = t + 1/M."""

    needs_teacher = True

    @property
    def extra_forwards_per_row(self) -> float:
        return 2.0

    def level(self, step: int, max_steps: int) -> int:
        return self.L  # d = 1/M fixed, k = L in both calls (ignored by the DiT)

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: LevelDraws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        teacher = nets.require("teacher_ema", "consistency_distillation")
        student = nets.require("ema", "consistency_distillation")
        eps, clip = self.cfg.eps, self.cfg.clip_bootstrap
        x1, y = x1.float(), self.labels(y)  # labels as given, no dropout, no CFG (§6.3)
        t, d = draws.t, 2.0 ** -draws.k
        t2 = t + d
        k = torch.full_like(y, draws.k)
        x_t = interpolate(draws.x0, x1, t, eps)
        with torch.no_grad():
            v1 = teacher(x_t, t, k, y).float()
            x_t2 = torch.clamp(x_t + d * v1, -clip, clip)  # one teacher ODE step, clipped
            f = student(x_t2, t2, k, y).float()
            target = consistency_target(x_t, t, x_t2, t2, f)  # not clipped
        diag = {"rms_teacher": rms(v1), "rms_f": rms(f)}
        return Rows(x_t, t, k, y, target.detach(), 0, diag)
