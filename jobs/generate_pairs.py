r"""Generate (noise, sample) pairs from a flow-matching teacher for two-stage reflow (ALGORITHM §6.6).

    python -m jobs.generate_pairs --teacher runs/RUN/checkpoint_0001500 --output data/digits-pairs --count 20000
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.generate_pairs --teacher gs://BUCKET/runs/RUN/checkpoint_0030000 \
        --output gs://BUCKET/pairs/fmnist-fm --count 60000 --precision bf16

Batch inference on Ray Data actors (one per GPU when the cluster has GPUs), written as a paired
dataset in the shard format with a manifest naming the teacher and the sampler. Rerunning the same
command resumes: finished shards are verified and skipped. Then train flow matching on the pairs with
`--set data.source=parquet --set data.uri=OUTPUT --set data.random_flip=false` and the paired objective.
"""

from __future__ import annotations

import argparse
import sys

from shortcut_ray.config import ConfigError
from shortcut_ray.pairs import PairPlan, generate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="flow-matching checkpoint directory or URI (…/checkpoint_NNNNNNN)")
    p.add_argument("--output", required=True, help="where the paired shards go (local dir or gs://...)")
    p.add_argument("--count", type=int, required=True, help="number of pairs")
    p.add_argument("--steps", type=int, default=128, help="teacher Euler steps (default 128, its best sampler)")
    p.add_argument("--weights", default="ema", choices=("ema", "online"), help="teacher weights (default ema)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance w (default: the teacher's eval.cfg_scale if class-conditional)")
    p.add_argument("--labels", default="uniform", choices=("uniform", "dataset"),
                   help="uniform over classes, or the class proportions of the teacher's training set")
    p.add_argument("--seed", type=int, default=0, help="row i's noise and label depend on (seed, i) only")
    p.add_argument("--shard-size", type=int, default=1024, help="pairs per Parquet shard (the unit of resume)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored x0 / x1 precision")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="teacher forward precision")
    p.add_argument("--batch-size", type=int, default=256, help="rows per teacher forward")
    p.add_argument("--concurrency", type=int, default=None, help="actors (default: one per GPU, else 1)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor (default: when the cluster has GPUs)")
    p.add_argument("--overwrite", action="store_true", help="regenerate an output that holds another plan")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray (tiny jobs, debugging)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    plan = PairPlan(teacher=a.teacher, count=a.count, steps=a.steps, weights=a.weights, cfg_scale=a.cfg_scale,
                    seed=a.seed, labels=a.labels, shard_size=a.shard_size, dtype=a.dtype, precision=a.precision)
    try:
        result = generate(plan, a.output, concurrency=a.concurrency, use_gpu=a.gpu, batch_size=a.batch_size,
                          overwrite=a.overwrite, use_ray=not a.local)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result.manifest
    print(f"[shortcut-ray] {m['count']} pairs at {a.output} ({len(result.written)} shard(s) generated, "
          f"{len(result.skipped)} reused); train on them with --set data.source=parquet --set data.uri={a.output} "
          f"--set data.random_flip=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
