"""Training diagnostics of ALGORITHM §5, computed at eval time: the loss heat-map over forced (k, t) and
one-step reconstructions. Engine layer (torch + torch.distributed); the worker logs the results.

- Heat-map: for each level k in 0..L-1 (self-consistency rows) and k = L (the flow-matching level), and
  each t in {0, 1/T, ..., (T-1)/T}, the MSE of the online prediction against the objective's own target
  with t forced for all rows and k forced for the bootstrap rows. Built through the objective's public
  draw/targets API with forced draws (label dropout off, identity permutation), so the targets are
  exactly what training regresses on. Bootstrap CFG rows are off (conditional targets).
- Reconstructions: x1_hat = x_t + (1 - t) f(x_t, t, k) from real images x1 (a) at the flow level L for
  t = 0, 1/8, ..., 7/8 and (b) at every shortcut level k with t = 1 - d, d = 2^-k (one step of size d
  lands on the data).

Every rank makes the same forward calls on its own rows (FSDP2 forwards are collectives); the heat-map
is averaged over ranks, the reconstructions come from rank 0's rows.

The one dependency on the objective's internals is `_forced`; `supported` names the objectives whose
draws have this shape (shortcut, flow matching).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext

import torch

from .distributed import all_reduce_mean


SUPPORTED = ("shortcut", "flow_matching")


def supported(train_type: str) -> bool:
    from .objectives import canonical

    return canonical(train_type) in SUPPORTED


def _forced(objective, rows: int, k: int | None):
    """A copy of `objective` whose local layout is `rows` bootstrap rows at level k (None: all flow rows)."""
    obj = copy.copy(objective)
    levels = torch.full((rows,) if k is not None else (0,), k if k is not None else 0, dtype=torch.long)
    obj.layout = dataclasses.replace(objective.layout, local_batch=rows, k_boot=levels, n_cfg=0, global_levels=levels)
    vars(obj).pop("_k_boot_dev", None)  # the per-device cache of the layout's levels (objective._k_boot)
    return obj


def _forced_rows(objective, x1, y, t: float, k: int | None, nets, generator):
    obj = _forced(objective, x1.shape[0], k)
    d = obj.draw(x1, generator)
    n = x1.shape[0]
    full = torch.full((n,), float(t), device=x1.device)
    d = dataclasses.replace(d, perm=torch.arange(n, device=x1.device), t_boot=full[: d.t_boot.numel()],
                            t_flow=full[: d.t_flow.numel()], drop=torch.zeros_like(d.drop))
    return obj.targets(x1, y, d, nets)


@torch.no_grad()
def loss_heatmap(objective, nets, x1: torch.Tensor, y: torch.Tensor, num_levels: int, t_bins: int,
                 seed: int = 0, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """((L+1, T) float CPU losses averaged over ranks, (T,) t values); `nets` are the networks by role
    (TrainState.networks: online, ema, ...). Row k = L is the flow level; rows 0..L-1 are NaN for
    objectives that ignore k (flow matching)."""
    t_values = torch.arange(t_bins, dtype=torch.float64) / t_bins
    out = torch.full((num_levels + 1, t_bins), float("nan"))
    levels = list(range(num_levels)) if objective.uses_step_level else []
    gen = torch.Generator(device=x1.device)
    for k in levels + [None]:
        for j, t in enumerate(t_values.tolist()):
            gen.manual_seed(seed * 1_000 + j)
            with autocast() if autocast else nullcontext():
                rows = _forced_rows(objective, x1, y, t, k, nets, gen)
                pred = nets.online(rows.x_t, rows.t, rows.k, rows.y).float()
            out[num_levels if k is None else k, j] = (pred - rows.target).pow(2).mean().cpu()
    mean = all_reduce_mean({"h": torch.nan_to_num(out, nan=-1.0).to(x1.device)})["h"].cpu()
    return torch.where(torch.isnan(out), out, mean), t_values


@torch.no_grad()
def reconstructions(objective, model, nets, x1: torch.Tensor, y: torch.Tensor, num_levels: int,
                    autocast=None) -> tuple[torch.Tensor, list[str]]:
    """(rows * B, C, H, W) images and one label per row: the real x1, then one-step reconstructions."""
    images, labels = [x1.float().cpu()], ["real x1"]
    gen = torch.Generator(device=x1.device)
    settings = [(j / 8, num_levels, f"flow t={j}/8") for j in range(8)]
    settings += [(1 - 2.0 ** -k, k, f"k={k} t=1-1/{2 ** k}") for k in range(num_levels) if objective.uses_step_level]
    for i, (t, k, label) in enumerate(settings):
        gen.manual_seed(i)
        with autocast() if autocast else nullcontext():
            rows = _forced_rows(objective, x1, y, t, None, nets, gen)  # flow rows only: x_t at t, no net calls
            kk = torch.full_like(rows.k, k)
            v = model(rows.x_t, rows.t, kk, rows.y).float()
        x_hat = rows.x_t.float() + (1 - t) * v
        images.append(x_hat.cpu())
        labels.append(label)
    return torch.cat(images), labels
