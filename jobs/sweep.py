r"""Hyper-parameter sweep of a shortcut model on Ray Tune (each trial is a Ray Train run).

    python -m jobs.sweep --preset digits --num-samples 8                  # default space, ASHA, local Ray
    python -m jobs.sweep --preset digits --num-samples 12 --name lr-sweep \
        --space 'optim.lr=loguniform(1e-4,2e-3)' --space 'objective.bootstrap_every=choice(2,4,8)'
    python -m jobs.sweep --preset digits --scheduler fifo --search grid \
        --space 'objective.bootstrap_every=grid(2,4,8)' --space 'ema.decay=grid(0.99,0.995)'
    python -m jobs.sweep --preset digits --name lr-sweep --resume          # continue an interrupted sweep
    python -m jobs.sweep --preset digits --print-space                     # show the validated space
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.sweep --preset fashion_mnist_dit_s --num-samples 16 --name fm-sweep \
        --set train.storage_path=gs://BUCKET/runs --set tracking.tracking_uri=http://MLFLOW:5000

Quote --space values (parentheses are shell syntax). Space syntax, for any dotted config key, values
parsed with the field's type: choice(a,b,c), grid(a,b), uniform(lo,hi), loguniform(lo,hi),
randint(lo,hi) (hi exclusive); tuple values as [1,4]. Candidates the config rejects for the base config
(e.g. bootstrap_every values too large for the global batch) are dropped and listed. The default
metric eval/fd_pixel/N1 (min) is the 1-step pixel-space Frechet distance: cheap, needs no weights; use
--metric eval/fid/N1 with --set eval.fid_weights=... for real FID. On a cluster, give the head node
train_driver slots (`ray start ... --resources='{"train_driver": 8}'`, as cluster/ does) so trial
drivers take no CPU. Results: MLflow experiment tracking.experiment, a parent run named after the
sweep with one nested run per trial; the Tune state and Train runs under train.storage_path/NAME.
"""

from __future__ import annotations

import argparse
import json
import sys

from shortcut_ray.config import ConfigError, apply_overrides
from shortcut_ray.faults import PermanentError
from shortcut_ray.presets import PRESETS, get_preset


def parse_args(argv=None):
    from shortcut_ray import tune as st
    from shortcut_ray import tune_space as ts

    from shortcut_ray.cli import config_reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_reference())
    p.add_argument("--preset", default="digits", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override (repeatable)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND(ARGS)",
                   help="search dimension (repeatable); default: objective.bootstrap_every x ema.decay")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials (random/optuna; default 8) or repeats of the grid (--search grid; default 1)")
    p.add_argument("--scheduler", choices=st.SCHEDULERS, default="asha")
    p.add_argument("--search", choices=ts.SEARCHES, default="random", help="optuna needs `pip install optuna`")
    p.add_argument("--metric", default=st.DEFAULT_METRIC)
    p.add_argument("--mode", choices=("min", "max"), default=st.DEFAULT_MODE)
    p.add_argument("--name", default="", help="sweep name (default: sweep-<preset>-<time>); with --resume: which")
    p.add_argument("--resume", action="store_true", help="continue sweep --name if it exists (else start it)")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster's CPUs/GPUs allow")
    p.add_argument("--data-cpus", type=float, default=1.0, help="CPUs kept free for Ray Data tasks (default 1)")
    p.add_argument("--print-space", action="store_true", help="print the validated search space and exit")
    args = p.parse_args(argv)
    if args.resume and not args.name:
        p.error("--resume needs --name SWEEP")
    try:
        cfg = apply_overrides(get_preset(args.preset), args.set)
        space = ts.parse_space(args.space, cfg) if args.space else ts.default_space(cfg)
    except (ConfigError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    if args.num_samples is None:
        args.num_samples = 1 if args.search == "grid" else 8
    return args, cfg, space


def main(argv=None) -> int:
    from shortcut_ray import tune as st
    from shortcut_ray import tune_space as ts

    args, cfg, space = parse_args(argv)
    if args.print_space:
        for d in space.values():
            print(f"{d.key}={d.spec()}" + "".join(f"\n    dropped {v}: {why}" for v, why in d.dropped))
        return 0
    try:
        out = st.run_sweep(cfg, name=args.name, space=space, num_samples=args.num_samples, scheduler=args.scheduler,
                           search=args.search, metric=args.metric, mode=args.mode, resume=args.resume,
                           max_concurrent=args.max_concurrent, data_cpus=args.data_cpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermanentError as e:  # the driver-side checks (tracking, storage, dataset) said what to change
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        import ray

        ray.shutdown()
    if not out.finished:
        print(f"[shortcut-ray] sweep {out.name} interrupted; continue it with: "
              f"python -m jobs.sweep --preset {args.preset} --name {out.name} --resume", file=sys.stderr)
        return 1
    if out.best_trial_id is None:
        print(f"[shortcut-ray] sweep {out.name}: no trial reported {out.metric}; see {out.path}", file=sys.stderr)
        return 1
    best = next(t for t in out.trials if t["trial_id"] == out.best_trial_id)
    print(f"[shortcut-ray] sweep {out.name}: best trial {out.best_trial_id} {out.metric}={out.best_value:.4g}")
    print(f"[shortcut-ray] best params: {json.dumps(best['params'])}")
    sets = " ".join(f"--set {k}={ts.fmt_value(v)}" for k, v in best["params"].items())
    print(f"[shortcut-ray] best overrides: {sets}")
    print(f"[shortcut-ray] best checkpoint: {out.best_checkpoint}")
    if out.best_model_uri:
        print(f"[shortcut-ray] best model: {out.best_model_uri}  (mlflow.pyfunc.load_model('{out.best_model_uri}'))")
    for t in out.trials:
        print(f"[shortcut-ray] trial {t['trial_id']}: step {t['step']}, {out.metric} {t[out.metric]}, {t['params']}")
    uri = out.tracking_uri
    where = f"{uri}/#/experiments (parent run {out.parent_run_id})" if uri.startswith("http") else \
        f"mlflow ui --backend-store-uri {uri}  (parent run {out.parent_run_id})"
    print(f"[shortcut-ray] browse: {where}; Tune results: {out.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
