r"""FID (and the pixel-space FD proxy) of a checkpoint at each requested step count, logged to MLflow.

    python -m jobs.evaluate runs/RUN/checkpoint_0001500 --steps 1,4,128 --samples 2048
    python -m jobs.evaluate runs/RUN/checkpoint_0001500/weights.safetensors --steps 1,4   # portable export
    python -m jobs.evaluate gs://BUCKET/runs/RUN/checkpoint_0100000 --samples 50000 \
        --fid-weights gs://BUCKET/weights/fid_inception_v3.pt --set train.num_workers=8 --set train.use_gpu=true
    python -m jobs.evaluate imported/celeba_dit_b --fid-ref-stats celeba256_fidstats_ours.npz \
        --fid-weights fid_inception_v3.pt --set data.uri=gs://BUCKET/celebahq256-latents   # the authors' statistics

Every Ray Train worker samples its share from fixed noise (the same for every N); features are gathered
and rank 0 computes the Frechet distances. Results go into the checkpoint's own MLflow run (its id is in
the checkpoint's state.json) as eval/fid/N{n} and eval/fd_pixel/N{n} at the checkpoint's step, plus an
artifact with the statistics, sample counts and which weights (online or EMA) were used. FID is
against --fid-ref-stats (our jobs.fid_stats output or the authors' mu/sigma .npz) when given, else
statistics of the run's real images; the reference's file, sha256 and source go into the JSON and
into MLflow params fid_ref.*.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from shortcut_ray import checkpoint
from shortcut_ray.config import Config, apply_overrides
from shortcut_ray.faults import PermanentError, explain
from shortcut_ray.storage import filesystem, is_remote, join_uri


def read_state(uri: str) -> dict:
    if not is_remote(uri) or uri.endswith(".safetensors"):
        return checkpoint.read_state(checkpoint.local_copy(uri))
    fs, path = filesystem(uri)
    try:
        return json.loads(fs.cat_file(join_uri(path, "state.json")))
    except FileNotFoundError:
        raise PermanentError(f"{uri} has no state.json: not a shortcut-ray checkpoint") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or URI")
    p.add_argument("--steps", default="", help="comma-separated N (default: the run's eval.fid_steps)")
    p.add_argument("--samples", type=int, default=0, help="samples per N (default: the run's eval.fid_samples)")
    p.add_argument("--fid-weights", default="", help="FID InceptionV3 weights (path/URI); empty: FD proxy only")
    p.add_argument("--fid-ref-stats", default="", help="reference statistics .npz (mu, sigma; path/URI), e.g. the "
                                                       "authors' celeba256_fidstats_ours.npz")
    p.add_argument("--weights", choices=("online", "ema"), default="", help="sample with these weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = p.parse_args(argv)
    try:
        meta = read_state(args.checkpoint)
    except PermanentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sets = list(args.set)
    if args.steps:
        sets.append(f"eval.fid_steps={args.steps}")
    if args.samples:
        sets.append(f"eval.fid_samples={args.samples}")
    if args.fid_weights:
        sets.append(f"eval.fid_weights={args.fid_weights}")
    if args.fid_ref_stats:
        sets.append(f"eval.fid_ref_stats={args.fid_ref_stats}")
    if args.weights:
        sets.append(f"ema.eval_with_ema={args.weights == 'ema'}")
    cfg = apply_overrides(Config.from_dict(meta["config"]), sets)
    if not cfg.train.storage_path:
        cfg = apply_overrides(cfg, [f"train.storage_path={tempfile.mkdtemp(prefix='shortcut-eval-')}"])
    from shortcut_ray.launch import build_evaluator, ensure_ray

    ensure_ray()
    try:
        result = build_evaluator(cfg, args.checkpoint).fit()
    except Exception as e:  # noqa: BLE001 - Train V2's fit() raises on worker errors: say the root cause
        print(f"[shortcut-ray] evaluation failed: {explain(e)}", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "eval.json")) as f:
            m = json.load(f)
    print(f"[shortcut-ray] {args.checkpoint} (step {m['step']}, {m['details']['samples']} samples, "
          f"{m['details']['weights']} weights):")
    for k in sorted(k for k in m if k.startswith("eval/")):
        print(f"  {k:<22} {m[k]:.3f}")
    if m["details"].get("fid_reference"):
        print(f"  FID reference: {m['details']['fid_reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
