"""FID of Fashion-MNIST test vs train with the real FID Inception, and the FID pipeline's CPU throughput.

A reference point for every FID this project reports on Fashion-MNIST: real test images against real
train images, through exactly the pipeline of ALGORITHM §5 (shortcut_ray.fid: [-1, 1] images,
bilinear 299 px without antialias, clip, InceptionV3 pool3, unbiased covariance, offset 1e-6 inside
sqrtm). A generator cannot be expected to beat this number at the same sample count.

    python -m bench.fid_reference --fid-weights W.pt --data DIR    # 10k test vs 10k seeded-random train
    python -m bench.fid_reference --n 5000                        # what fits ~30 min on 2 shared CPU cores
    python -m bench.fid_reference --n 100 --out fid_reference_smoke   # smoke, a minute
Weights: --fid-weights or $SHORTCUT_FID_WEIGHTS; data: --data or $SHORTCUT_FASHION_MNIST (the folder of
the IDX files, read with the project's `shards.read_idx`), else Debian's /usr/share/datasets/fashion-mnist.

Writes bench/results/fid_reference.json (common.write_result: command, device, versions, date) with
fid_test_vs_train, n_test, n_train, fid_by_n, images_per_s (median over batches after 2 warm-up
batches, preprocessing included), seconds, torch_threads, weights, weights_id, input_range (and note);
partial results (complete: false) are written every --report-every images per side. Test images are the first n of
t10k; train images a seeded random n of the 60k (--seed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import add_out_arg, fashion_mnist_dir, fid_weights, write_result
from shortcut_ray.fid import FeatureStats, load_inception
from shortcut_ray.shards import find_idx_pair, read_idx

TF_RANGE = (-1.0, 0.9921875)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], what a generator outputs."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def extract_pairwise(extractor, test: torch.Tensor, train: torch.Tensor, batch_size: int,
                     report_every: int, on_report) -> tuple[np.ndarray, np.ndarray, list]:
    """Features of both sets, a batch of each in turn, so every prefix is a valid (smaller) result:
    every `report_every` images per side, on_report(k, f_test[:k], f_train[:k], times) (for a long run on
    shared cores, a partial answer beats none). Returns the features and per-batch (seconds, images)."""
    feats: dict[str, list] = {"test": [], "train": []}
    times: list = []
    for start in range(0, len(test), batch_size):
        for name, images in (("test", test), ("train", train)):
            t0 = time.perf_counter()
            feats[name].append(extractor(images[start:start + batch_size]).double().numpy())
            times.append((time.perf_counter() - t0, min(batch_size, len(images) - start)))
        done = min(start + batch_size, len(test))
        print(f"  {done}/{len(test)} per side ({times[-1][1] / times[-1][0]:.2f} img/s last batch)",
              flush=True)
        if done % report_every < batch_size and done < len(test):
            on_report(done, np.concatenate(feats["test"]), np.concatenate(feats["train"]), times)
    return np.concatenate(feats["test"]), np.concatenate(feats["train"]), times


def fid_of(f_test: np.ndarray, f_train: np.ndarray) -> float:
    return FeatureStats.from_features(f_test).frechet_distance(FeatureStats.from_features(f_train))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fid-weights", default=None, help="FID Inception (TorchScript or pytorch-fid .pth; path or URI)")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (gzipped or not)")
    p.add_argument("--n", type=int, default=10_000, help="images per side (test: first n; train: random n)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="seed of the random train subset")
    p.add_argument("--tf-range", action="store_true", help=f"feed the network {TF_RANGE} instead of [-1, 1]")
    p.add_argument("--report-every", type=int, default=1000,
                   help="write a partial JSON (FID at the first k per side) every k images")
    p.add_argument("--note", default="", help="free text recorded in the JSON")
    add_out_arg(p, "fid_reference")
    return p.parse_args(argv)


def load_sets(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images and a seeded random n of the train images, in [-1, 1]."""
    src = fashion_mnist_dir(args.data)
    test, train = (read_idx(find_idx_pair(src, split)[0]) for split in ("test", "train"))
    if not 2 <= args.n <= len(test):
        raise SystemExit(f"--n must be in [2, {len(test)}], got {args.n}")
    # A random permutation's prefix: every partial result also uses a random train subset.
    train = train[np.random.default_rng(args.seed).permutation(len(train))[: args.n]]
    return to_model_range(test[: args.n]), to_model_range(train)


def main(argv=None) -> int:
    args = parse_args(argv)
    weights = fid_weights(args.fid_weights)
    test, train = load_sets(args)
    input_range = TF_RANGE if args.tf_range else (-1.0, 1.0)
    extractor = load_inception(weights, device="cpu", batch_size=args.batch_size, input_range=input_range)
    print(f"weights {extractor.weights_id}, input range {input_range}, torch threads "
          f"{torch.get_num_threads()}, {args.n} test + {args.n} train images", flush=True)
    fid_by_n: dict[str, float] = {}
    t0, load_start = time.perf_counter(), [round(v, 2) for v in os.getloadavg()]

    def summarize(k: int, f_test, f_train, times: list, complete: bool) -> dict:
        fid_by_n[str(k)] = round(fid_of(f_test, f_train), 4)
        full = [t for t, b in times[2:] if b == args.batch_size] or [t for t, _ in times]
        result = {"fid_test_vs_train": fid_by_n[str(k)], "n_test": k, "n_train": k,
                  "complete": complete,  # False: a partial result of a run still going (or stopped)
                  "n_target": int(args.n), "fid_by_n": dict(fid_by_n), "test_subset": "first n of t10k",
                  "train_subset": f"first n of numpy default_rng({args.seed}).permutation(60000)",
                  "images_per_s": round(args.batch_size / statistics.median(full), 2),
                  "batch_size": args.batch_size, "seconds": round(time.perf_counter() - t0, 1),
                  "torch_threads": torch.get_num_threads(), "loadavg_at_start": load_start,
                  "weights": weights, "weights_id": extractor.weights_id, "input_range": list(input_range),
                  "pipeline": "ALGORITHM §5: [-1,1] -> bilinear 299 no antialias -> clip -> pool3; "
                              "np.cov; 1e-6 inside sqrtm", **({"note": args.note} if args.note else {})}
        write_result(args.out or "fid_reference", result, device=torch.device("cpu"), quiet=not complete)
        return result

    def on_report(k, f_test, f_train, times):  # partial result, overwritten by later ones
        r = summarize(k, f_test, f_train, times, complete=False)
        print(f"  partial: FID(test {k} vs train {k}) = {r['fid_test_vs_train']}, {r['images_per_s']} img/s",
              flush=True)

    f_test, f_train, times = extract_pairwise(extractor, test, train, args.batch_size, args.report_every, on_report)
    r = summarize(args.n, f_test, f_train, times, complete=True)
    print(f"FID(test {args.n} vs train {args.n}) = {r['fid_test_vs_train']}, {r['images_per_s']} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
