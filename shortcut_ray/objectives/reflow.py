"""Live reflow (ALGORITHM §6.5) and flow matching on a stored noise-data coupling (§6.1 paired, §6.6 reflow).

Live reflow: B // bootstrap_every rows of the GLOBAL batch (dealt round-robin like shortcut's bootstrap
rows, pitfall 9) are reflow rows, the rest flow rows (§2.6). Layout [reflow rows, flow rows]. A reflow
row takes fresh noise z, runs the ONLINE network (not the EMA) from t = 0 for 8 Euler steps of 1/8 at the
flow level k = L (guided with w = cfg_scale; w = 0: the null label on every row), and regresses level 0 at
x_t = (1-(1-eps)t) z + t x_hat, t = j/M, onto x_hat - z (no (1-eps) factor), with the undropped labels.
z is drawn independently of the flow noise (the official code's key reuse makes them equal); tests may
inject any draws. Sampling: k = 0 at every step for N < M, k = L at N = M.

Paired data ('reflow'): a paired dataset (jobs.generate_pairs) yields batches (x1, y, x0) with x0 the
stored noise that the teacher carried to x1 (data.split_paired is the one place that knows the tuple).
Flow matching then uses the given x0 instead of fresh noise (the official code stores [x0 | x1] on
channels; same coupling, different container).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Layout, Networks, Rows, SampleStep, guided_velocity, interpolate, flow_velocity
from .flow_matching import FlowMatchingObjective
from .shortcut import deal_round_robin


class LiveReflow(FlowMatchingObjective):
    uses_step_level = True  # keeps step conditioning: reflow rows at k = 0, flow rows at k = L
    front_name = "reflow"
    per_level_metrics = False
    rollout_steps = 8

    def _layout(self, local_batch: int, global_batch: int) -> Layout:
        b_b = global_batch // self.cfg.bootstrap_every
        return deal_round_robin(torch.zeros(b_b, dtype=torch.long), 0, local_batch, self.rank, self.world,
                                "reflow", self.cfg.bootstrap_every)

    @property
    def rollout_guidance(self) -> float:
        """w of the rollout calls; unconditional runs (every label null) need one plain call per step."""
        return self.cfg.cfg_scale if self.cfg.class_conditional else 1.0

    @property
    def guided_rollout(self) -> bool:
        return self.rollout_guidance not in (0.0, 1.0)

    @property
    def extra_forwards_per_row(self) -> float:
        lay = self.layout
        return self.rollout_steps * lay.n_boot * (2 if self.guided_rollout else 1) / lay.local_batch

    def _draw_front_t(self, generator: torch.Generator, dev: torch.device) -> torch.Tensor:
        j = torch.randint(0, self.M, (self.layout.n_boot,), generator=generator, device=dev)
        return j.float() / self.M  # t = j/M, drawn independently of the flow rows' t

    @torch.no_grad()
    def rollout(self, net, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x_hat: `rollout_steps` Euler steps of `net` from z at level L, t_i = i / steps."""
        x, n = z.float(), self.rollout_steps
        k = torch.full_like(y, self.L)
        for i in range(n):
            t = torch.full((x.shape[0],), i / n, device=x.device)
            x = x + guided_velocity(net, x, t, k, y, self.rollout_guidance, self.null) / n
        return x

    def _front_rows(self, x1, y, draws, nets: Networks, diag):
        z, t = draws.x0_boot, draws.t_boot
        x_hat = self.rollout(nets.online, z, y)  # undropped labels (null only inside w = 0 calls)
        x_t = interpolate(z, x_hat, t, self.cfg.eps)
        target = x_hat - z  # no (1 - eps) factor (§6.5)
        k = torch.zeros_like(y)
        diag["rms_reflow_sample"] = x_hat.pow(2).mean().sqrt()
        return x_t, t, k, y, target

    def sample_steps(self, num_steps: int) -> list[SampleStep]:
        steps = super().sample_steps(num_steps)
        return steps if num_steps >= self.M else [SampleStep(s.t, s.d, 0) for s in steps]


@dataclass
class PairDraws:
    t: torch.Tensor  # (b,) on {j / M}
    drop: torch.Tensor  # (b,) bool: label replaced by the null id


class PairedFlowMatching(FlowMatchingObjective):
    """§6.1 on pairs: every row a flow row with the stored x0; label dropout, t = j/M, level L."""

    uses_pairs = True  # batches are (x1, y, x0): x0 the stored noise the teacher carried to x1

    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1) -> PairDraws:
        self._check_batch(x1)
        b, dev = x1.shape[0], x1.device
        j = torch.randint(0, self.M, (b,), generator=generator, device=dev)
        drop = torch.rand(b, generator=generator, device=dev) < self.cfg.class_dropout_prob
        return PairDraws(j.float() / self.M, drop)

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: PairDraws, nets: Networks, step: int = 0,
                max_steps: int = 1, x0: torch.Tensor | None = None) -> Rows:
        if x0 is None or x0.shape != x1.shape:
            raise ValueError(f"objective.train_type='reflow' trains on stored pairs: every batch needs x0 with x1's "
                             f"shape {tuple(x1.shape)}, got {None if x0 is None else tuple(x0.shape)}; train it on a "
                             f"paired dataset from `python -m jobs.generate_pairs`")
        x0, x1 = x0.float(), x1.float()
        y = self.labels(y)
        y_f = torch.where(draws.drop, torch.full_like(y, self.null), y)
        x_t = interpolate(x0, x1, draws.t, self.cfg.eps)
        v = flow_velocity(x0, x1, self.cfg.eps)
        k = torch.full_like(y, self.L)
        diag = {"label_drop_frac": draws.drop.float().mean()}
        return Rows(x_t, draws.t, k, y_f, v.detach(), 0, diag)
