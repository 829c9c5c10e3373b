"""All parallelism, applied in one place: FSDP2, mixed precision, compile, activation checkpointing.

`parallelize(model, cfg, device)` is called once on the online model and once on its EMA copy (so
both are sharded the same way and the EMA update is a local, shard-wise op). Nothing downstream
checks whether a module is wrapped (DESIGN house style 6). Besides fid.py this is the only user of
torch.distributed; the process group itself is created by Ray Train (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib

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


def resolve_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """train.compile 'auto' compiles on GPU only (inductor on CPU costs minutes of build for little gain)."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


SHARD_ONE_RANK = False
"""Shard with FSDP2 in a one-rank process group too (training never does: see `parallelize`); the
tests of the FSDP2 path and bench/gpu_suite's fsdp2 stage set it to run that path on one device."""


def parallelize(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move to device; checkpoint activations; compile; FSDP2-shard embedders, blocks, then the root.

    Parameters stay float32 (master weights, optimiser state and EMA in fp32); with bf16 the FSDP2
    mixed-precision policy all-gathers bf16 copies for compute and reduces gradients in fp32, except
    the second linear of each timestep embedder, sharded on its own with an fp32 policy (§1.3).
    """
    model.to(device)
    blocks = model.blocks
    if cfg.activation_checkpointing:
        _checkpoint_blocks(blocks, cfg.activation_checkpointing_policy)
    # One worker shards nothing: FSDP2 over a world of 1 only adds its all-gather/reduce-scatter copies
    # and DTensor dispatch (1.6x the step time of the digits run on CPU, issue 14). DCP checkpoints of
    # the plain module are the same global tensors, so runs resume across world sizes either way.
    sharded = world()[1] > 1 or (SHARD_ONE_RANK and dist.is_available() and dist.is_initialized())
    if resolve_compile(cfg, device):
        _compile(model, whole=not sharded)
    if not sharded:
        return model  # a single worker: plain module (train_step uses autocast for bf16)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy()
    if resolve_precision(cfg, device) == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for emb in (model.t_embed, model.k_embed):  # fp32 compute for the embedders' second linear
        fully_shard(emb.mlp[2], mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=True)
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return model


# -- compile and activation checkpointing ------------------------------------------------------------

# dynamic=False with batch buckets (ShortcutDiT.batch_bucket): every batch size the model sees is a
# training size or a power of two, so the shapes are few and known. One graph per (shape, grad mode);
# the recompile limit is raised to cover them (training sizes + 2^0..2^16 buckets, with and without
# grad) instead of marking the batch dynamic, which would cost the specialised kernels of every size.
RECOMPILE_LIMIT = 64
COMPILE_BACKEND = "inductor"  # benchmarks' CPU dry runs switch to "aot_eager" (plumbing, not kernels)


def _compile(model: nn.Module, whole: bool, backend=None) -> None:
    """Compile the whole forward (single process, fullgraph: no graph breaks), or under FSDP2 each
    block plus the embedding and head regions (the FSDP2 hooks run between them)."""
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    model.pad_batches = True
    backend = backend or COMPILE_BACKEND
    if whole:
        model._forward = torch.compile(model._forward, dynamic=False, fullgraph=True, backend=backend)
        return
    for blk in model.blocks:
        blk.compile(dynamic=False, backend=backend)
    model._embed = torch.compile(model._embed, dynamic=False, backend=backend)
    model._head = torch.compile(model._head, dynamic=False, backend=backend)


def _checkpoint_blocks(blocks: nn.ModuleList, policy: str) -> None:
    """'full': recompute each block in the backward; 'selective': keep the matmul and attention
    outputs and recompute only the cheap elementwise ops and LayerNorms (about half the saved bytes
    of a DiT block for a few percent more time)."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {}
    if policy == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    for i, blk in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(blk, **kwargs)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}


@contextlib.contextmanager
def gathered_teacher(teacher: nn.Module):
    """Keep a sharded no-grad teacher (the EMA) gathered across its calls inside the block: one
    all-gather per module per step instead of one per call (the shortcut teacher is called twice).
    Costs the module's parameters in the compute dtype (params x 2 bytes in bf16) for the duration;
    resharded on exit, before the EMA update writes the shards (no stale copy can survive)."""
    from torch.distributed.fsdp import FSDPModule

    if (not is_sharded(teacher) or any(p.requires_grad for p in teacher.parameters())
            or not hasattr(FSDPModule, "set_reshard_after_forward")):  # (older torch: gather per call)
        yield
        return

    fsdp = [m for m in teacher.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in fsdp:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


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
