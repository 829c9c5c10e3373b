"""All parallelism, applied in one place: FSDP2, mixed precision, compile, activation checkpointing.

`parallelize(model, cfg, device)` is called once on the online model and once on its EMA copy (so
both are sharded the same way and the EMA update is a local, shard-wise op). Nothing downstream
checks whether a module is wrapped (DESIGN house style 6). Besides fid.py this is the only user of
torch.distributed; the process group itself is created by Ray Train (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'bf16' on GPU and 'fp32' on CPU unless the config says otherwise (ALGORITHM §1.3)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def parallelize(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move to device; compile blocks; checkpoint activations; FSDP2-shard each block then the root.

    Parameters stay float32 (master weights, optimiser state and EMA in fp32); with bf16 the FSDP2
    mixed-precision policy all-gathers bf16 copies for compute and reduces gradients in fp32.
    """
    model.to(device)
    blocks = model.blocks
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, blk in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(blk)
    if cfg.compile:
        for blk in blocks:
            blk.compile(dynamic=False)
    if not (dist.is_available() and dist.is_initialized()):
        return model  # single process: plain module (train_step uses autocast for bf16)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy()
    if resolve_precision(cfg, device) == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 owns the module's precision (then no autocast is needed)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_i, ...) tensors from every rank in rank order (n_i may differ); identity alone."""
    rank, ws = world()
    if ws == 1:
        return local
    n = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = local.new_zeros((max(sizes) - local.shape[0], *local.shape[1:]))
    buf = [local.new_zeros((max(sizes), *local.shape[1:])) for _ in range(ws)]
    dist.all_gather(buf, torch.cat([local, pad]))
    return torch.cat([b[:s] for b, s in zip(buf, sizes)])


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over ranks in one collective (metrics of the global batch)."""
    _, ws = world()
    if ws == 1 or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return {k: v for k, v in zip(keys, stacked / ws)}
