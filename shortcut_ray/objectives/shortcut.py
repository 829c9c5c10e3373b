"""Shortcut models (ALGORITHM §2): flow rows at level L plus self-consistency rows from two half-steps."""

from __future__ import annotations

import torch

from .base import Layout, Networks, guided_velocity, interpolate, per_row, rms
from .flow_matching import FlowMatchingObjective


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


def deal_round_robin(levels: torch.Tensor, n_cfg: int, local_batch: int, rank: int, world: int,
                     what: str, every: int) -> Layout:
    """Rank r holds global front rows r, r+W, ...: the global histogram is exactly the single-process
    one (pitfall 9) and the CFG rows [0, n_cfg) stay a local prefix."""
    b_b = levels.numel()
    if b_b % world:
        raise ValueError(f"{b_b} {what} rows do not split over {world} workers; "
                         f"make train.global_batch a multiple of {every * world}")
    local = levels[rank::world].clone()
    local_cfg = len(range(rank, n_cfg, world))
    return Layout(local_batch=local_batch, k_boot=local, n_cfg=local_cfg, global_levels=levels)


class ShortcutObjective(FlowMatchingObjective):
    """Bootstrap rows regress level k onto two clipped half-steps of the target network at level k+1."""

    uses_step_level = True

    def _layout(self, local_batch: int, global_batch: int) -> Layout:
        b_b = global_batch // self.cfg.bootstrap_every
        levels, n_cfg = bootstrap_levels(b_b, self.L, self.cfg.bootstrap_dt_bias)
        return deal_round_robin(levels, n_cfg if self.cfg.bootstrap_cfg else 0, local_batch, self.rank,
                                self.world, "bootstrap", self.cfg.bootstrap_every)

    @property
    def extra_forwards_per_row(self) -> float:
        """Two half-step calls per bootstrap row, plus two unconditional copies per CFG row."""
        lay = self.layout
        return 2 * (lay.n_boot + lay.n_cfg) / lay.local_batch

    def target_network(self, nets: Networks):
        """The EMA (official, bootstrap_ema) or the online network (§2.5, pitfall 12)."""
        return nets.require("ema", "shortcut with bootstrap_ema") if self.cfg.bootstrap_ema else nets.online

    def _front_rows(self, x1, y, draws, nets, diag):
        """Two clipped half-steps at level k+1 give the target of level k (§2.5)."""
        eps, clip = self.cfg.eps, self.cfg.clip_bootstrap
        net = self.target_network(nets)
        k = self._k_boot(x1.device)
        d = torch.pow(2.0, -k.float())  # (n_boot,) step size of the row's own level
        t = draws.t_boot
        x_t = interpolate(draws.x0_boot, x1, t, eps)
        w, n_cfg = self.cfg.cfg_scale, self.layout.n_cfg
        # Labels are the un-dropped ones (pitfall 14); no gradient through the targets (pitfall 13).
        with torch.no_grad():
            s1 = guided_velocity(net, x_t, t, k + 1, y, w, self.null, n_cfg)  # CFG prefix rows (pitfall 15)
            x_mid = torch.clamp(x_t + per_row(d / 2) * s1, -clip, clip)
            s2 = guided_velocity(net, x_mid, t + d / 2, k + 1, y, w, self.null, n_cfg)
            target = torch.clamp((s1 + s2) / 2, -clip, clip)
            diag.update(rms_s1=rms(s1), rms_s2=rms(s2), rms_target_bootstrap=rms(target))
        return x_t, t, k, y, target
