"""Flow matching (the paper's 'naive', ALGORITHM §6.1), and the row layout shared with shortcut and live reflow.

Row layout of a step on one rank (local batch b = B / world):
    rows [0, n_boot)  front rows: shortcut bootstrap rows (§2.2-2.5) or live-reflow rows (§6.5), laid out
                      over the GLOBAL front batch B_b = B // bootstrap_every and dealt to ranks
                      round-robin (pitfall 9); flow matching has none;
    rows [n_boot, b)  flow-matching rows at the base level k = L = log2(M) (§2.6).
After the per-step permutation of the batch (pitfall 21), front rows take images [0, n_boot) and flow
rows images [n_boot, b): disjoint slices, which ALGORITHM §2.1 allows as statistically equivalent to the
official overlapping slices (and which uses every image of the batch once).
"""

from __future__ import annotations

import torch

from .base import Draws, Networks, Objective, Rows, flow_velocity, interpolate, rms


class FlowMatchingObjective(Objective):
    """Every row is a flow row (§2.6): label dropout, t = j/M, target x1 - (1-eps) x0, level L; k ignored."""

    uses_step_level = False
    front_name = "bootstrap"  # metric prefix of the front rows
    per_level_metrics = True  # loss_bootstrap_k{level} over the global layout

    def _k_boot(self, device: torch.device) -> torch.Tensor:
        """The layout's levels on `device`, copied once (a per-step host-to-device copy would sync)."""
        cached = getattr(self, "_k_boot_dev", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._k_boot_dev = self.layout.k_boot.to(device)
        return cached

    # -- randomness ----------------------------------------------------------------------------
    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1) -> Draws:
        self._check_batch(x1)
        lay, dev, shape = self.layout, x1.device, x1.shape[1:]
        perm = torch.randperm(lay.local_batch, generator=generator, device=dev)
        x0_boot = torch.randn((lay.n_boot, *shape), generator=generator, device=dev)
        t_boot = self._draw_front_t(generator, dev)
        x0_flow = torch.randn((lay.n_flow, *shape), generator=generator, device=dev)
        j = torch.randint(0, self.M, (lay.n_flow,), generator=generator, device=dev)
        drop = torch.rand(lay.n_flow, generator=generator, device=dev) < self.cfg.class_dropout_prob
        return Draws(perm, x0_boot, t_boot, x0_flow, j.float() / self.M, drop)

    def _draw_front_t(self, generator: torch.Generator, dev: torch.device) -> torch.Tensor:
        """Shortcut: t = j / 2^k on the grid of the row's own step d (§2.3)."""
        u = torch.rand(self.layout.n_boot, generator=generator, device=dev)
        span = (2 ** self._k_boot(dev)).float()
        return torch.floor(u * span) / span  # j / 2^k, j uniform in {0..2^k-1}

    # -- targets ---------------------------------------------------------------------------------
    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: Draws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        x1, y = x1[draws.perm].float(), self.labels(y[draws.perm])
        nb = self.layout.n_boot
        diag: dict[str, torch.Tensor] = {}
        parts = []
        if nb:
            parts.append(self._front_rows(x1[:nb], y[:nb], draws, nets, diag))
        parts.append(self._flow_rows(x1[nb:], y[nb:], draws, diag))
        x_t, t, k, yy, target = (torch.cat(p) for p in zip(*parts))
        return Rows(x_t, t, k, yy, target.detach(), nb, diag)

    def _flow_rows(self, x1: torch.Tensor, y: torch.Tensor, draws: Draws, diag: dict):
        """§2.6: label dropout here only, t on {j/M}, unclipped target, level L."""
        y_f = torch.where(draws.drop, torch.full_like(y, self.null), y)
        x_tf = interpolate(draws.x0_flow, x1, draws.t_flow, self.cfg.eps)
        v = flow_velocity(draws.x0_flow, x1, self.cfg.eps)
        k_f = torch.full((self.layout.n_flow,), self.L, dtype=torch.long, device=x1.device)
        diag["label_drop_frac"] = draws.drop.float().mean() if self.layout.n_flow else x1.new_zeros(())
        return x_tf, draws.t_flow, k_f, y_f, v

    def _front_rows(self, x1, y, draws, nets, diag):  # pragma: no cover - shortcut / live reflow only
        raise NotImplementedError

    # -- metrics ---------------------------------------------------------------------------------
    def _metrics(self, row_mse: torch.Tensor, rows: Rows) -> dict[str, torch.Tensor]:
        nb, name = rows.n_boot, self.front_name
        m = {"loss_flow": row_mse[nb:].mean(), "rms_target_flow": rms(rows.target[nb:]),
             f"{name}_ratio": torch.full((), nb / row_mse.numel(), device=row_mse.device)}
        if nb:
            m[f"loss_{name}"] = row_mse[:nb].mean()
            if self.per_level_metrics:
                m.update(self._per_level(row_mse[:nb], rows.k[:nb]))
        return m

    def _per_level(self, boot: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-level losses over the GLOBAL layout: every rank emits every level (zero where it holds
        none), scaled so that the mean over ranks is the global per-level mean."""
        scale, levels = self._level_scale(boot.device)
        sums = boot.new_zeros(self.L).index_add_(0, k, boot)  # one kernel for all levels
        per_level = sums * scale
        return {f"loss_{self.front_name}_k{level}": per_level[level] for level in levels}

    def _level_scale(self, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """(world / count per level) on `device` and the levels present, computed once from the layout."""
        cached = getattr(self, "_level_scale_dev", None)
        if cached is None or cached[0].device != torch.device(device):
            counts = torch.bincount(self.layout.global_levels, minlength=self.L)  # host-known layout
            scale = (self.world / counts.clamp(min=1)).to(device)
            cached = self._level_scale_dev = (scale, torch.nonzero(counts).flatten().tolist())
        return cached
