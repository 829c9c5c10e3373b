"""The GPU-ready hot path, checked on CPU: fused QKV, §1.3 precision, no host syncs in a step,
compile without graph breaks, batch buckets, selective checkpointing, FSDP2 teacher, peak FLOPs and
the FLOP accounting against torch's FlopCounterMode."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from shortcut_ray.config import ModelConfig
from shortcut_ray.model import ShortcutDiT


def tiny(depth: int = 2, hidden: int = 64, heads: int = 2) -> ShortcutDiT:
    torch.manual_seed(0)
    m = ShortcutDiT(ModelConfig(hidden_size=hidden, depth=depth, num_heads=heads), 8, 4, 10)
    g = torch.Generator().manual_seed(1)  # the zero-initialised final layer would hide every difference
    torch.nn.init.normal_(m.final.linear.weight, std=0.1, generator=g)
    torch.nn.init.normal_(m.final.adaLN[1].weight, std=0.1, generator=g)
    return m


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g),
            torch.randint(0, 8, (b,), generator=g), torch.randint(0, 11, (b,), generator=g))


# -- fused QKV ----------------------------------------------------------------------------------------

def _split_qkv(sd: dict) -> dict:
    """The state dict of the old layout (separate q/k/v Linears), as old checkpoints and importers emit."""
    out = {}
    for key, val in sd.items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", val.chunk(3)):
                out[key.replace(".qkv.", f".{part}.")] = chunk.clone()
        else:
            out[key] = val
    return out


def test_fused_qkv_equals_three_separate_linears():
    m = tiny()
    attn = m.blocks[0].attn
    assert not any(k.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")) for k in m.state_dict())
    x = torch.randn(2, 5, 64)
    w = attn.qkv.weight
    d = 64
    q, k, v = (F.linear(x, w[i * d:(i + 1) * d], attn.qkv.bias[i * d:(i + 1) * d]) for i in range(3))
    q, k, v = (z.view(2, 5, 2, 32).transpose(1, 2) for z in (q, k, v))
    ref = attn.proj(((q @ k.transpose(-1, -2) / 32).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-6)
    # initialised as three D x D Xavier blocks (bound sqrt(6 / 2D)), not one D x 3D block
    bound = (6 / (2 * d)) ** 0.5
    for block in w.detach().chunk(3):
        assert block.abs().max() <= bound and block.abs().max() > 0.9 * bound


def test_legacy_qkv_checkpoint_loads_strict():
    src = tiny()
    legacy = _split_qkv(src.state_dict())
    assert "blocks.1.attn.q.weight" in legacy and "blocks.1.attn.qkv.weight" not in legacy
    dst = ShortcutDiT(ModelConfig(hidden_size=64, depth=2, num_heads=2), 8, 4, 10)
    dst.load_state_dict(legacy, strict=True)
    for key, val in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], val), key
    args = inputs()
    assert torch.equal(dst(*args), src(*args))


# -- precision: §1.3 embedders, bf16 activations on both paths ------------------------------------------

def tiny_config(train_type: str = "shortcut", batch: int = 16, **train):
    from shortcut_ray.config import Config, DataConfig, EvalConfig, ObjectiveConfig, TrainConfig

    return Config(model=ModelConfig(hidden_size=32, depth=2, num_heads=2),
                  eval=EvalConfig(sample_steps=(1, 8), fid_steps=(1,)),
                  data=DataConfig(image_size=8, channels=4, num_classes=10),
                  objective=ObjectiveConfig(train_type=train_type, denoise_timesteps=8, bootstrap_every=4,
                                            bootstrap_cfg=train_type == "shortcut"),
                  train=TrainConfig(global_batch=batch, max_steps=10, **train))


def test_timestep_embedder_second_linear_fp32_under_autocast():
    m = tiny()
    emb = m.t_embed
    t = torch.rand(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(t)
        h = emb.mlp[1](emb.mlp[0](_feats(t)))
    assert h.dtype == torch.bfloat16  # the first linear follows autocast (compute dtype)
    assert out.dtype == torch.float32
    ref = F.linear(h.float(), emb.mlp[2].weight, emb.mlp[2].bias)  # second linear in fp32 on the same h
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    full = emb.mlp[2](emb.mlp[1](emb.mlp[0](_feats(t))))  # all-fp32 reference: only the bf16 first linear differs
    torch.testing.assert_close(out, full, atol=2e-3, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what plain autocast would have done
        assert emb.mlp(_feats(t)).dtype == torch.bfloat16


def _feats(t):
    from shortcut_ray.model import timestep_features

    return timestep_features(t)


def _activation_dtypes(model, args) -> dict[str, torch.dtype]:
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: [seen.setdefault(name, o.dtype)] and None)
             for name, mod in model.named_modules() if name in ("blocks.0", "blocks.0.norm1", "final.norm",
                                                                 "t_embed", "blocks.0.attn.qkv")]
    out = model(*args)
    for h in hooks:
        h.remove()
    seen["out"] = out.dtype
    return seen


BF16_PATH = {"blocks.0": torch.bfloat16, "blocks.0.norm1": torch.bfloat16, "final.norm": torch.bfloat16,
             "blocks.0.attn.qkv": torch.bfloat16, "t_embed": torch.float32, "out": torch.bfloat16}


def test_autocast_path_has_bf16_activations():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _activation_dtypes(m, inputs()) == BF16_PATH


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real one-rank gloo process group, sharded with FSDP2 (training leaves one rank unsharded:
    distributed.SHARD_ONE_RANK exercises the multi-worker path on one device)."""
    import torch.distributed as dist

    import shortcut_ray.distributed as distributed

    monkeypatch.setattr(distributed, "SHARD_ONE_RANK", True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_worker_trains_the_plain_module(tmp_path):
    """Ray Train creates a process group even for one worker; FSDP2 over one rank is pure overhead, so
    a one-rank group trains the plain module (with autocast for bf16), as a single process does."""
    import torch.distributed as dist

    from shortcut_ray.distributed import is_sharded
    from shortcut_ray.train_step import TrainState

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg1", rank=0, world_size=1)
    try:
        st = TrainState.create(tiny_config(precision="bf16"))
        assert not is_sharded(st.model) and not is_sharded(st.ema)
        assert st.step_on(*_batch(st.cfg))["loss"].isfinite()
    finally:
        dist.destroy_process_group()


def _batch(cfg, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    b, c, s = cfg.train.global_batch, cfg.data.channels, cfg.data.image_size
    return torch.randn(b, c, s, s, generator=g), torch.randint(0, cfg.data.num_classes, (b,), generator=g)


def _nonzero_head(state):
    g = torch.Generator().manual_seed(5)  # both paths start from the same non-zero head
    for m in (state.model, state.ema):
        for p in (m.final.linear.weight, m.final.adaLN[1].weight):
            full = torch.randn(p.shape, generator=g) * 0.1
            with torch.no_grad():
                p.copy_(full if not hasattr(p, "to_local") else
                        torch.distributed.tensor.distribute_tensor(full, p.device_mesh, p.placements))


def test_fsdp2_bf16_path_matches_autocast_path(one_rank_group):
    """The FSDP2 mixed-precision path (Ray Train's) and the single-process autocast path (benchmarks,
    plain loops) compute in the same dtypes, with fp32 embedder outputs and an fp32 loss."""
    import torch.distributed as dist

    from shortcut_ray.distributed import is_sharded
    from shortcut_ray.train_step import TrainState

    cfg = tiny_config(precision="bf16")
    sharded = TrainState.create(cfg)
    assert is_sharded(sharded.model) and is_sharded(sharded.ema)
    x1, y = _batch(cfg)
    args = (x1[:3], torch.rand(3), torch.randint(0, 3, (3,)), y[:3])
    assert _activation_dtypes(sharded.model, args) == BF16_PATH
    dist.destroy_process_group()  # the same run without a process group: autocast
    plain = TrainState.create(cfg)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    assert not is_sharded(plain.model)
    with plain.autocast():
        assert _activation_dtypes(plain.model, args) == BF16_PATH
    _nonzero_head(sharded), _nonzero_head(plain)
    a, b = sharded.step_on(x1, y), plain.step_on(x1, y)
    assert a["loss"].dtype == b["loss"].dtype == torch.float32
    torch.testing.assert_close(a["loss"], b["loss"], rtol=2e-2, atol=0)
    torch.testing.assert_close(a["loss_bootstrap"], b["loss_bootstrap"], rtol=5e-2, atol=0)


def _count_teacher_gathers(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the 2-process test: FSDP2 all-gathers (profiler events) of one objective.loss."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from shortcut_ray.distributed import gathered_teacher
    from shortcut_ray.train_step import TrainState, step_generator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = tiny_config(precision="bf16", num_workers=world)
    state = TrainState.create(cfg)
    x1, y = (v[: state.local_batch] for v in _batch(cfg))
    counts = []
    for gathered in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with gathered_teacher(state.ema) if gathered else contextlib.nullcontext():
                state.objective.loss(state.networks, x1, y, step_generator(0, 0, rank, state.device), 0,
                                     cfg.train.max_steps)
        counts.append(sum(e.name.startswith("FSDP::all_gather") and "copy" not in e.name for e in prof.events()))
    resharded = all(m._get_fsdp_state()._fsdp_param_group.is_sharded for m in state.ema.modules()
                    if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group)
    ema_modules = sum(isinstance(m, FSDPModule) for m in state.ema.modules())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"counts": counts, "ema_modules": ema_modules, "resharded": resharded}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_compiled_step_matches_eager(one_rank_group, monkeypatch):
    """Under FSDP2 the compiled regions (blocks, embedding, head) sit between the FSDP2 hooks."""
    import torch._dynamo

    import shortcut_ray.distributed as distributed
    from shortcut_ray.train_step import TrainState

    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "aot_eager")  # the plumbing, not CPU kernels
    torch._dynamo.reset()
    losses = []
    for mode in ("off", "on"):
        state = TrainState.create(tiny_config(compile=mode))
        _nonzero_head(state)
        losses.append(state.step_on(*_batch(state.cfg))["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_ema_teacher_gathered_once_per_step(tmp_path):
    """The shortcut teacher is called twice per step; with `gathered_teacher` each EMA FSDP module
    all-gathers once instead of twice (2 real gloo ranks; the cost: the EMA's bf16 params held
    through the loss), and every EMA module is resharded on exit so the EMA update writes fresh shards."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "gathers.json"
    mp.spawn(_count_teacher_gathers, args=(2, f"file://{tmp_path}/pg", str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert res["ema_modules"] == 5  # root, 2 blocks, 2 embedder output linears (fp32 policy)
    assert res["counts"][0] - res["counts"][1] == res["ema_modules"], res
    assert res["resharded"]


# -- compile: whole forward without graph breaks, batch buckets, selective checkpointing ----------------

@pytest.mark.parametrize("policy", [None, "selective"])
def test_whole_forward_has_no_graph_breaks(policy):
    """The single-process compile scope is the whole forward, fullgraph (train, teacher and sampling)."""
    import torch._dynamo

    from shortcut_ray.distributed import _checkpoint_blocks

    m = tiny()
    if policy:
        _checkpoint_blocks(m.blocks, policy)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(m._forward)(*inputs(4))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_batch_buckets_bound_the_compiled_graphs():
    """Compiled (dynamic=False): the training sizes run unpadded, any other batch is padded to a power
    of two and sliced, so eval/sampling batch sizes 3..16 cost 3 graphs, and outputs are unchanged."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from shortcut_ray.distributed import _compile

    m = tiny()
    eager = {b: m(*inputs(b, seed=b)) for b in (3, 5, 6, 7, 8, 12, 16)}
    m.exact_batches = frozenset({6})
    counter = CompileCounter()
    torch._dynamo.reset()
    _compile(m, whole=True, backend=counter)
    assert [m.batch_bucket(b) for b in (3, 5, 6, 7, 8, 12, 16)] == [4, 8, 6, 8, 8, 16, 16]
    for b, ref in eager.items():
        torch.testing.assert_close(m(*inputs(b, seed=b)), ref, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 4  # buckets 4, 8, 16 and the training size 6


def test_selective_checkpointing_keeps_gradients():
    from shortcut_ray.distributed import _checkpoint_blocks

    grads = []
    for policy in (None, "full", "selective"):
        m = tiny()
        if policy:
            _checkpoint_blocks(m.blocks, policy)
        m(*inputs(4)).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)


def test_compile_auto_is_on_for_cuda_only():
    from shortcut_ray.config import TrainConfig
    from shortcut_ray.distributed import resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().compile == "auto"
    assert resolve_compile(TrainConfig(), cuda) and not resolve_compile(TrainConfig(), cpu)
    assert resolve_compile(TrainConfig(compile=True), cpu) and not resolve_compile(TrainConfig(compile="false"), cuda)


# -- no host synchronisation in the training step ------------------------------------------------------

_SYNC_OPS = ("_local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "masked_select",
             "aten.unique", "_unique", "repeat_interleave", "aten.bincount", "aten.histc")


class HostSyncFinder(torch.utils._python_dispatch.TorchDispatchMode):
    """Finds, on CPU, what would block the host on a GPU. A tensor is "device data" when it is a
    parameter, buffer, optimiser moment, input batch or cached device constant, or is computed from
    one (creation ops on the step's device count as device data too). Flagged: a data-dependent op on
    device data (.item(), nonzero, bool(), ...: a device-to-host read), a cross-device copy, and
    host data (a non-scalar tensor computed on the host) meeting device data in one op: on a GPU
    that is a host-to-device copy in the middle of the step."""

    def __init__(self, device_tensors):
        super().__init__()
        self.device = {id(t): t for t in device_tensors}
        self.events: list[tuple[str, str, str]] = []

    def _is_dev(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        dev = [self._is_dev(t) for t in tensors]
        name = str(func)
        if any(dev) and any(s in name for s in _SYNC_OPS):
            self._flag(f"device-to-host read ({name})")
        elif any(dev) and any(not d and t.dim() > 0 for t, d in zip(tensors, dev)):
            self._flag(f"host data used by a device op ({name})")
        target = kwargs.get("device")
        if target is not None and tensors and any(t.device != torch.device(target) for t in tensors):
            self._flag(f"cross-device copy ({name})")
        out = func(*args, **kwargs)
        if any(dev) or not tensors:  # computed from device data, or created on the step's device
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.device[id(t)] = t
        return out

    def _flag(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "shortcut_ray" in f.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        self.events.append((what, where, frames[-1].line if frames else ""))


def _device_state(state, x1, y) -> list[torch.Tensor]:
    found = [x1, y, *state.model.parameters(), *state.ema.parameters(), *state.model.buffers(),
             *state.ema.buffers()]
    for s in state.optimizer.state.values():
        found += [v for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]  # not the host step count
    for name in ("_k_boot_dev", "_level_scale_dev"):  # layout tensors copied to the device once
        cached = getattr(state.objective, name, None)
        if isinstance(cached, tuple):
            cached = cached[0]
        if cached is not None:
            found.append(cached)
    return found


def _step_sync_events(train_type: str):
    from shortcut_ray.train_step import TrainState

    cfg = tiny_config(train_type)
    state = TrainState.create(cfg)
    x1, y = _batch(cfg)
    state.step_on(x1, y)  # warm-up: optimiser state and cached device constants exist from here on
    with HostSyncFinder(_device_state(state, x1, y)) as finder:
        state.step_on(x1, y)
    return finder.events


def test_host_sync_finder_sees_planted_syncs():
    p = torch.randn(4)
    with HostSyncFinder([p]) as finder:
        q = p * 2
        q.sum().item()  # device-to-host read
        torch.nonzero(q > 0)
        q * torch.arange(4.0).clamp(min=1)[torch.tensor([3, 2, 1, 0])]  # host-built tensor meets device data
        torch.ones(3) + q[:3]  # created "on the device" inside the step: fine
    kinds = [e[0].split(" (")[0] for e in finder.events]
    assert kinds == ["device-to-host read", "device-to-host read", "host data used by a device op"], finder.events


@pytest.mark.parametrize("train_type", ["shortcut", "flow_matching"])
def test_training_step_has_no_host_sync(train_type):
    events = _step_sync_events(train_type)
    assert events == [], events


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_has_no_sync():
    from shortcut_ray.train_step import TrainState

    cfg = tiny_config("flow_matching", precision="bf16", compile="off")
    state = TrainState.create(cfg, "cuda")
    x1, y = (v.cuda() for v in _batch(cfg))
    state.step_on(x1, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state.step_on(x1, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- MFU: peak FLOPs and FLOP accounting -----------------------------------------------------------------

@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", None),
    ("Tesla T4", None)])
def test_peak_flops_by_gpu_name(name, peak):
    from shortcut_ray.periodic import peak_flops_for

    assert peak_flops_for(name) == peak


def _counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _attention_flops(cfg, image_size: int) -> float:
    return cfg.depth * 2 * 2 * (image_size // cfg.patch_size) ** 4 * cfg.hidden_size  # QK^T and AV


def _counter_sees_sdpa() -> bool:
    q = torch.randn(1, 2, 4, 8)
    return _counted_flops(lambda: F.scaled_dot_product_attention(q, q, q)) > 0


def test_flops_per_forward_matches_flop_counter():
    from shortcut_ray.model import flops_per_forward

    m = tiny()
    b = 3
    with torch.no_grad():
        counted = _counted_flops(lambda: m._forward(*inputs(b)))
    formula = flops_per_forward(m.cfg, 8, 4)
    if not _counter_sees_sdpa():  # torch's counter has no formula for the CPU flash kernel
        formula -= _attention_flops(m.cfg, 8)
    assert counted == pytest.approx(formula * b, rel=1e-9)


def test_training_flops_are_three_forwards_plus_bootstrap():
    """The worker's FLOPs per image: 3x forward for the online pass (forward + backward) plus the
    teacher's two no-grad forwards on the bootstrap rows (x2 for the bootstrap-CFG rows). The only
    difference from the counted step: the backward computes no input gradient for the first layers
    (patch conv, the embedders' first linears), which the 3x rule counts (< 1% at DiT sizes)."""
    from types import SimpleNamespace

    from shortcut_ray.model import flops_per_forward
    from shortcut_ray.train_step import TrainState
    from shortcut_ray.worker import Runner

    cfg = tiny_config("shortcut")
    state = TrainState.create(cfg)
    x1, y = _batch(cfg)
    counted = _counted_flops(lambda: state.step_on(x1, y))
    per_image = Runner._flops_per_image(SimpleNamespace(cfg=cfg, state=state))
    lay = state.objective.layout
    assert lay.n_boot == 4 and lay.n_cfg >= 1  # teacher rows exist, CFG copies too
    d, n, b = cfg.model.hidden_size, (8 // 2) ** 2, cfg.train.global_batch
    first_layers_dgrad = 2 * n * d * 2 ** 2 * 4 + 2 * 2 * 256 * d  # patch conv + two embedders' first linear
    expected = (per_image - first_layers_dgrad) * b
    if not _counter_sees_sdpa():
        expected -= _attention_flops(cfg.model, 8) * per_image / flops_per_forward(cfg.model, 8, 4) * b
    assert counted == pytest.approx(expected, rel=1e-9)


# -- pinned batches ------------------------------------------------------------------------------------

def test_batches_are_pinned_only_for_a_gpu():
    from ray.data._internal.utils.torch_utils import DEFAULT_TENSOR_NON_BLOCKING_TRANSFER

    from shortcut_ray.data import pins_batches

    assert DEFAULT_TENSOR_NON_BLOCKING_TRANSFER  # Ray's device copy is non_blocking: pinning makes it async
    assert not pins_batches("cpu") and not pins_batches(None)  # None outside Ray Train: CPU
    assert pins_batches("cuda") == torch.cuda.is_available()


# -- the GPU suite runs on a bare machine (PyTorch only) ----------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_engine_imports_without_ray_or_mlflow():
    import subprocess

    code = ("import sys\nfor n in ('ray', 'mlflow'): sys.modules[n] = None\n"
            "import shortcut_ray.train_step, shortcut_ray.sampler, shortcut_ray.worker, shortcut_ray.checkpoint\n"
            "import bench.gpu_suite, bench.gpu_stages\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_gpu_suite_dry_run_env_stage(tmp_path):
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--stages", "env", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_suite_dryrun.json").read_text())
    assert res["kind"].startswith("CPU DRY RUN") and res["stages"]["env"]["status"] == "ok"


def test_trimmed_ray_wheel_drops_what_the_suite_never_runs_and_pip_installs_it(tmp_path):
    """bench/trim_ray_wheel.py on a small wheel of Ray's layout: the Java jars, the dashboard's web UI, the
    unused libraries and every tests/ folder go; the rest is byte-identical, RECORD lists exactly what is
    left with correct hashes, and pip installs the result."""
    import base64
    import hashlib
    import subprocess
    import zipfile

    from bench.trim_ray_wheel import trim

    files = {"ray/__init__.py": b"__version__ = '0.0.1'\n", "ray/data/read.py": b"x = 1\n",
             "ray/dashboard/modules/api.py": b"y = 2\n", "ray/jars/ray_dist.jar": b"J" * 5000,
             "ray/dashboard/client/build/main.js": b"js" * 2000, "ray/rllib/algo.py": b"rl",
             "ray/serve/api.py": b"s", "ray/llm/x.py": b"l", "ray/data/tests/test_x.py": b"t",
             "ray-0.0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 0.0.1\n",
             "ray-0.0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    src = tmp_path / "full" / "ray-0.0.1-py3-none-any.whl"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("ray-0.0.1.dist-info/RECORD", "stale\n")
    res = trim(str(src), str(tmp_path / "out"))
    kept = {"ray/__init__.py", "ray/data/read.py", "ray/dashboard/modules/api.py", "ray-0.0.1.dist-info/METADATA",
            "ray-0.0.1.dist-info/WHEEL"}
    with zipfile.ZipFile(res["wheel"]) as z:
        assert set(z.namelist()) == kept | {"ray-0.0.1.dist-info/RECORD"}
        assert all(z.read(n) == files[n] for n in kept)
        record = {line.split(",")[0]: line.split(",")[1:] for line in z.read("ray-0.0.1.dist-info/RECORD").decode().split()}
    for name in kept:
        digest = base64.urlsafe_b64encode(hashlib.sha256(files[name]).digest()).rstrip(b"=").decode()
        assert record[name] == [f"sha256={digest}", str(len(files[name]))], name
    assert record["ray-0.0.1.dist-info/RECORD"] == ["", ""] and len(record) == len(kept) + 1
    assert res["files_dropped"] == 6
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    res["wheel"]], check=True)
    assert (site / "ray" / "data" / "read.py").read_bytes() == b"x = 1\n" and not (site / "ray" / "jars").exists()
