"""The measurements of the GPU suite (`bench/gpu_suite.py` runs each stage in its own process).

Each `stage_<name>(args)` returns a JSON-able dict; a stage that measures several points saves what it has
after each one (`save_partial`), so a stage cut off by its time cap keeps its finished points. Importable
on a bare PyTorch machine: no Ray, no MLflow (the suite blocks both before importing this), except the
optional data_wait stage, which needs Ray (carried as a trimmed wheel, bench/trim_ray_wheel.py).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
SIZES = (("DiT-B/2", 256), ("DiT-XL/2", 128))  # (model, batch): XL/2 at 128 keeps the activations < 80 GB
SHRUNK = {"DiT-B/2": "DiT-T/2", "DiT-XL/2": "DiT-M/2"}
NEEDS_RAY = ("data_wait",)  # stages that import Ray (from the carried trimmed wheel); the rest must not


# -- configs and timing ------------------------------------------------------------------------------

def make_config(size: str, batch: int, train_type: str, compile_: bool, args):
    from shortcut_ray.config import Config, DataConfig, EvalConfig, ObjectiveConfig, TrainConfig
    from shortcut_ray.model import model_config

    gpu = args.device == "cuda"
    if args.dry_run:
        model, data = model_config(SHRUNK[size]), DataConfig(image_size=8, channels=4, num_classes=10)
        objective, batch = ObjectiveConfig(train_type=train_type, denoise_timesteps=8, bootstrap_every=4), 16
        evals = EvalConfig(sample_steps=(1,), fid_steps=(1,))
    else:
        model, data = model_config(size), DataConfig(image_size=32, channels=4, num_classes=1000, kind="latents")
        objective, evals = ObjectiveConfig(train_type=train_type), EvalConfig()
    train = TrainConfig(global_batch=batch, precision="bf16" if gpu else "fp32", use_gpu=gpu,
                        compile="on" if compile_ else "off")
    return Config(model=model, data=data, objective=objective, train=train, eval=evals)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    """Seconds per call: CUDA events around each call on GPU, a host clock after a sync on CPU."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def peak_flops(device) -> float | None:
    from shortcut_ray.periodic import peak_flops_for

    return peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def nonzero_head(model) -> None:
    """The final layer is zero-initialised (§1.2); time on random outputs, never on zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (model.final.linear.weight, model.final.adaLN[1].weight):
            full = torch.randn(p.shape, generator=g) * 0.02
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full.to(p.device) if not hasattr(full, "device_mesh") else full)


def train_point(size: str, batch: int, train_type: str, compile_: bool, args) -> dict:
    """One (size, objective, compile) point: warm-up (incl. compile), then median step time etc."""
    from shortcut_ray.train_step import TrainState
    from shortcut_ray.worker import Runner

    device = torch.device(args.device)
    cfg = make_config(size, batch, train_type, compile_, args)
    state = TrainState.create(cfg, device)
    nonzero_head(state.model), nonzero_head(state.ema)
    g = torch.Generator(device=device).manual_seed(1)
    b, c, s = cfg.train.global_batch, cfg.data.channels, cfg.data.image_size
    x1 = torch.randn(b, c, s, s, generator=g, device=device)
    y = torch.randint(0, cfg.data.num_classes, (b,), generator=g, device=device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state.step_on(x1, y)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: state.step_on(x1, y), device, args.steps)
    step_s = statistics.median(times)
    flops_img = Runner._flops_per_image(SimpleNamespace(cfg=cfg, state=state))
    ips = b / step_s
    peak = peak_flops(device)
    point = {"model": cfg.model.__dict__ | {"name": SHRUNK[size] if args.dry_run else size},
             "train_type": train_type, "compile": compile_, "batch": b, "precision": cfg.train.precision,
             "warmup_steps": args.warmup, "warmup_s_incl_compile": round(warmup_s, 2), "timed_steps": args.steps,
             "step_s_median": step_s, "step_s_all": [round(t, 5) for t in times], "images_per_s": ips,
             "flops_per_image": flops_img, "tflops": ips * flops_img / 1e12,
             "mfu_vs_datasheet": ips * flops_img / peak if peak else None,
             "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
             "sharded": type(state.model).__name__.startswith("FSDP")}
    del state, x1, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return point


def train_grid(args, compile_: bool, sizes=SIZES) -> dict:
    out: dict = {"points": [], "ratios": {}}
    for size, batch in sizes:
        pts = {}
        for train_type in ("flow_matching", "shortcut"):
            pts[train_type] = train_point(size, batch, train_type, compile_, args)
            out["points"].append(pts[train_type])
            save_partial(out)
            print(json.dumps({k: pts[train_type][k] for k in ("train_type", "step_s_median", "images_per_s",
                                                               "mfu_vs_datasheet", "peak_mem_gb")} | {"size": size}),
                  flush=True)
        out["ratios"][size] = {"shortcut_over_flow_step_time": pts["shortcut"]["step_s_median"]
                               / pts["flow_matching"]["step_s_median"],
                               "flop_ratio": pts["shortcut"]["flops_per_image"] / pts["flow_matching"]["flops_per_image"]}
    return out


# -- stages ------------------------------------------------------------------------------------------

def stage_env(args) -> dict:
    device = torch.device(args.device)
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "device": args.device, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                 "memory_gb": props.total_memory / 2 ** 30, "peak_bf16_dense_datasheet": peak_flops(device),
                 "cuda": torch.version.cuda}
    n = 512 if args.dry_run else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timed(lambda: a @ b, device, 3)
    times = timed(lambda: a @ b, device, 10)
    info["matmul"] = {"n": n, "dtype": str(dtype), "s_median": statistics.median(times),
                      "tflops": 2 * n ** 3 / statistics.median(times) / 1e12}
    return info


def stage_train_eager(args) -> dict:
    return train_grid(args, compile_=False)


def stage_compiled_b(args) -> dict:
    return train_grid(args, compile_=True, sizes=SIZES[:1])


def stage_compiled_xl(args) -> dict:
    return train_grid(args, compile_=True, sizes=SIZES[1:])


def stage_sampling(args) -> dict:
    """Sampling throughput of the one-step and the 128-step sampler on the same model and noise."""
    from shortcut_ray.distributed import parallelize
    from shortcut_ray.model import build_model
    from shortcut_ray.sampler import fixed_noise, sample

    device = torch.device(args.device)
    out = {}
    for size, batch in SIZES:
        cfg = make_config(size, batch, "shortcut", False, args)
        model = parallelize(build_model(cfg, uses_step_level=True), cfg.train, device).eval()
        nonzero_head(model)
        n = cfg.train.global_batch
        noise = fixed_noise((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), 0, device)
        y = torch.arange(n, device=device) % cfg.data.num_classes
        m = cfg.objective.denoise_timesteps
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        row = {"batch": n, "max_steps": m}
        for steps, repeats in ((1, 10), (m, 1)):  # the 1-step warm-up also warms the M-step sampler
            with amp:
                run = lambda: sample(model, noise, y, steps, 1.0, cfg.data.num_classes, m)  # noqa: E731
                if steps == 1:
                    timed(run, device, 2)
                t = statistics.median(timed(run, device, repeats))
            row[f"N{steps}_images_per_s"] = n / t
        row["one_step_over_max_steps_throughput"] = row["N1_images_per_s"] / row[f"N{m}_images_per_s"]
        out[SHRUNK[size] if args.dry_run else size] = row
        print(json.dumps({size: row}), flush=True)
        save_partial(out)
        del model
    return out


def stage_compile_ratio(args) -> dict:
    """Compiled vs eager training steps of one small config, alternating step by step (ABAB), so a
    noisy machine slows both alike. Compile time is reported apart (the first warm-up step)."""
    import dataclasses

    from shortcut_ray.model import model_config
    from shortcut_ray.train_step import TrainState

    device = torch.device(args.device)
    cfg = make_config("DiT-B/2", 64, "shortcut", False, args)
    if not args.dry_run:
        cfg = dataclasses.replace(cfg, model=model_config("DiT-M/2"),
                                  data=dataclasses.replace(cfg.data, image_size=16, channels=1, num_classes=10))
    states, warm = {}, {}
    for mode in ("off", "on"):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=mode))
        states[mode] = TrainState.create(c, device)
    b, ch, side = cfg.train.global_batch, cfg.data.channels, cfg.data.image_size
    x1, y = torch.randn(b, ch, side, side, device=device), torch.randint(0, cfg.data.num_classes, (b,), device=device)
    for mode, st in states.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            st.step_on(x1, y)
        sync(device)
        warm[mode] = time.perf_counter() - t0
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.steps):
        for mode in ("off", "on"):
            times[mode] += timed(lambda: states[mode].step_on(x1, y), device, 1)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"model": cfg.model.__dict__, "batch": b, "image": [ch, side, side], "device": args.device,
            "threads": torch.get_num_threads(), "warmup_s": warm, "step_s": times, "step_s_median": med,
            "compiled_over_eager": med["on"] / med["off"]}


def stage_fsdp2(args) -> dict:
    """The FSDP2 path of multi-worker runs (a single worker trains the plain module) measured on one
    device: the same steps in a real one-rank group, sharded (distributed.SHARD_ONE_RANK), NCCL on GPU
    (gloo on CPU)."""
    import torch.distributed as dist

    import shortcut_ray.distributed as distributed

    distributed.SHARD_ONE_RANK = True

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        size, batch = SIZES[0]
        pts = [train_point(size, batch, tt, False, args) for tt in ("flow_matching", "shortcut")]
        assert all(p["sharded"] for p in pts), "the FSDP2 stage did not run sharded"
        return {"backend": backend, "points": pts,
                "shortcut_over_flow_step_time": pts[1]["step_s_median"] / pts[0]["step_s_median"]}
    finally:
        dist.destroy_process_group()


PARTIAL: list[Path] = []


def save_partial(result: dict) -> None:
    """Write the stage's results so far (the driver keeps them if the stage is cut off)."""
    if PARTIAL:
        write_json(PARTIAL[0], result)


def synthetic_latents(uri: str, rows: int, shape=(4, 32, 32), num_classes: int = 1000) -> dict:
    """SD-VAE-shaped latent shards (mean, logvar and their flips, float16) of random values: the bytes and
    decode work of the 256px-latent presets, with no dataset or VAE on the box."""
    import numpy as np

    from shortcut_ray.shards import array_bytes, write_shards

    rng = np.random.default_rng(0)
    mean = rng.standard_normal((rows, *shape), dtype=np.float32)
    cols = {c: array_bytes(mean if c.startswith("mean") else np.full_like(mean, -2.0), "float16")
            for c in ("mean", "logvar", "mean_flip", "logvar_flip")}
    return write_shards({**cols, "label": rng.integers(0, num_classes, rows)}, uri, 2048,
                        {"kind": "latents", "image_size": shape[1], "channels": shape[0], "num_classes": num_classes,
                         "latent_shape": list(shape)})


def stage_data_wait(args) -> dict:
    """Optional (needs Ray: carry the trimmed wheel, bench/trim_ray_wheel.py): the real input path, Ray
    Data over Parquet latent shards -> data.EpochStream -> TrainState.step_on, for DiT-B/2 at the
    256px-latent shape; the data-wait share of the step loop and the pipeline's headroom over the trainer
    (bench/data_throughput.py, which this runs)."""
    import tempfile

    from bench import data_throughput

    with tempfile.TemporaryDirectory(prefix="gpu-suite-latents-") as tmp:
        rows = 512 if args.dry_run else 8192
        synthetic_latents(os.path.join(tmp, "latents"), rows, (4, 8, 8) if args.dry_run else (4, 32, 32))
        model, batch = ("DiT-T/2", 64) if args.dry_run else ("DiT-B/2", 256)
        sets = [f"data.uri={tmp}/latents", "train.num_workers=1", f"train.global_batch={batch}",
                *[f"model.{k}={v}" for k, v in _model_fields(model).items()]]
        if args.dry_run:
            sets.append("data.image_size=8")
        argv = ["--device", args.device, "--preset", "imagenet256_dit_b", "--epochs", "2",
                "--train-steps", str(args.steps), "--loop-steps", str(max(20, 2 * rows // batch)),
                "--out", "gpu_suite_data_wait", *[a for kv in sets for a in ("--set", kv)]]
        result_dir = Path(tmp) / "result"
        data_throughput.main(argv, out_dir=result_dir)
        return json.loads((result_dir / "gpu_suite_data_wait.json").read_text())


def _model_fields(name: str) -> dict:
    from shortcut_ray.model import model_config

    return {k: v for k, v in model_config(name).__dict__.items() if k in ("hidden_size", "depth", "num_heads",
                                                                            "patch_size")}


def run_stage(name: str, args) -> dict:
    import shortcut_ray.distributed as distributed

    if args.dry_run:
        distributed.COMPILE_BACKEND = "aot_eager"
    torch.manual_seed(0)
    result = globals()[f"stage_{name}"](args)
    leaked = [m for m in (("mlflow",) if name in NEEDS_RAY else ("ray", "mlflow")) if sys.modules.get(m) is not None]
    if leaked:
        raise RuntimeError(f"stage {name} imported {leaked}: the GPU box has neither")
    return result


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
