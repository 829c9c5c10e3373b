r"""The paper's comparison (ALGORITHM §6.7, §7.2) in one command: every method, the same budget, one table.

    python -m jobs.compare --preset compare_digits_tiny --output runs/compare-tiny        # seconds per method
    nohup python -m jobs.compare --preset fashion_mnist_16px --output runs/compare-fmnist16 \
        --set eval.fid_weights=/work/shared/weights/fid_inception_v3.pt > compare.log 2>&1 &
    python -m jobs.compare --preset fashion_mnist_16px --output runs/compare-fmnist16 --resume \
        --set eval.fid_weights=/work/shared/weights/fid_inception_v3.pt   # after a crash: the same arguments
    python -m jobs.compare --preset fashion_mnist_16px --output runs/compare-fmnist16 --resume --tune  # + tuned row
    python -m jobs.compare --preset fashion_mnist_16px --output runs/compare-fmnist16 --reevaluate \
        --set eval.fid_weights=/path/fid_inception_v3.pt       # + FID: every method evaluated again, none retrained

Trains flow matching (also the teacher), then shortcut, consistency training, live reflow and diffusion
from scratch, progressive and consistency distillation from the flow-matching checkpoint, generates
(noise, sample) pairs and trains two-stage reflow on them, one Ray Train run after another (--parallel: as
many at a time as the cluster fits), each a child
MLflow run of one parent run. Every method is evaluated the same way on this process (same samples,
same noise, N = eval.fid_steps) with the real-vs-real floor at that sample count. Writes into --output
(and as artifacts of the parent run): results.md (the table), results.json (every number, the sampler of
each method and the exact commands), fd_vs_steps.png and strips.png. --resume skips finished stages
(<output>/state.json). The --set overrides apply to every method; --resume takes the same ones. With
--reevaluate a trained comparison may take other eval.* settings: every method is evaluated again, none
retrained, and the previous evaluation moves to <output>/superseded/<time>/.
"""

from __future__ import annotations

import argparse
import sys

from shortcut_ray.config import ConfigError
from shortcut_ray.presets import PRESETS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fashion_mnist_16px", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--output", required=True, help="folder for the runs, the evaluations, the table and the plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every method, e.g. --set train.max_steps=2000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the comparison in --output, skipping done stages (same --set as it was started with)")
    p.add_argument("--reevaluate", action="store_true",
                   help="a trained comparison with other eval.* settings (e.g. --set eval.fid_weights=... to add "
                        "FID): every method evaluated again, none retrained; the previous evaluation is kept in "
                        "<output>/superseded/")
    p.add_argument("--tune", action="store_true",
                   help="add a tuned shortcut row: a Tune grid over objective.bootstrap_every and ema.decay at the "
                        "same budget, the best trial evaluated like every method (with --resume: added to a "
                        "finished comparison)")
    p.add_argument("--parallel", action="store_true",
                   help="train independent methods at once, as many as the Ray cluster fits (the five from scratch, "
                        "then the three that need the flow-matching teacher); the table is the same")
    args = p.parse_args(argv)
    from shortcut_ray.compare import run_compare

    try:
        results = run_compare(args.preset, args.set, args.output, resume=args.resume, argv=argv, tune=args.tune,
                              parallel=args.parallel, reevaluate=args.reevaluate)
    except (ConfigError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    from shortcut_ray.compare_report import table
    from shortcut_ray.compare import TABLE_ORDER

    from shortcut_ray.compare_report import metrics_of

    print("\n".join(table(results, TABLE_ORDER, m) for m in metrics_of(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
