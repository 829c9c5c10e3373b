"""Step time of the Ray Train + Ray Data path against a plain single-process PyTorch loop.

    python -m bench.ray_overhead --threads 1 --sequence a,b1,a,b1,a        # CPU here: ~10-14 min (load-bound)
    python -m bench.ray_overhead --threads 1 --sequence a,b1,b2,a          # with 2 FSDP2 workers (gloo)
    python -m bench.ray_overhead --device cuda --steps 300 --log-every 20 --threads 4   # on a GPU node

Same config (default preset `digits`: DiT-M/2 on 16x16 digits, global batch 64, shortcut), same torch
thread count, same step count, measured the same way (per log interval of --log-every steps:
elapsed / steps, with the host sync of the logged loss inside the interval):
  a   plain loop in this process: `TrainState.create` + batches sliced from an in-memory tensor of the
      decoded digits shards (new permutation every epoch), `state.step_on`, nothing else;
  bN  the real path: `launch.build_trainer(cfg).fit()` with N Ray Train workers (FSDP2 over gloo when
      N > 1) reading the same shards through Ray Data; the worker logs perf/step_time_s,
      perf/data_wait_frac per interval to MLflow (a throwaway sqlite store in a temp dir), read back here;
      also the wall-clock step time from the timestamps of the logged metrics (includes the logging
      itself and everything else between intervals).
The runs follow --sequence (default a,b1,a: the plain loop before and after shows drift of the shared
machine). The first --skip-intervals intervals of every run are dropped (start-up: first epoch,
allocator warm-up). ratio = median Ray interval step time / median plain interval step time; goal
<= 1.10. Whole runs (issue 15): ratio_whole_run compares first-to-last-log spans with epoch starts and
checkpoints inside (--checkpoint-every N: both write them), ratio_start_to_end the whole fit() against
create + loop. Sample grids, FID and the end-of-run model logging are off in both.
    python -m bench.ray_overhead --threads 2 --steps 1500 --log-every 100 --checkpoint-every 500 --sequence a,b1,a
Writes bench/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.common import (add_config_args, add_device_args, add_out_arg, add_ray_args, median, resolve_device,
                          set_threads, shard_images, write_result)
from shortcut_ray import data
from shortcut_ray.config import apply_overrides
from shortcut_ray.presets import get_preset
from shortcut_ray.train_step import TrainState

EXPERIMENT = "bench-ray-overhead"


def plain_loop(cfg, x_all: torch.Tensor, y_all: torch.Tensor, device: torch.device, ckpt_dir: str = "") -> dict:
    """(a): the step loop with nothing around it but the checkpoints a run writes (checkpoint.save at
    train.checkpoint_every, as the worker); per-interval step times as the worker measures them, plus
    the timestamp of every interval (whole-run span: first to last logged interval, as for Ray)."""
    from shortcut_ray import checkpoint

    t_all = time.perf_counter()
    state = TrainState.create(cfg, device)
    x_all, y_all = x_all.to(device), y_all.to(device)
    b, n, last, every = cfg.train.global_batch, len(x_all), cfg.train.max_steps, cfg.train.log_every
    g = torch.Generator().manual_seed(cfg.train.seed)
    intervals, t_log, since = [], time.perf_counter(), 0
    t_start = t_log
    while state.step < last:
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(n // b):  # drop_last, as data.batches
            if state.step >= last:
                break
            idx = perm[i * b:(i + 1) * b]
            metrics = state.step_on(x_all[idx], y_all[idx])
            since += 1
            if state.step % every == 0 or state.step == last:
                float(metrics["loss"])  # the host sync of the worker's _log
                now = time.perf_counter()
                intervals.append({"step": state.step, "step_time_s": (now - t_log) / since, "t": now - t_start})
                t_log, since = now, 0
            ck = cfg.train.checkpoint_every
            if ckpt_dir and ck > 0 and (state.step % ck == 0 or state.step == last):
                checkpoint.save(os.path.join(ckpt_dir, checkpoint.dir_name(state.step)), state.model, state.ema,
                                state.optimizer, state.step, cfg)
    span = intervals[-1]["t"] - intervals[0]["t"] if len(intervals) > 1 else None
    return {"intervals": intervals, "train_s": time.perf_counter() - t_start, "total_s": time.perf_counter() - t_all,
            "logged_span_s": span, "span_steps": intervals[-1]["step"] - intervals[0]["step"] if span else None}


def ray_run(cfg, workers: int, tmp: str, name: str) -> dict:
    """(bN): the real Ray Train + Ray Data path; per-interval metrics read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from shortcut_ray.launch import build_trainer, resolve_runtime

    uri = f"sqlite:///{tmp}/mlflow.db"
    run_cfg = resolve_runtime(apply_overrides(cfg, [
        f"train.num_workers={workers}", f"train.storage_path={tmp}/runs", f"train.run_name={name}",
        f"tracking.tracking_uri={uri}", f"tracking.experiment={EXPERIMENT}", f"tracking.run_name={name}"]))
    t0 = time.perf_counter()
    result = build_trainer(run_cfg).fit()
    total = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"Ray run {name} failed: {result.error}")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    hist = {k: sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
            for k in ("perf/step_time_s", "perf/data_wait_frac", "perf/images_per_s", "train/loss")}
    loss = hist["train/loss"]
    wall = {m2.step: (m2.timestamp - m1.timestamp) / 1000 / (m2.step - m1.step) for m1, m2 in zip(loss, loss[1:])}
    wait = {m.step: m.value for m in hist["perf/data_wait_frac"]}
    intervals = [{"step": m.step, "step_time_s": m.value, "data_wait_frac": wait.get(m.step),
                  "wall_step_time_s": wall.get(m.step)} for m in hist["perf/step_time_s"]]
    train_s = (loss[-1].timestamp - loss[0].timestamp) / 1000 if len(loss) > 1 else None
    return {"intervals": intervals, "fit_s": total, "run_id": run.info.run_id, "logged_span_s": train_s,
            "span_steps": loss[-1].step - loss[0].step if len(loss) > 1 else None,
            "final_step": result.metrics.get("step") if result.metrics else None}


def summarise(run: dict, skip: int) -> dict:
    kept = run["intervals"][skip:]
    out = {"intervals_used": len(kept), "step_time_median_s": median([i["step_time_s"] for i in kept]),
           "step_time_mean_s": statistics.fmean(i["step_time_s"] for i in kept)}
    if kept and kept[0].get("data_wait_frac") is not None:
        out["data_wait_frac_median"] = median([i["data_wait_frac"] for i in kept])
        out["data_wait_frac_mean"] = statistics.fmean(i["data_wait_frac"] for i in kept)
        walls = [i["wall_step_time_s"] for i in kept if i.get("wall_step_time_s")]
        if walls:
            out["wall_step_time_median_s"] = median(walls)
            out["wall_step_time_mean_s"] = statistics.fmean(walls)
    return out


def breakdown(runs: list[dict], kind: str, skip: int, log_every: int) -> dict:
    """Where the Ray path's extra time goes, from the stored intervals: data wait (mostly the epoch starts),
    the rest of the per-step excess over the plain loop, and the fixed cost of a fit() around the training."""
    plain = [iv["step_time_s"] for r in runs if r["run"] == "a" for iv in r["intervals"][skip:]]
    ray = [iv for r in runs if r["run"] == kind for iv in r["intervals"][skip:]]
    if not plain or not ray:
        return {}
    steps = log_every * len(ray)
    total = sum(iv["step_time_s"] * log_every for iv in ray)
    wait = sum(iv["step_time_s"] * log_every * (iv["data_wait_frac"] or 0.0) for iv in ray)
    excess = total - statistics.fmean(plain) * steps
    spiky = [iv for iv in ray if (iv["data_wait_frac"] or 0) > 0.2]
    fits = [r for r in runs if r["run"] == kind]
    return {"ray_interval_s": total, "plain_equivalent_s": statistics.fmean(plain) * steps,
            "excess_s": excess, "data_wait_s": wait, "data_wait_share_of_excess": wait / excess if excess > 0 else None,
            "intervals_with_data_wait_over_20pct": len(spiky), "intervals": len(ray),
            "data_wait_s_in_those": sum(iv["step_time_s"] * log_every * iv["data_wait_frac"] for iv in spiky),
            "ray_median_excluding_those_s": median([iv["step_time_s"] for iv in ray if iv not in spiky] or [float("nan")]),
            "fit_s": [r.get("fit_s") for r in fits], "logged_span_s": [r.get("logged_span_s") for r in fits]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_device_args(p, device_default="cpu")  # cuda: train.use_gpu=true for the Ray runs
    add_ray_args(p)
    add_out_arg(p, "ray_overhead")
    p.add_argument("--steps", type=int, default=60, help="train.max_steps of every run")
    p.add_argument("--log-every", type=int, default=5, help="train.log_every: the interval of one step-time sample")
    p.add_argument("--skip-intervals", type=int, default=2, help="start-up intervals dropped from every run")
    p.add_argument("--sequence", default="a,b1,a", help="runs in order: a = plain loop, bN = Ray with N workers")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="train.checkpoint_every of every run; the plain loop writes the same checkpoints")
    # --threads: torch threads of the plain loop AND of every Ray worker ($SHORTCUT_RAY_THREADS); 1 is
    # fastest on a small shared machine
    p.set_defaults(threads=1, out="ray_overhead")
    args = p.parse_args(argv)
    args.seq = [s.strip() for s in args.sequence.split(",") if s.strip()]
    for s in args.seq:
        if not (s == "a" or (s.startswith("b") and s[1:].isdigit())):
            p.error(f"bad --sequence item {s!r}: use a, b1, b2, ...")
    return args


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid -> (group, user + system CPU seconds so far). Groups: this process
    (the plain loop runs here), the Ray Train worker(s), Ray's other processes (GCS, raylet, dashboard,
    the Train controller and Data actors, idle workers), everything else."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        info, times = p.info, p.info.get("cpu_times")
        if times is None:
            continue
        title = " ".join(info.get("cmdline") or []) or (info.get("name") or "")
        group = ("this_process" if info["pid"] == os.getpid() else "ray_train_worker" if "RayTrainWorker" in title
                 else "ray_other" if "ray::" in title or "/ray/" in title or info.get("name") in ("raylet", "gcs_server")
                 else "other")
        out[info["pid"]] = (group, times.user + times.system)
    return out


class CpuUse:
    """Cores used per process group over a run (CPU seconds / wall seconds), sampled every `every` s in a
    thread: the Ray Train worker exits before fit() returns, so a before/after pair would miss it. A process
    born during the run counts from 0; one seen last at its final sample loses at most `every` s of CPU."""

    def __init__(self, every: float = 1.0):
        import threading

        self.every, self.first, self.last = every, cpu_seconds(), {}
        self.t0, self.stop = time.perf_counter(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            self.last.update(cpu_seconds())

    def result(self) -> dict:
        self.stop.set()
        self.thread.join()
        self.last.update(cpu_seconds())
        wall, used = time.perf_counter() - self.t0, {}
        for pid, (group, t) in self.last.items():
            used[group] = used.get(group, 0.0) + max(0.0, t - self.first.get(pid, (group, 0.0))[1])
        return {g: round(v / wall, 3) for g, v in sorted(used.items())}


def run_sequence(args, cfg, x_all, y_all, device) -> list[dict]:
    """The runs of --sequence in order, each with its per-interval summary."""
    tmp = tempfile.mkdtemp(prefix="bench-ray-overhead-")
    runs = []
    for i, what in enumerate(args.seq):
        t, cpu = time.perf_counter(), CpuUse()
        res = plain_loop(cfg, x_all, y_all, device, os.path.join(tmp, f"plain-{i}")) if what == "a" else \
            ray_run(cfg, int(what[1:]), tmp, f"overhead-{i}-{what}")
        seconds = time.perf_counter() - t
        res = {"run": what, "index": i, **res, "summary": summarise(res, args.skip_intervals),
               "seconds": seconds, "cores_used": cpu.result()}
        runs.append(res)
        s = res["summary"]
        print(f"  [{i}] {what}: median step {s['step_time_median_s']:.4f}s (mean {s['step_time_mean_s']:.4f}s)"
              + (f", wall median {s.get('wall_step_time_median_s', float('nan')):.4f}s, data wait "
                 f"{s['data_wait_frac_median']:.1%} median / {s['data_wait_frac_mean']:.1%} mean"
                 if "data_wait_frac_median" in s else "") + f"  ({res['seconds']:.0f}s); cores used "
              + ", ".join(f"{g} {c:.2f}" for g, c in res["cores_used"].items()), flush=True)
    return runs


def ratios_of(runs: list[dict], skip: int) -> dict:
    """Per Ray kind (b1, b2, ...): pooled medians / means of its kept intervals over those of the plain runs."""
    def pooled(kind: str, key: str = "step_time_s", agg=median) -> float | None:
        vals = [iv[key] for r in runs if r["run"] == kind for iv in r["intervals"][skip:] if iv.get(key) is not None]
        return agg(vals) if vals else None

    a_med, a_mean = pooled("a"), pooled("a", agg=statistics.fmean)

    def whole(kind: str, key: str) -> float | None:  # summed over the runs of a kind, per step
        rs = [r for r in runs if r["run"] == kind and r.get(key) and r.get("span_steps")]
        return sum(r[key] for r in rs) / sum(r["span_steps"] for r in rs) if rs else None

    def start_to_end(kind: str) -> float | None:  # fit() (Ray) / create + loop (plain), per run
        vals = [r.get("fit_s") or r.get("total_s") for r in runs if r["run"] == kind]
        return statistics.fmean(vals) if vals else None

    ratios = {}
    for kind in sorted({r["run"] for r in runs if r["run"] != "a"}):
        ratios[kind] = r = {
            "ratio_median": pooled(kind) / a_med,
            "ratio_mean": pooled(kind, agg=statistics.fmean) / a_mean,
            "ratio_wall_median": (pooled(kind, "wall_step_time_s") or float("nan")) / a_med,
            "ratio_wall_mean": (pooled(kind, "wall_step_time_s", statistics.fmean) or float("nan")) / a_mean,
            "step_time_median_s": pooled(kind), "plain_step_time_median_s": a_med,
            "data_wait_frac_median": pooled(kind, "data_wait_frac"),
            "data_wait_frac_mean": pooled(kind, "data_wait_frac", statistics.fmean),
            "ratio_whole_run": (whole(kind, "logged_span_s") or float("nan")) / (whole("a", "logged_span_s") or float("nan")),
            "whole_run_s_per_step": whole(kind, "logged_span_s"), "plain_whole_run_s_per_step": whole("a", "logged_span_s"),
            "ratio_start_to_end": (start_to_end(kind) or float("nan")) / (start_to_end("a") or float("nan")),
            "start_to_end_s": start_to_end(kind), "plain_start_to_end_s": start_to_end("a")}
        print(f"{kind}: ratio {r['ratio_median']:.3f} (median), {r['ratio_mean']:.3f} (mean), wall-clock "
              f"{r['ratio_wall_median']:.3f} (median), {r['ratio_wall_mean']:.3f} (mean), whole run "
              f"{r['ratio_whole_run']:.3f} (first to last log, checkpoints and epoch starts included), start to "
              f"end {r['ratio_start_to_end']:.3f} (fit() incl. Ray start-up vs create + loop); goal <= 1.10", flush=True)
    return ratios


DEFINITIONS = {
    "cores_used": "per run: CPU seconds (user + system, psutil) of each process group during the run / its wall "
                  "seconds; this_process runs the plain loop, ray_train_worker the Ray path's training, ray_other "
                  "is every other Ray process (GCS, raylet, dashboard, Train controller, Data actors); on a "
                  "2-core machine what ray_other uses is taken from the training threads",
    "step_time_s": "per log interval: elapsed / steps (a: with the loss host sync inside the interval; "
                   "b: the worker's perf/step_time_s, whose interval stops before its _log)",
    "wall_step_time_s": "b only: difference of consecutive MLflow timestamps of train/loss / steps, i.e. "
                        "including metric logging and everything else between two logs",
    "ratio_median": "pooled median over the kept intervals of all bN runs / the same for all a runs",
    "ratio_mean": "the same with means (includes the epoch-restart spikes the median hides)",
    "ratio_whole_run": "whole runs: (time from the first to the last logged interval) / steps in that span, "
                       "summed over the bN runs, over the same for the plain runs; epoch boundaries and the "
                       "checkpoints (train.checkpoint_every, written by both) are inside the span",
    "ratio_start_to_end": "mean fit() wall time (Ray Train controller, worker group, Ray Data, MLflow start-up "
                          "and tear-down included) over the plain loop's TrainState.create + loop"}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    os.environ["SHORTCUT_RAY_THREADS"] = str(threads)  # inherited by the Ray workers of the local cluster
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet that ray.init starts
    cfg = apply_overrides(get_preset(args.preset), [
        f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "train.sample_every=0",
        f"train.checkpoint_every={args.checkpoint_every}", "train.eval_every=0", "tracking.log_model=false",
        f"train.use_gpu={device.type == 'cuda'}", *args.set])
    import ray

    ray.init(num_cpus=args.ray_cpus or os.cpu_count())
    x_all, y_all = shard_images(data.resolve_dataset(cfg.data), cfg.data)
    rows, batch = len(x_all), cfg.train.global_batch
    print(f"preset {args.preset}: {rows} rows, batch {batch} ({rows // batch} steps/epoch), {args.steps} steps, "
          f"log every {args.log_every}, threads {threads}, sequence {args.seq}", flush=True)
    t0 = time.perf_counter()
    runs = run_sequence(args, cfg, x_all, y_all, device)
    ray.shutdown()
    ratios = ratios_of(runs, args.skip_intervals)
    b1 = ratios.get("b1") or next(iter(ratios.values()), None)
    payload = {
        "what": "median per-interval step time of the Ray Train + Ray Data path (bN: N workers) / the same "
                "config in a plain single-process loop (a); same threads, steps and measurement",
        "goal": "ratio <= 1.10", "ratio": b1["ratio_median"] if b1 else None,
        "settings": {"preset": args.preset, "overrides": args.set, "steps": args.steps, "log_every": args.log_every,
                     "skip_intervals": args.skip_intervals, "sequence": args.seq, "torch_threads": threads,
                     "ray_cpus": args.ray_cpus or os.cpu_count(), "global_batch": batch,
                     "ray_worker_niceness": args.worker_niceness, "driver_niceness": os.nice(0),
                     "rows_per_epoch": rows, "steps_per_epoch": rows // batch,
                     "cpus_per_worker": cfg.train.cpus_per_worker,
                     "model": f"h{cfg.model.hidden_size}-d{cfg.model.depth}-p{cfg.model.patch_size}",
                     "train_type": cfg.objective.train_type, "image_size": cfg.data.image_size},
        "definitions": DEFINITIONS, "ratios": ratios,
        "breakdown": {k: breakdown(runs, k, args.skip_intervals, args.log_every) for k in ratios},
        "runs": runs, "total_s": time.perf_counter() - t0}
    write_result(args.out, payload, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
