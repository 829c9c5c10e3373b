"""Divergence guard: stop a run whose loss or gradients became non-finite, before it saves anything.

`observe` runs every step and only updates a device-side int (the first bad step): no host sync in
the hot path. `check` reads it (one all-reduce MIN, so every rank decides alike) at steps chosen from
the config alone (DESIGN §2.14): every CHECK_EVERY steps, and at every log, sample, eval and
checkpoint step, before the action runs. At checkpoint steps the weights are checked too, so a
non-finite checkpoint is never reported to Ray, and Ray's rotation (num_to_keep) can never delete
the last good one in favour of a bad one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .faults import DivergenceError

CHECK_EVERY = 10
NEVER = 2 ** 62


def _due(every: int, step: int, last: int) -> bool:
    return every > 0 and (step == last or step % every == 0)


class FiniteGuard:
    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)

    def observe(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Record `step` if its loss or gradient norm is non-finite (device ops only)."""
        ok = torch.isfinite(metrics["loss"].detach().float()) & torch.isfinite(metrics["grad_norm"].detach().float())
        self.first_bad = torch.where(ok, self.first_bad, self.first_bad.clamp(max=step))

    @staticmethod
    def due(step: int, last: int, train_cfg) -> bool:
        """From the config only, so every rank makes the check's collective at the same steps."""
        t = train_cfg
        return (step % CHECK_EVERY == 0 or step == last
                or any(_due(e, step, last) for e in (t.log_every, t.sample_every, t.eval_every, t.checkpoint_every)))

    def check(self, step: int, model: torch.nn.Module | None, describe) -> None:
        """Raise DivergenceError(describe(first_bad_step)) if any rank saw a non-finite value; with `model`,
        its weights count too (checkpoint steps)."""
        bad = self.first_bad.clone()
        if model is not None and not weights_finite(model):
            bad = bad.clamp(max=step)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        first = int(bad.item())
        if first != NEVER:
            raise DivergenceError(describe(first, step))


def weights_finite(model: torch.nn.Module) -> bool:
    """This rank's shards of every parameter are finite."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True
