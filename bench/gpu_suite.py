"""One GPU check of the hot path, for a bare machine with only PyTorch (no Ray, MLflow or internet).

    bash bench/gpu_suite.sh                 # on the GPU box: < 8 minutes, results in $OUT or bench/results
    bash bench/gpu_suite.sh --dry-run       # anywhere (CPU): every stage shrunk, plumbing only

Stages run one after another, each in its own Python process with its own time cap (a crash or a slow
compile loses that stage only), and the merged results are rewritten to `gpu_suite[_dryrun].json`
after every stage, so whatever finished is on disk when the budget or the machine runs out:

  env            device, versions, datasheet peak, a measured bf16 matmul ceiling
  train_eager    DiT-B/2 and DiT-XL/2 at the 256px-latent shape (32x32x4), shortcut and flow matching:
                 median step time, images/s, TFLOP/s, MFU (bootstrap forwards counted), peak memory,
                 and the shortcut / flow step-time ratio (goal <= 1.12; theory 1.083 at 1/8 bootstrap)
  sampling       1-step vs 128-step sampling throughput (goal: 1-step >= 100x the 128-step one)
  fsdp2          the FSDP2 mixed-precision path Ray Train runs, in a one-rank NCCL group
  compiled_b/xl  DiT-B/2, then DiT-XL/2, again with train.compile=on (whole forward, batch buckets);
                 last, as their compile time is the least predictable
Extra stage, not in the default list (ask with --stages compile_ratio):
  compile_ratio  compiled / eager step time of DiT-M/2 on 16x16x1, steps interleaved ABAB; meant for
                 a quiet CPU (python bench/gpu_suite.py --device cpu --stages compile_ratio)
Within a stage every finished point is saved too: a stage cut off by its cap keeps what it finished.

Ray and MLflow are blocked in every stage process (sys.modules entries set to None), so a stray
import fails here exactly as it would on the bare machine. The dry run uses tiny models, two timed
steps, CPU, gloo, and the aot_eager compile backend; its JSON is a plumbing check, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

for _blocked in ("ray", "mlflow"):  # the GPU box has neither: fail here as there
    sys.modules.setdefault(_blocked, None)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = {  # name -> (time cap s on GPU, what it does); the whole suite also has a budget (--budget-s)
    "env": (45, "device, versions, matmul ceiling"),
    "train_eager": (110, "DiT-B/2, DiT-XL/2 x shortcut, flow matching, eager"),
    "sampling": (60, "1-step vs 128-step sampling"),
    "fsdp2": (60, "FSDP2 path, one-rank NCCL group"),
    "compiled_b": (120, "DiT-B/2 x shortcut, flow matching, compiled (includes compile time)"),
    "compiled_xl": (170, "DiT-XL/2 x shortcut, flow matching, compiled (includes compile time)"),
}
EXTRA_STAGES = {  # not in the default GPU run
    "compile_ratio": (900, "compiled / eager step time of a small model, interleaved (for a quiet CPU)"),
}
SIZES = (("DiT-B/2", 256), ("DiT-XL/2", 128))  # (model, batch): XL/2 at 128 keeps the activations < 80 GB
SHRUNK = {"DiT-B/2": "DiT-T/2", "DiT-XL/2": "DiT-M/2"}


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
    from shortcut_ray.worker import peak_flops_for

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


# -- driver ------------------------------------------------------------------------------------------

_PARTIAL: list[Path] = []


def save_partial(result: dict) -> None:
    """Write the stage's results so far (the driver keeps them if the stage is cut off)."""
    if _PARTIAL:
        _write(_PARTIAL[0], result)


def run_stage(name: str, args) -> dict:
    import shortcut_ray.distributed as distributed

    if args.dry_run:
        distributed.COMPILE_BACKEND = "aot_eager"
    torch.manual_seed(0)
    result = globals()[f"stage_{name}"](args)
    leaked = [m for m in ("ray", "mlflow") if sys.modules.get(m) is not None]
    if leaked:
        raise RuntimeError(f"stage {name} imported {leaked}: the GPU box has neither")
    return result


def drive(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / ("gpu_suite_dryrun.json" if args.dry_run else "gpu_suite.json")
    summary = {"kind": "CPU DRY RUN: shrunk stages, plumbing check, NOT a measurement" if args.dry_run
               else "measurement", "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "budget_s": args.budget_s, "stages": {}}
    t_start = time.monotonic()
    failures = 0
    for name in args.stages.split(","):
        cap, what = {**STAGES, **EXTRA_STAGES}[name]
        left = args.budget_s - (time.monotonic() - t_start)
        if left < 20:
            summary["stages"][name] = {"status": "skipped", "reason": f"budget spent ({args.budget_s} s)"}
            _write(summary_path, summary)
            continue
        timeout = min(cap * (3 if args.dry_run else 1), left)
        print(f"[gpu_suite] {name}: {what} (cap {timeout:.0f} s)", flush=True)
        tmp = out_dir / f".{name}.json"
        cmd = [sys.executable, __file__, "--stage", name, "--stage-out", str(tmp), "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--dry-run"] if args.dry_run else [])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            err = proc.stderr[-3000:]
            ok = proc.returncode == 0 and tmp.exists()
            entry = {"status": "ok" if ok else f"failed (rc {proc.returncode})"}
            if ok:
                entry["result"] = json.loads(tmp.read_text())
            else:
                entry["stderr_tail"] = err
                sys.stderr.write(err)
        except subprocess.TimeoutExpired as e:
            entry = {"status": f"timed out after {timeout:.0f} s",
                     "stderr_tail": (e.stderr or "")[-3000:] if isinstance(e.stderr, str) else ""}
            if tmp.exists():
                entry["partial_result"] = json.loads(tmp.read_text())
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        failures += entry["status"] != "ok"
        _annotate_measured_mfu(summary, entry)
        tmp.unlink(missing_ok=True)
        summary["stages"][name] = entry
        summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _write(summary_path, summary)  # every stage is on disk before the next starts
        print(f"[gpu_suite] {name}: {entry['status']} in {entry['wall_s']} s -> {summary_path}", flush=True)
    return 1 if failures else 0


def _annotate_measured_mfu(summary: dict, entry: dict) -> None:
    """TFLOP/s of each training point over the bf16 matmul rate measured in the env stage."""
    ceiling = summary["stages"].get("env", {}).get("result", {}).get("matmul", {}).get("tflops")
    for res in (entry.get("result"), entry.get("partial_result")):
        for point in (res or {}).get("points", []) if ceiling else []:
            point["mfu_vs_measured_matmul"] = point["tflops"] / ceiling


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("SHRINK") == "1",
                   help="shrink every stage (tiny models, CPU, 2 steps); also SHRINK=1")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--budget-s", type=float, default=None,
                   help="whole suite, seconds (GPU default 450, under the 8 minutes asked; dry run 1200)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per point (compile happens here)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    args.budget_s = args.budget_s or (1200.0 if args.dry_run else 450.0)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.warmup = args.warmup or (1 if args.dry_run else 3)
    if args.stage:
        _PARTIAL.append(Path(args.stage_out))
        if args.dry_run:
            torch.set_num_threads(min(2, torch.get_num_threads()))
        result = run_stage(args.stage, args)
        Path(args.stage_out).write_text(json.dumps(result, default=str))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; use --dry-run for the CPU plumbing check")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
