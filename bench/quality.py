"""Sample quality: one shortcut model vs flow matching at N = 1, 2, 4, 8, 128 steps (FID, real Inception).

The paper's central claim at whatever scale the machine allows. The two arms are one grid sweep over
`objective.train_type` through the project's own sweep (`shortcut_ray.tune.run_sweep`): two Ray Tune
trials, each a Ray Train run with the SAME budget (model, batch, steps, optimiser, EMA, data, seed),
a failed trial retried by Tune from its last checkpoint (--retries), both tracked as nested MLflow runs
under one parent. Each run computes after its last step the FID of ALGORITHM §5 and the pixel-space
FD proxy at every N from fixed noise, and logs sample grids (N = 1..128).

    python -m bench.quality --fid-weights W.pt --data FMNIST_DIR --steps 2000 --fid-samples 500  # CPU: hours
    python -m bench.quality --fid-weights W.pt --dataset digits --steps 30 --fid-samples 64 \
        --out quality_smoke                                                                  # smoke
    python -m bench.quality --fid-weights W.pt --data FMNIST_DIR --preset fashion_mnist_dit_s --image-size 32 \
        --steps 30000 --batch 256 --fid-samples 10000 --threads 0 --model-set "" --lr 1e-4 --ema 0.999 \
        --set train.use_gpu=true --set train.cpus_per_worker=4 --sequential                   # GPU (owed)

Weights: --fid-weights or $SHORTCUT_FID_WEIGHTS; Fashion-MNIST: --data or $SHORTCUT_FASHION_MNIST.
Both arms are scored against ONE reference: the Inception statistics of the first `fid_samples`
training images in file order (as trained on: resized, [-1, 1]), given to both through
eval.fid_ref_stats. The real-vs-real floor is the FID of the NEXT `fid_samples` training images against
it (what a perfect generator scores at this sample count). Everything (MLflow sqlite store, artifacts,
Ray storage, reference statistics) lives in --workdir; the result JSON and the final all-N sample strips
go to bench/results/<out>.json / <out>_grid_<arm>.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS_DIR, add_config_args, add_out_arg, fashion_mnist_dir, fid_weights, shard_images, \
    write_result

REPO = Path(__file__).resolve().parent.parent
ARMS = ("shortcut", "flow_matching")
EXPERIMENT = "quality"
# The CPU-scale model: DiT with hidden 128, depth 4, 4 heads (the `digits` preset's DiT-M) at patch 4,
# i.e. 16 tokens on 16x16 images. Patch 2 (64 tokens) measured ~5x slower per step on a 2-core CPU.
CPU_MODEL = "model.hidden_size=128,model.depth=4,model.num_heads=4,model.patch_size=4"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)  # --preset (the base of both arms) and --set (extra overrides of both)
    p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default $SHORTCUT_FASHION_MNIST)")
    p.add_argument("--fid-weights", default=None, help="FID Inception weights (default $SHORTCUT_FID_WEIGHTS)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000, help="training steps of EACH arm")
    p.add_argument("--batch", type=int, default=64, help="global batch of each arm")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay (0.999 needs far more steps, ALGORITHM §9.2)")
    p.add_argument("--eval-weights", choices=("ema", "online"), default="ema", help="weights that sample")
    p.add_argument("--model-set", default=CPU_MODEL, help="comma-separated model.* overrides ('' = the preset's)")
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--fid-steps", default="1,2,4,8,128")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per arm")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker; 0 = torch's default")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: enough "
                   "for both arms at once)")
    p.add_argument("--sequential", action="store_true", help="run the arms one after the other")
    p.add_argument("--retries", type=int, default=2, help="Tune retries of a failed arm (it resumes its run)")
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real FID floor")
    p.add_argument("--workdir", default=str(REPO / "runs" / "quality"))
    p.add_argument("--collect", default="", metavar="SWEEP",
                   help="train nothing: rebuild the JSON from the finished sweep SWEEP in MLflow")
    add_out_arg(p, "quality_<dataset>_<size>px")
    return p.parse_args(argv)


def base_config(args, workdir: Path):
    """The config both arms share (the sweep sets objective.train_type, run names and storage)."""
    from shortcut_ray.config import apply_overrides, override
    from shortcut_ray.presets import get_preset

    data = ({"data.source": "fashion_mnist", "data.uri": fashion_mnist_dir(args.data)} if args.dataset ==
            "fashion_mnist" else {"data.source": "digits", "data.uri": ""})
    s = args.steps
    cfg = override(get_preset(args.preset), {
        **data, "data.image_size": args.image_size, "data.channels": 1, "data.num_classes": 10,
        "data.random_flip": False, "optim.lr": args.lr, "ema.decay": args.ema,
        "ema.eval_with_ema": args.eval_weights == "ema", "train.global_batch": args.batch, "train.max_steps": s,
        "train.num_workers": args.workers, "train.cpus_per_worker": max(1, args.threads),
        "train.log_every": max(1, min(50, s // 10)), "train.sample_every": s,
        "train.checkpoint_every": max(1, s // 4), "train.eval_every": s, "train.storage_path": str(workdir / "ray"),
        "eval.fid_weights": fid_weights(args.fid_weights), "eval.fid_steps": args.fid_steps,
        "eval.fid_samples": args.fid_samples, "eval.sample_steps": (1, 2, 4, 8, 16, 32, 64, 128),
        "eval.grid_size": 8, "tracking.tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "tracking.experiment": EXPERIMENT, "tracking.tags": "bench=quality"})
    return apply_overrides(cfg, [kv for kv in args.model_set.split(",") if kv.strip()] + list(args.set))


# -- reference statistics ---------------------------------------------------------------------------------

def inception_stats(extractor, images: torch.Tensor):
    from shortcut_ray.fid import FeatureStats

    feats = torch.cat([extractor(images[i:i + 64]) for i in range(0, images.shape[0], 64)])
    return FeatureStats.from_features(feats.double().numpy())


def reference(cfg, uri: str, workdir: Path, extractor, floor: bool) -> tuple[str, dict, dict | None]:
    """(path of the reference statistics, how they were made, the real-vs-real floor), cached in workdir
    by (dataset, size, count, weights)."""
    from shortcut_ray.fid import FeatureStats

    n = cfg.eval.fid_samples
    key = f"{Path(uri).name}-first{n}-{extractor.weights_id.split(':')[-1]}"
    path, side, floor_file = (workdir / f"ref-{key}{ext}" for ext in (".npz", ".json", ".floor.json"))
    if not path.exists():
        t0 = time.perf_counter()
        inception_stats(extractor, shard_images(uri, cfg.data, 0, n)[0]).save(str(path))
        side.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "computed": _now()}))
    info = {"path": str(path), "images": f"training images 0..{n - 1} in file order", "count": n,
            **json.loads(side.read_text())}
    if floor and not floor_file.exists():
        t0 = time.perf_counter()
        fid = inception_stats(extractor, shard_images(uri, cfg.data, n, n)[0]).frechet_distance(
            FeatureStats.load(str(path)))
        floor_file.write_text(json.dumps({"fid": fid, "images": f"training images {n}..{2 * n - 1} vs the reference",
                                          "count": n, "seconds": round(time.perf_counter() - t0, 1)}))
    return str(path), info, json.loads(floor_file.read_text()) if floor_file.exists() else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the sweep and reading it back -------------------------------------------------------------------------

def run_arms(args, cfg, name: str) -> None:
    """Both arms as one Tune grid over objective.train_type (shortcut_ray.tune.run_sweep)."""
    from shortcut_ray.tune import init_local_ray, run_sweep
    from shortcut_ray.tune_space import Dim

    if args.threads > 0:
        os.environ["SHORTCUT_RAY_THREADS"] = str(args.threads)  # inherited by the workers of the local Ray
    if not os.environ.get("RAY_ADDRESS"):
        per_arm = args.workers * max(1, args.threads) + 1  # workers + one for Ray Data
        init_local_ray(num_cpus=args.ray_cpus or max(os.cpu_count() or 1, 2 * per_arm))
    space = {"objective.train_type": Dim("objective.train_type", "grid", ARMS)}
    run_sweep(cfg, name=name, space=space, num_samples=1, scheduler="fifo", search="grid",
              metric=f"eval/fid/N{cfg.eval.fid_steps[0]}", mode="min", max_concurrent=1 if args.sequential else 2,
              max_trial_failures=args.retries)


def read_arms(cfg, name: str, out_stem: str) -> dict:
    """Per arm: FID and FD per N, losses, timings and the final sample strip, from the sweep's MLflow runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}' and tags.`sweep.role` = 'parent'")
    if not parent:
        raise SystemExit(f"no sweep {name!r} in {cfg.tracking.tracking_uri}")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    arms = {}
    for run in children:
        arm = run.data.params.get("objective.train_type")
        arms[arm] = read_run(client, run, cfg, RESULTS_DIR / f"{out_stem}_grid_{arm}.png")
    missing = set(ARMS) - set(arms)
    if missing:
        raise SystemExit(f"sweep {name!r} has no MLflow run for {sorted(missing)}")
    return {"parent_run_id": parent[0].info.run_id, "arms": arms}


def read_run(client, run, cfg, grid: Path) -> dict:
    m, steps, tmp = run.data.metrics, cfg.train.max_steps, Path(cfg.train.storage_path) / f".read-{run.info.run_id}"
    per_n = {str(n): {"fid": m.get(f"eval/fid/N{n}"), "fd_pixel": m.get(f"eval/fd_pixel/N{n}")}
             for n in cfg.eval.fid_steps}
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        report = json.loads(Path(client.download_artifacts(run.info.run_id, f"eval/step_{steps:07d}.json",
                                                           str(tmp))).read_text())
        shutil.copyfile(client.download_artifacts(run.info.run_id, f"samples/step_{steps:07d}/all_N.png", str(tmp)),
                        grid)
    except Exception as e:  # noqa: BLE001 - a finished run without them is recorded, not fatal
        report, grid = {"error": f"could not read the eval report / grid: {e}"}, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for n, entry in per_n.items():
        entry["seconds_sampling"] = report.get("per_N", {}).get(n, {}).get("seconds_sampling")
    return {"per_N": per_n, "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "seconds": round((run.info.end_time - run.info.start_time) / 1000, 1) if run.info.end_time else None,
            "final_loss": m.get("train/loss"), "final_loss_flow": m.get("train/loss_flow"),
            "final_loss_bootstrap": m.get("train/loss_bootstrap"), "step_time_s": m.get("perf/step_time_s"),
            "eval_report": {k: v for k, v in report.items() if k != "per_N"},
            "grid": str(grid.relative_to(REPO)) if grid else None}


def criteria(sc: dict, fm: dict) -> dict:
    """Shortcut better at 1..8 steps, within 10 % at 128; goal 1-step <= 2x 128-step. A missing FID (failed
    run) makes the comparisons that need it None, never a false pass."""
    def fid(d, n):
        v = d.get(str(n), {}).get("fid")
        return float(v) if v is not None and np.isfinite(v) else None

    out = {f"shortcut_better_at_{n}": None if None in (fid(sc, n), fid(fm, n)) else fid(sc, n) < fid(fm, n)
           for n in (1, 2, 4, 8) if str(n) in sc}
    a, b, one = fid(sc, 128), fid(fm, 128), fid(sc, 1)
    if a is not None and b is not None:
        out.update(relative_gap_at_128=(a - b) / b, within_10pct_at_128=abs(a - b) <= 0.10 * b)
    if a is not None and one is not None:
        out.update(shortcut_1step_over_128step=one / a, goal_1step_le_2x_128step=one <= 2 * a)
    parts = [out.get("shortcut_better_at_1"), out.get("shortcut_better_at_4"), out.get("within_10pct_at_128")]
    out["expected_ordering_held"] = None if None in parts else all(parts)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t0, load_start = time.perf_counter(), [round(v, 1) for v in os.getloadavg()]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out_stem = args.out or f"quality_{args.dataset}_{args.image_size}px"
    name = args.collect or f"quality-{args.dataset}-{args.image_size}px-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    cfg = base_config(args, workdir)
    from shortcut_ray.config import override
    from shortcut_ray.data import resolve_dataset
    from shortcut_ray.fid import load_inception

    uri = resolve_dataset(cfg.data)  # shards written once, before two trials could race to write them
    extractor = load_inception(cfg.eval.fid_weights)
    ref_path, ref_info, floor = reference(cfg, uri, workdir, extractor, floor=not args.no_floor)
    print(f"[quality] reference {ref_info}; floor {floor}", flush=True)
    cfg = override(cfg, {"eval.fid_ref_stats": ref_path})
    if not args.collect:
        run_arms(args, cfg, name)
    runs = read_arms(cfg, name, out_stem)
    sc, fm = (runs["arms"][arm].pop("per_N") for arm in ARMS)
    payload = {
        "dataset": args.dataset, "image_size": args.image_size, "steps": args.steps, "global_batch": args.batch,
        "fid_samples": args.fid_samples, "floor_real_vs_real": floor, "shortcut": sc, "flow_matching": fm,
        "criteria": criteria(sc, fm), "reference_stats": ref_info,
        "inception": {"weights": cfg.eval.fid_weights, "weights_id": extractor.weights_id,
                      "input_range": list(extractor.input_range)},
        "setup": {"preset": args.preset, "model": args.model_set or f"preset {args.preset}", "lr": args.lr,
                  "ema_decay": args.ema, "sampling_weights": args.eval_weights, "workers_per_arm": args.workers,
                  "torch_threads_per_worker": args.threads, "arms_run": "sequential" if args.sequential else
                  "concurrent", "extra_sets": args.set},
        "sweep": {"name": name, "tracking_uri": cfg.tracking.tracking_uri, "experiment": EXPERIMENT, **runs},
        "seconds": None if args.collect else round(time.perf_counter() - t0, 1),
        "load_average": {"start": load_start, "end": [round(v, 1) for v in os.getloadavg()]},
        "note": f"FID-{args.fid_samples}: small-sample FID is biased upwards; compare with floor_real_vs_real, "
                "not with published numbers"}
    write_result(out_stem, payload, device=torch.device("cuda" if cfg.train.use_gpu else "cpu"))
    print(f"[quality] criteria: {json.dumps(payload['criteria'])}", flush=True)
    return 0 if all(r["status"] == "FINISHED" for r in runs["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
