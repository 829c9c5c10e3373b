"""Sampling throughput at N = 1, 2, 4, ..., 128 steps, and the 128-step / 1-step time ratio.

    python -m bench.sample_throughput --device cuda --precision bf16 --compile --size DiT-B/2 --batch 256
    python -m bench.sample_throughput --device cuda --precision bf16 --compile --size DiT-XL/2 --batch 256
    python -m bench.sample_throughput --device cpu --size DiT-M/2 --image-size 16 --channels 1 \
        --num-classes 10 --batch 16 --repeats 3 --threads 1            # the `digits` model, minutes on CPU

Times `shortcut_ray.sampler.sample(model, noise, y, N)` (the project's any-step Euler sampler) on an
untrained ShortcutDiT whose zero-initialised final layer is re-initialised with small random weights
(N(0, init_std^2)), so every step computes a non-trivial velocity (timing only: the weights are not
trained). Every repeat sweeps all N from the same fixed noise, in forward order on even repeats and
reversed on odd ones, so all N see the same machine conditions. Reports the median seconds per call,
images/s, seconds per network forward, and time(N=128) / time(N=1) = throughput(1) / throughput(128)
(goal on a GPU: 1-step throughput >= 100x the 128-step one; 128 is the most it can be without
per-call overhead). Writes bench/results/sample_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from torch import nn

from bench.common import (add_device_args, add_out_arg, add_precision_args, device_tag, resolve_device, set_threads,
                          stats, synchronizer, write_result)

from shortcut_ray.config import Config, DataConfig, TrackingConfig, TrainConfig
from shortcut_ray.distributed import parallelize, resolve_precision
from shortcut_ray.model import DIT_SIZES, build_model, flops_per_forward, model_config
from shortcut_ray.sampler import fixed_noise, sample


def build(args, device: torch.device) -> tuple[nn.Module, Config]:
    cfg = Config(preset="bench_sample_throughput", model=model_config(args.size),
                 data=DataConfig(source="parquet", uri="synthetic://sample_throughput", image_size=args.image_size,
                                 channels=args.channels, num_classes=args.num_classes,
                                 kind="latents" if args.channels == 4 else "pixels"),
                 train=TrainConfig(global_batch=64, precision=args.precision,  # batch of the config only
                                   compile=args.compile, use_gpu=device.type == "cuda"),
                 tracking=TrackingConfig(enabled=False))
    torch.manual_seed(0)
    model = build_model(cfg, uses_step_level=True)  # the shortcut DiT (k used)
    # The official init zeroes the final layer, so an untrained model outputs exactly 0; re-init it so the
    # timed computation is realistic (non-zero velocities, x changes every step).
    for lin in (model.final.adaLN[1], model.final.linear):
        nn.init.normal_(lin.weight, std=args.init_std)
        nn.init.normal_(lin.bias, std=args.init_std)
    model.eval().requires_grad_(False)
    model = parallelize(model, cfg.train, device)  # device move + per-block compile, as in training
    return model, cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    add_precision_args(p)
    p.add_argument("--size", default="DiT-B/2", help=f"model size, one of {','.join(DIT_SIZES)}")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=None, help="images per sample() call (default 256 GPU, 16 CPU)")
    p.add_argument("--steps-list", default="1,2,4,8,16,32,64,128", help="step counts N to time")
    p.add_argument("--warmup", type=int, default=1, help="untimed sweeps over all N first (compile: use 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed sweeps over all N (default 5 GPU, 3 CPU)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance w (1: one conditional pass per step)")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the re-initialised final layer")
    add_out_arg(p, "sample_throughput_<device tag>")
    return p.parse_args(argv)


def sweeps(call, steps_list: list[int], warmup: int, repeats: int, barrier) -> tuple[dict, bool]:
    """Seconds of call(N) for every N, `repeats` sweeps after `warmup` untimed ones, alternating the
    direction (all N see the same machine conditions); and whether every output was finite."""
    for _ in range(warmup):
        for n in steps_list:
            call(n)
    barrier()
    times: dict[int, list[float]] = {n: [] for n in steps_list}
    finite = True
    for r in range(repeats):
        for n in (steps_list if r % 2 == 0 else steps_list[::-1]):
            barrier()
            t = time.perf_counter()
            x = call(n)
            barrier()
            times[n].append(time.perf_counter() - t)
            finite = finite and bool(torch.isfinite(x).all())
        print(f"  sweep {r + 1}/{repeats}: " + ", ".join(f"N{n} {times[n][-1]:.3f}s" for n in steps_list), flush=True)
    return times, finite


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    threads = set_threads(args.threads)
    batch = args.batch or (256 if gpu else 16)
    repeats = args.repeats or (5 if gpu else 3)
    steps_list = [int(s) for s in args.steps_list.split(",")]
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, cfg = build(args, device)
    precision = resolve_precision(cfg.train, device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    noise = fixed_noise((batch, args.channels, args.image_size, args.image_size), seed=42, device=device)
    y = torch.randint(0, args.num_classes, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    barrier = synchronizer(device)
    print(f"device {device} ({device_tag(device)}), threads {threads}, {args.size} on "
          f"{args.image_size}x{args.image_size}x{args.channels}, batch {batch}, N {steps_list}, precision {precision}, "
          f"compile {args.compile}, warm-up {args.warmup} + {repeats} sweeps", flush=True)

    def call(n: int) -> torch.Tensor:
        with amp:
            return sample(model, noise, y, n, args.cfg_scale, args.num_classes, cfg.objective.denoise_timesteps)

    t0 = time.perf_counter()
    times, finite = sweeps(call, steps_list, args.warmup, repeats, barrier)

    passes = 1 if args.cfg_scale in (0.0, 1.0) else 2  # guided sampling batches cond + uncond rows
    fwd = flops_per_forward(cfg.model, args.image_size, args.channels)
    rows = []
    base = stats(times[steps_list[0]])["median"]
    for n in steps_list:
        s = stats(times[n])
        rows.append({"num_steps": n, "seconds": s, "images_per_s": batch / s["median"],
                     "seconds_per_forward": s["median"] / n, "time_over_first": s["median"] / base,
                     "tflops": batch * n * passes * fwd / s["median"] / 1e12})
        print(f"  N={n:4d}  {s['median']:.4f}s  {batch / s['median']:10.1f} img/s  "
              f"{s['median'] / n * 1e3:8.2f} ms/forward", flush=True)
    by_n = {r["num_steps"]: r for r in rows}
    ratio = (by_n[128]["seconds"]["median"] / by_n[1]["seconds"]["median"]) if {1, 128} <= set(by_n) else None
    if ratio is not None:
        print(f"  time(128) / time(1) = {ratio:.1f}  (goal on GPU: >= 100)", flush=True)
    payload = {
        "what": "sampler.sample(model, noise, y, N) wall time per call (median over sweeps), untrained "
                "ShortcutDiT with a randomly re-initialised final layer",
        "goal": "GPU: 1-step throughput >= 100x the 128-step throughput, i.e. time(128)/time(1) >= 100",
        "settings": {"size": args.size, "image_size": args.image_size, "channels": args.channels,
                     "num_classes": args.num_classes, "batch": batch, "steps_list": steps_list,
                     "warmup_sweeps": args.warmup, "repeats": repeats, "precision": precision,
                     "compile": args.compile, "cfg_scale": args.cfg_scale, "init_std": args.init_std,
                     "torch_threads": threads},
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_forward_image": fwd, "outputs_finite": finite,
        "ratio_time_128_over_1": ratio, "rows": rows, "total_s": time.perf_counter() - t0}
    write_result(args.out or f"sample_throughput_{device_tag(device)}", payload, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
