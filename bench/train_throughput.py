"""Training-step throughput, MFU and peak memory: shortcut vs flow matching on the same model and batch.

    python -m bench.train_throughput --device cuda --precision bf16 --compile \
        --sizes DiT-S/2,DiT-B/2,DiT-XL/2 --batch 256                      # on a GPU (H100: ~10 min)
    python -m bench.train_throughput --device cpu --sizes DiT-S/2 --batch 8 --steps 3 --warmup 1 --threads 1

For every model size and input shape (32x32x4 SD-VAE latents, 32x32x1 pixels) it builds two
`TrainState`s that differ only in `objective.train_type` and times `state.step_on(x1, y)` (the whole
step: objective incl. the teacher's half-steps, backward, AdamW, EMA) on one fixed synthetic batch,
alternating the two objectives step by step (ABBA) so that a noisy machine slows both alike. It reports
the median step time, images/s, TFLOP/s and MFU (GPU only; FLOPs per image from the config, with the
worker's own formula: fwd * (3 + 2 n_boot / B) for shortcut, fwd * 3 for flow matching), the peak memory
of one step (GPU only), the CUDA host syncs inside one step (GPU only, torch.cuda.set_sync_debug_mode),
and the shortcut / flow-matching step-time ratio next to the FLOP ratio (theory 1.083 at
bootstrap_every = 8; goal on an H100 <= 1.12).

Batches too small for the bootstrap layout (B // bootstrap_every < 7 levels, which the config refuses)
are allowed for timing only: the states are built at the smallest valid batch and the objective is
rebuilt for the asked batch (all its bootstrap rows then use level k = 0; the FLOPs are the same).
Writes bench/results/train_throughput_<device>.json (device tag: cpu, h100, ...).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import (add_device_args, add_out_arg, add_precision_args, device_tag, interleaved, reset_peak,
                          resolve_device, set_threads, stats, tensor_bytes, write_result)

from shortcut_ray.config import (Config, DataConfig, ObjectiveConfig, TrackingConfig, override,
                                 TrainConfig)
from shortcut_ray.distributed import resolve_precision
from shortcut_ray.model import DIT_SIZES, flops_per_forward, model_config
from shortcut_ray.objectives import build_objective
from shortcut_ray.train_step import TrainState

SHAPES = {  # name -> data config fields (the model input; no dataset is read)
    "latents32x4": dict(image_size=32, channels=4, num_classes=1000, kind="latents"),
    "pixels32x1": dict(image_size=32, channels=1, num_classes=10, kind="pixels"),
}
OBJECTIVES = ("flow_matching", "shortcut")
GB = 2 ** 30


def make_config(size: str, shape: str, batch: int, args, use_gpu: bool) -> Config:
    """The benchmark config; global_batch is raised to the smallest valid one when `batch` is too small
    for the shortcut layout (the objective is then rebuilt for `batch`, see `make_state`)."""
    obj = ObjectiveConfig(train_type="shortcut", bootstrap_every=args.bootstrap_every)
    need = obj.num_levels * obj.bootstrap_every
    valid = batch
    if batch // obj.bootstrap_every < obj.num_levels:
        valid = math.ceil(need / obj.bootstrap_every) * obj.bootstrap_every
    return Config(
        preset="bench_train_throughput",
        model=model_config(size),
        objective=obj,
        data=DataConfig(source="parquet", uri="synthetic://train_throughput", random_flip=False, **SHAPES[shape]),
        train=TrainConfig(global_batch=valid, max_steps=10 ** 9, use_gpu=use_gpu, precision=args.precision,
                          compile=args.compile, activation_checkpointing=args.activation_checkpointing),
        tracking=TrackingConfig(enabled=False))


def make_state(cfg: Config, train_type: str, batch: int, device: torch.device) -> TrainState:
    cfg = override(cfg, {"objective.train_type": train_type})
    st = TrainState.create(cfg, device)
    if batch != cfg.train.global_batch:  # timing-only layout for a batch the config would refuse
        st.objective = build_objective(cfg.objective, cfg.data.num_classes, batch)
    return st


def flops_per_image(st: TrainState) -> float:
    """The worker's formula (worker.Runner._flops_per_image), applied to this state."""
    if hasattr(st, "flops_per_image"):  # if it gets factored out of the worker
        return float(st.flops_per_image())
    from shortcut_ray.worker import Runner

    return float(Runner._flops_per_image(SimpleNamespace(cfg=st.cfg, state=st)))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from shortcut_ray.periodic import peak_flops as _peak_flops

    return _peak_flops(device)


def state_bytes(st: TrainState) -> int:
    """Parameters + buffers of the online and EMA models + optimiser state (grads are freed every step)."""
    tensors = [*st.model.parameters(), *st.model.buffers(), *st.ema.parameters(), *st.ema.buffers()]
    for s in st.optimizer.state.values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


def step_memory(st: TrainState, step, device: torch.device) -> dict:
    """Peak memory of one step of this state alone: its resident state + the step's transient peak
    (grads, activations, temporaries), measured as max_memory_allocated - memory_allocated before."""
    resident = state_bytes(st)
    out = {"resident_state_gb": resident / GB}
    if device.type != "cuda":
        return {**out, "peak_step_gb": None, "transient_gb": None}
    reset_peak(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    transient = torch.cuda.max_memory_allocated(device) - before
    return {**out, "peak_step_gb": (resident + transient) / GB, "transient_gb": transient / GB,
            "process_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB}


def host_syncs(step, device: torch.device) -> dict | None:
    """CUDA host synchronisations inside one step (torch.cuda.set_sync_debug_mode('warn')); GPU only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()})
    return {"count": len(msgs), "where": where, "first": msgs[:3]}


def run_config(size: str, shape: str, batch: int, args, device: torch.device) -> dict:
    cfg = make_config(size, shape, batch, args, device.type == "cuda")
    d = cfg.data
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(batch, d.channels, d.image_size, d.image_size, generator=g)
    if d.kind == "pixels":
        x1 = x1.clamp(-1, 1)
    x1 = x1.to(device)
    y = torch.randint(0, d.num_classes, (batch,), generator=g).to(device)
    t_build = time.perf_counter()
    states = {tt: make_state(cfg, tt, batch, device) for tt in OBJECTIVES}
    steps = {tt: (lambda st=st: st.step_on(x1, y)) for tt, st in states.items()}
    build_s = time.perf_counter() - t_build
    print(f"  built {size} {shape} B={batch} in {build_s:.1f}s; warm-up {args.warmup} + {args.steps} timed steps each",
          flush=True)
    times = interleaved(steps, warmup=args.warmup, repeats=args.steps, sync=device)
    peak = peak_flops(device)
    row: dict = {"size": size, "shape": shape, "batch": batch, "config_batch": cfg.train.global_batch,
                 "precision": resolve_precision(cfg.train, device), "compile": args.compile,
                 "params": sum(p.numel() for p in states["shortcut"].model.parameters()),
                 "flops_per_forward_image": flops_per_forward(cfg.model, d.image_size, d.channels),
                 "build_s": build_s, "objectives": {}}
    for tt, st in states.items():
        s = stats(times[tt])
        fpi = flops_per_image(st)
        ips = batch / s["median"]
        lay = st.objective.layout
        row["objectives"][tt] = {
            "step_time_s": s, "images_per_s": ips, "flops_per_image": fpi, "tflops": ips * fpi / 1e12,
            "mfu": ips * fpi / peak if peak else None, "n_boot": lay.n_boot, "n_cfg": lay.n_cfg,
            "bootstrap_levels": lay.k_boot.tolist()}
    for tt, st in states.items():  # after timing: these extra steps are not in the medians
        row["objectives"][tt].update(step_memory(st, steps[tt], device))
        row["objectives"][tt]["host_syncs_per_step"] = host_syncs(steps[tt], device)
    sc, fm = row["objectives"]["shortcut"], row["objectives"]["flow_matching"]
    row["ratio_shortcut_over_fm"] = sc["step_time_s"]["median"] / fm["step_time_s"]["median"]
    row["ratio_shortcut_over_fm_min"] = sc["step_time_s"]["min"] / fm["step_time_s"]["min"]
    row["ratio_theory_flops"] = sc["flops_per_image"] / fm["flops_per_image"]
    print(f"  {size:8s} {shape:12s} B={batch:4d}"
          f"  fm {fm['step_time_s']['median']:.4f}s ({fm['images_per_s']:.1f} img/s)"
          f"  sc {sc['step_time_s']['median']:.4f}s ({sc['images_per_s']:.1f} img/s)"
          f"  ratio {row['ratio_shortcut_over_fm']:.3f} (theory {row['ratio_theory_flops']:.3f})"
          + (f"  mfu fm {fm['mfu']:.3f} sc {sc['mfu']:.3f}" if fm["mfu"] else ""), flush=True)
    del states, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    add_precision_args(p)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--sizes", default=None, help="comma list of model sizes (default: DiT-S/2,DiT-B/2 and "
                   f"DiT-XL/2 on a GPU); known: {','.join(DIT_SIZES)}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 256 on GPU, 8 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per objective (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per objective first "
                   "(default 3, or 5 with --compile, on GPU; 1 on CPU)")
    p.add_argument("--bootstrap-every", type=int, default=8)
    p.add_argument("--no-oom-retry", action="store_true", help="on CUDA OOM record it instead of halving the batch")
    add_out_arg(p, "train_throughput_<device tag>")
    return p.parse_args(argv)


def _rows_with_oom_retry(size: str, shape: str, args, device) -> list[dict]:
    """One measured row; on CUDA OOM an error row and a retry at half the batch (unless --no-oom-retry)."""
    rows, batch = [], args.batch
    while True:
        try:
            return rows + [run_config(size, shape, batch, args, device)]
        except torch.cuda.OutOfMemoryError as e:
            gc.collect()
            torch.cuda.empty_cache()
            if args.no_oom_retry or batch // 2 < args.bootstrap_every:
                return rows + [{"size": size, "shape": shape, "batch": batch, "error": f"CUDA OOM: {e}"[:300]}]
            print(f"  OOM at batch {batch}; retrying with {batch // 2}", flush=True)
            rows.append({"size": size, "shape": shape, "batch": batch, "error": "CUDA OOM (retried at half batch)"})
            batch //= 2


def _summary(ok: list[dict]) -> dict:
    return {f"{r['size']} {r['shape']} B={r['batch']}": {
        "ratio_shortcut_over_fm": round(r["ratio_shortcut_over_fm"], 4),
        "ratio_theory_flops": round(r["ratio_theory_flops"], 4),
        "fm_images_per_s": round(r["objectives"]["flow_matching"]["images_per_s"], 2),
        "shortcut_images_per_s": round(r["objectives"]["shortcut"]["images_per_s"], 2),
        "shortcut_mfu": r["objectives"]["shortcut"]["mfu"],
        "shortcut_peak_step_gb": r["objectives"]["shortcut"]["peak_step_gb"]} for r in ok}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    threads = set_threads(args.threads)
    sizes = (args.sizes or ("DiT-S/2,DiT-B/2,DiT-XL/2" if gpu else "DiT-S/2,DiT-B/2")).split(",")
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r} in --shapes; choose from {list(SHAPES)}")
    args.batch = args.batch or (256 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else ((5 if args.compile else 3) if gpu else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores, as is usual
        torch.backends.cudnn.allow_tf32 = True
    print(f"device {device} ({device_tag(device)}), threads {threads}, sizes {sizes}, shapes {shapes}, "
          f"batch {args.batch}, steps {args.steps}, warmup {args.warmup}, precision {args.precision}, "
          f"compile {args.compile}", flush=True)

    t0 = time.perf_counter()
    rows = [row for size in sizes for shape in shapes for row in _rows_with_oom_retry(size, shape, args, device)]
    summary = _summary([r for r in rows if "error" not in r])
    payload = {
        "what": "median step time of TrainState.step_on (objective + backward + AdamW + EMA), shortcut vs flow "
                "matching on the same model, batch and synthetic data, alternated step by step (ABBA)",
        "goal": "shortcut / flow-matching step time <= 1.12 on an H100 at bootstrap_every=8 (theory 1.083)",
        "settings": {"sizes": sizes, "shapes": {s: SHAPES[s] for s in shapes}, "batch": args.batch,
                     "steps": args.steps, "warmup": args.warmup, "precision": args.precision,
                     "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
                     "bootstrap_every": args.bootstrap_every, "torch_threads": threads},
        "definitions": {
            "flops_per_image": "worker.Runner._flops_per_image: flops_per_forward * (3 + 2 * (n_boot + n_cfg) / B)",
            "mfu": "images/s * flops_per_image / dense bf16 peak of the GPU (periodic.peak_flops); null on CPU",
            "peak_step_gb": "resident state of this objective's TrainState (params + EMA + AdamW state) + the step's "
                            "transient peak (max_memory_allocated - memory_allocated before the step); GPU only",
            "ratio_shortcut_over_fm": "median shortcut step time / median flow-matching step time"},
        "summary": summary, "rows": rows, "total_s": time.perf_counter() - t0}
    write_result(args.out or f"train_throughput_{device_tag(device)}", payload, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
