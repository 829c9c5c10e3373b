"""Ray Data input pipeline throughput against the rate the trainer consumes, and the data-wait share.

    python -m bench.data_throughput --device cpu --preset digits --threads 1         # CPU, ~4 min here
    python -m bench.data_throughput --device cpu --preset digits --threads 1 --materialize   # what-if
    python -m bench.data_throughput --device cpu --preset fashion_mnist_dit_s --tag-preset --pipeline-only \
        --set data.uri=FASHION_MNIST_IDX_DIR                                         # 60k rows, no trainer
    python -m bench.data_throughput --device cuda --preset fashion_mnist_dit_s --tag-preset \
        --set data.uri=FASHION_MNIST_IDX_DIR                                         # on a GPU node

Three measurements in one process, on a local Ray cluster (`ray.init(num_cpus=--ray-cpus)`):
  1. pipeline alone: rows/s of exactly the training input path, `data.build_dataset` (Parquet shards ->
     decode) consumed through `ds.streaming_split(1)` by `data.batches` (iter_torch_batches with the
     config's local shuffle buffer and prefetch, to --device), for --epochs epochs; per epoch the
     time to the first batch (the pipeline start-up every epoch pays) and the steady rate after it;
  2. trainer alone: images/s of `TrainState.step_on` on one fixed batch of the same config (median of
     --train-steps steps, device synchronised);
  3. both together, the way worker.Runner.run does it: `data.EpochStream.next()` (data.readahead_mb of
     batches read ahead across epochs by a thread; 0 = inline) timed as data wait, then
     `step_on`, no per-step device sync, for --loop-steps steps (crossing epochs): data_wait_frac =
     wait / wall, the quantity the worker logs as perf/data_wait_frac.
The headroom = pipeline epoch rate (rows / epoch seconds, start-up included) / trainer images/s says whether
the input keeps up (> 1) on average; data_wait_frac says how much of it the trainer still waits for (an
epoch whose rows all arrive in one burst after a long start-up keeps up on average and still stalls).
Writes bench/results/data_throughput_<device>.json (or data_throughput_<device>_<preset> with --tag-preset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.common import (add_config_args, add_device_args, add_out_arg, add_ray_args, device_tag, median,
                          resolve_device, set_threads, stats, timed, write_result)

from shortcut_ray import data
from shortcut_ray import shards
from shortcut_ray.config import apply_overrides
from shortcut_ray.presets import get_preset


def pipeline_epochs(shard, batch: int, cfg, device, epochs: int) -> tuple[list[dict], tuple]:
    """Iterate whole epochs of the streaming split; per epoch: rows, seconds, first-batch latency, rates.
    Also returns the first batch seen (for the trainer-alone measurement)."""
    out, kept = [], None
    for e in range(epochs):
        t0 = time.perf_counter()
        first, rows, arrivals = None, 0, []
        for x, y in data.batches(shard, batch, cfg.data, device):
            now = time.perf_counter()
            kept = kept or (x, y)
            if first is None:
                first = now - t0
            arrivals.append(now)
            rows += x.shape[0]
        total = time.perf_counter() - t0
        steady = (rows - batch) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else None
        out.append({"epoch": e, "rows": rows, "batches": len(arrivals), "seconds": total,
                    "first_batch_s": first, "rows_per_s": rows / total, "steady_rows_per_s": steady})
        print(f"  pipeline epoch {e}: {rows} rows in {total:.2f}s ({rows / total:.0f} rows/s incl. start-up; "
              f"first batch after {first:.2f}s; steady {steady or float('nan'):.0f} rows/s)", flush=True)
    return out, kept


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_device_args(p)
    add_ray_args(p)
    p.add_argument("--epochs", type=int, default=3, help="pipeline-alone epochs")
    p.add_argument("--train-steps", type=int, default=None, help="timed trainer steps (default 20 GPU, 5 CPU)")
    p.add_argument("--loop-steps", type=int, default=None,
                   help="steps of the combined loop (default: 2 epochs of batches, at least 20)")
    p.add_argument("--pipeline-only", action="store_true", help="skip the trainer (e.g. a big model on CPU)")
    p.add_argument("--materialize", action="store_true",
                   help="what-if: ds.materialize() the decoded dataset once (no per-epoch read + decode; freezes "
                        "random flips / latent sampling, so not what training does) to isolate the epoch start-up")
    p.add_argument("--tag-preset", action="store_true", help="add the preset to the results name")
    add_out_arg(p, "data_throughput_<device tag>")
    return p.parse_args(argv)


def open_pipeline(args, cfg) -> tuple:
    """(the one streaming split of the training dataset, dataset info, settings to record)."""
    import ray

    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet that ray.init starts
    ray.init(num_cpus=args.ray_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    uri = data.resolve_dataset(cfg.data)
    resolve_s = time.perf_counter() - t0
    info = shards.dataset_info(uri)
    ds = data.build_dataset(cfg.data, uri, seed=cfg.train.seed)
    materialize_s = None
    if args.materialize:
        t0 = time.perf_counter()
        ds = ds.materialize()
        materialize_s = time.perf_counter() - t0
    settings = {"preset": args.preset, "overrides": args.set, "batch": cfg.train.global_batch, "dataset_uri": uri,
                "dataset_rows": info["count"], "shards": len(info["shards"]), "image_size": cfg.data.image_size,
                "channels": cfg.data.channels, "kind": cfg.data.kind, "shuffle_buffer": cfg.data.shuffle_buffer,
                "prefetch_batches": cfg.data.prefetch_batches, "epochs": args.epochs,
                "ray_cpus": ray.cluster_resources().get("CPU"), "torch_threads": torch.get_num_threads(),
                "ray_worker_niceness": args.worker_niceness, "resolve_dataset_s": resolve_s,
                "materialized": args.materialize, "materialize_s": materialize_s,
                "model": f"h{cfg.model.hidden_size}-d{cfg.model.depth}-p{cfg.model.patch_size}",
                "train_type": cfg.objective.train_type}
    return ds.streaming_split(1, equal=True)[0], info, settings


def combined_loop(stream, state, loop_steps: int, device) -> dict:
    """Both, as worker.Runner.run: next() timed as data wait, no per-step sync."""
    waits, steps_done, epochs_started = [], 0, 0
    t_start = time.perf_counter()
    while steps_done < loop_steps:
        epochs_started += 1
        while steps_done < loop_steps:
            t0 = time.perf_counter()
            b = stream.next()
            waits.append(time.perf_counter() - t0)
            if b is None:
                break
            state.step_on(*b)
            steps_done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, wait, batch = time.perf_counter() - t_start, sum(waits), state.local_batch
    return {"steps": steps_done, "epochs_started": epochs_started, "wall_s": wall,
            "images_per_s": steps_done * batch / wall, "data_wait_s": wait, "data_wait_frac": wait / wall,
            "wait_per_next_s": stats(waits), "waits_over_100ms": sum(w > 0.1 for w in waits)}


def trainer_and_loop(args, cfg, shard, x, y, info, device, pipe) -> dict:
    """2. the trainer alone on one batch of the pipeline, 3. both together; the payload entries."""
    from shortcut_ray.train_step import TrainState

    batch = cfg.train.global_batch
    state = TrainState.create(cfg, device)
    t = timed(lambda: state.step_on(x, y), warmup=2, repeats=args.train_steps or (20 if device.type == "cuda" else 5),
              sync=device)
    trainer_ips = batch / median(t)
    print(f"  trainer alone: {median(t):.3f}s/step = {trainer_ips:.1f} img/s", flush=True)
    stream = data.EpochStream(shard, batch, cfg.data, device)  # what Runner.run reads from
    loop = combined_loop(stream, state, args.loop_steps or max(20, 2 * (info["count"] // batch)), device)
    stream.close()
    # The epoch rate (start-up included) is what a trainer sees; the rate after the first batch can be far
    # higher when the pipeline delivers an epoch in a few big blocks (then it only measures the iterator).
    out = {"trainer": {"step_time_s": stats(t), "images_per_s": trainer_ips}, "loop": loop,
           "headroom_pipeline_over_trainer": pipe["rows_per_s_incl_startup_median"] / trainer_ips,
           "headroom_after_first_batch": pipe["steady_rows_per_s_median"] / trainer_ips}
    print(f"  combined loop: {loop['steps']} steps, {loop['images_per_s']:.1f} img/s, data wait "
          f"{loop['data_wait_s']:.2f}s of {loop['wall_s']:.1f}s = {loop['data_wait_frac']:.1%}; headroom "
          f"{out['headroom_pipeline_over_trainer']:.1f}x (epoch rate incl. start-up), "
          f"{out['headroom_after_first_batch']:.1f}x (after the first batch)", flush=True)
    return out


def main(argv=None, out_dir=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), args.set)
    batch = cfg.train.global_batch  # one process = one worker holding the whole global batch
    shard, info, settings = open_pipeline(args, cfg)
    print(f"device {device} ({device_tag(device)}), threads {threads}, preset {args.preset}: {info['count']} rows "
          f"({len(info['shards'])} shards) at {settings['dataset_uri']}, batch {batch}, ray cpus "
          f"{settings['ray_cpus']}", flush=True)
    epochs, (x, y) = pipeline_epochs(shard, batch, cfg, device, args.epochs)  # 1. the pipeline alone
    warm = epochs[1:] or epochs  # the first epoch also pays Ray Data's first-use costs
    pipe = {"epochs": epochs,
            "rows_per_s_incl_startup_median": median([e["rows_per_s"] for e in warm]),
            "steady_rows_per_s_median": median([e["steady_rows_per_s"] for e in warm if e["steady_rows_per_s"]]),
            "first_batch_s_median": median([e["first_batch_s"] for e in warm])}
    payload: dict = {
        "what": "Ray Data pipeline (build_dataset + streaming_split + data.batches) rows/s vs TrainState.step_on "
                "images/s on the same config, and the data-wait share of the combined loop",
        "settings": settings, "pipeline": pipe}
    if not args.pipeline_only:
        payload.update(trainer_and_loop(args, cfg, shard, x, y, info, device, pipe))
    import ray

    ray.shutdown()
    name = args.out or (f"data_throughput_{device_tag(device)}" + (f"_{args.preset}" if args.tag_preset else "")
                        + ("_materialized" if args.materialize else ""))
    write_result(name, payload, device, out_dir=out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
