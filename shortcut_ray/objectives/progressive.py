"""Progressive distillation (ALGORITHM §6.4): seven stages from d = 1/64 to d = 1, one model per stage.

Stage s = floor(step / (max_steps / L)) (integers: step * L // max_steps), level k = L-1-s clamped to
0..L-1 (from scratch the last step would give k = -1, pitfall 22). Every row of a step is at level k with
t = j/2^k on the student's grid; the teacher (its EMA when bootstrap_ema, the default) takes two
half-steps at level k+1:
    s1 = T(x_t, t);  x' = clip(x_t + (d/2) s1, -4, 4);  s2 = T(x', t + d/2);  target = (s1 + s2)/2
with no clip on the target. No label dropout. With bootstrap_cfg, both teacher calls are guided with
w = cfg_scale in the first stage only (k = L-1, where the teacher is the original flow model); later
stages use w = 1, i.e. the conditional output (the official code runs 2B rows with w = 1, equal up to
rounding, 2.4e-7).

The teacher is replaced by a copy of the student (params and EMA) at each stage switch
(`refreshes_teacher`; done by teacher.DistillTeacher.before_step with the same stage formula); the
official loop refreshes every max_steps // 7 steps on its loop index, 2-3 steps before the switch; here it
is exactly at the switch.
"""

from __future__ import annotations

import torch

from .base import Networks, Objective, Rows, guided_velocity, interpolate, rms
from .consistency import LevelDraws, draw_level


class ProgressiveDistillation(Objective):
    needs_teacher = True
    refreshes_teacher = True  # teacher.DistillTeacher.before_step copies the student at stage switches

    @property
    def extra_forwards_per_row(self) -> float:
        """Two teacher calls per row; with bootstrap_cfg, two more in the first of L stages (run average)."""
        return 2.0 + (2.0 / self.L if self.cfg.bootstrap_cfg else 0.0)

    def stage(self, step: int, max_steps: int) -> int:
        return min(self.L - 1, max(0, step * self.L // max_steps))

    def level(self, step: int, max_steps: int) -> int:
        return self.L - 1 - self.stage(step, max_steps)

    def guidance(self, k: int) -> float:
        return self.cfg.cfg_scale if self.cfg.bootstrap_cfg and k == self.L - 1 else 1.0

    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1) -> LevelDraws:
        self._check_batch(x1)
        return draw_level(x1, generator, self.level(step, max_steps))

    def teacher_network(self, nets: Networks):
        role = "teacher_ema" if self.cfg.bootstrap_ema else "teacher"
        return nets.require(role, "progressive distillation")

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: LevelDraws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        teacher, clip = self.teacher_network(nets), self.cfg.clip_bootstrap
        x1, y = x1.float(), self.labels(y)  # no label dropout (§6.4)
        t, k = draws.t, draws.k
        d = 2.0 ** -k
        w = self.guidance(k)
        k_row = torch.full_like(y, k)
        x_t = interpolate(draws.x0, x1, t, self.cfg.eps)
        with torch.no_grad():
            s1 = guided_velocity(teacher, x_t, t, k_row + 1, y, w, self.null)
            x_mid = torch.clamp(x_t + (d / 2) * s1, -clip, clip)  # clip on x' only
            s2 = guided_velocity(teacher, x_mid, t + d / 2, k_row + 1, y, w, self.null)
            target = (s1 + s2) / 2  # no final clip (unlike shortcut)
        diag = {"level": torch.full((), float(k), device=x1.device), "rms_s1": rms(s1), "rms_s2": rms(s2)}
        return Rows(x_t, t, k_row, y, target.detach(), 0, diag)

