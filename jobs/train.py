r"""Train a shortcut model on Ray.

    python -m jobs.train --preset digits                       # embedded default, local Ray + MLflow
    python -m jobs.train --preset debug_cpu --set train.max_steps=50 --set optim.lr=3e-4
    python -m jobs.train --preset digits --resume digits-shortcut-20261122-101500   # continue a run
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.train --preset fashion_mnist_dit_s --set train.storage_path=gs://BUCKET/runs

The same (train.storage_path, run name) resumes from the run's latest checkpoint; --resume NAME is
shorthand for `--set train.run_name=NAME`. To warm-start a new run from another run's checkpoint use
`--set train.resume_from=URI`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from shortcut_ray.config import ConfigError, apply_overrides
from shortcut_ray.faults import explain
from shortcut_ray.presets import PRESETS, get_preset


def parse_config(argv=None, description=__doc__):
    from shortcut_ray.cli import config_reference

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_reference())
    p.add_argument("--preset", default="digits", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", default="", metavar="RUN_NAME", help="continue this run from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--progress", action="store_true",
                   help="show Ray Data's progress bars (= --set train.progress_bars=true; off by default)")
    args = p.parse_args(argv)
    try:
        cfg = apply_overrides(get_preset(args.preset), args.set + (["train.progress_bars=true"] if args.progress else []))
        if args.resume:
            cfg = apply_overrides(cfg, [f"train.run_name={args.resume}"])
    except (ConfigError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    return args, cfg


def main(argv=None) -> int:
    from shortcut_ray.console import summary_lines
    from shortcut_ray.launch import fit, resolve_runtime, storage_root

    args, cfg = parse_config(argv)
    cfg = resolve_runtime(cfg)
    if args.print_config:
        print(cfg.to_json())
        return 0
    t = cfg.train
    print(f"[shortcut-ray] run {t.run_name}: {t.max_steps} steps of batch {t.global_batch} on {t.num_workers} "
          f"{'GPU' if t.use_gpu else 'CPU'} worker(s); checkpoints in {storage_root(cfg)}/{t.run_name}, "
          f"MLflow {cfg.tracking.tracking_uri} (experiment {cfg.tracking.experiment})", flush=True)
    print("[shortcut-ray] starting Ray (first start: ~10-30 s) ...", flush=True)
    old_term = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM (job stop, kill) ends like Ctrl-C
    try:
        result = fit(cfg, resume=bool(args.resume))
    except (KeyboardInterrupt, SystemExit):  # Train V2's SIGINT handler aborts the run, may sys.exit(0)
        return _interrupted(cfg)
    except Exception as e:  # noqa: BLE001 - Train V2's fit() raises on worker errors: say the root cause
        print(f"[shortcut-ray] run {cfg.train.run_name} failed: {explain(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if result.error:
        print(f"[shortcut-ray] run {cfg.train.run_name} failed: {explain(result.error)}", file=sys.stderr)
        return 1
    if (result.metrics or {}).get("step", cfg.train.max_steps) < cfg.train.max_steps:  # aborted by Ctrl-C
        return _interrupted(cfg)
    ckpt = result.checkpoint.path if result.checkpoint else None
    metrics = result.metrics or {}
    for line in summary_lines(t.run_name, ckpt, metrics, cfg.tracking.tracking_uri, str(metrics.get("model_uri", ""))):
        print(f"[shortcut-ray] {line}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted(cfg) -> int:
    """Mark the run's MLflow run KILLED (its workers died with the driver) and say how to continue."""
    if cfg.tracking.enabled:
        from shortcut_ray.tracking import close_interrupted

        try:
            close_interrupted(cfg.tracking, cfg.train.run_name, "KILLED", "the driver was interrupted")
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            print(f"[shortcut-ray] warning: could not mark the MLflow run KILLED: {e}", file=sys.stderr)
    print(f"[shortcut-ray] run {cfg.train.run_name} interrupted; continue it with --resume {cfg.train.run_name}",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
