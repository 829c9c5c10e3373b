"""FID of Fashion-MNIST test vs train with the real FID Inception, and the FID pipeline's CPU throughput.

A reference point for every FID this project reports on Fashion-MNIST: real test images against real
train images, through exactly the pipeline of ALGORITHM §5 (shortcut_ray.fid: [-1, 1] images,
bilinear 299 px without antialias, clip, InceptionV3 pool3, unbiased covariance, offset 1e-6 inside
sqrtm). A generator cannot be expected to beat this number at the same sample count.

    python bench/fid_reference.py                       # 10k test vs 10k seeded-random train
    python bench/fid_reference.py --n 5000              # what fits ~30 min on 2 shared CPU cores
    nice -n 10 nohup python bench/fid_reference.py --n 5000 > /tmp/fid_reference.log 2>&1 &

Writes bench/results/fid_reference.json: fid_test_vs_train, n_test, n_train, images_per_s (median
over batches after 2 warm-up batches, preprocessing included), seconds, torch_threads, device,
torch, date, command, weights, weights_id, input_range (and note). Test images are the first n of
t10k; train images a seeded random n of the 60k (--seed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shortcut_ray.fid import FeatureStats, frechet_distance, load_inception

DEFAULT_WEIGHTS = "/work/shared/weights/fid_inception_v3.pt"
DATA_DIRS = ["/work/shared/data/fashion-mnist", "/usr/share/datasets/fashion-mnist"]
TF_RANGE = (-1.0, 0.9921875)


def read_idx_images(path: Path) -> np.ndarray:
    """(N, 28, 28) uint8 from a gzipped IDX3 file (16-byte big-endian header: magic, n, rows, cols)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX3 image file (magic {magic}, expected 2051)")
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(int(n), int(rows), int(cols))


def find_data(explicit: str | None) -> Path:
    for d in ([explicit] if explicit else DATA_DIRS):
        if d and (Path(d) / "t10k-images-idx3-ubyte.gz").exists():
            return Path(d)
    raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {explicit or DATA_DIRS}; "
                            "pass --data DIR (Debian: apt-get install dataset-fashion-mnist)")


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
    a, b = FeatureStats.from_features(f_test), FeatureStats.from_features(f_train)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="FID Inception (TorchScript or pytorch-fid .pth)")
    p.add_argument("--data", default=None, help=f"dir with the IDX .gz files (default: first of {DATA_DIRS})")
    p.add_argument("--n", type=int, default=10_000, help="images per side (test: first n; train: random n)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="seed of the random train subset")
    p.add_argument("--tf-range", action="store_true", help=f"feed the network {TF_RANGE} instead of [-1, 1]")
    p.add_argument("--report-every", type=int, default=1000,
                   help="write a partial JSON (FID at the first k per side) every k images")
    p.add_argument("--note", default="", help="free text recorded in the JSON")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fid_reference.json"))
    args = p.parse_args()

    data = find_data(args.data)
    test = read_idx_images(data / "t10k-images-idx3-ubyte.gz")
    train = read_idx_images(data / "train-images-idx3-ubyte.gz")
    if not 2 <= args.n <= len(test):
        raise SystemExit(f"--n must be in [2, {len(test)}], got {args.n}")
    test = test[: args.n]
    # A random permutation's prefix: every partial result also uses a random train subset.
    train = train[np.random.default_rng(args.seed).permutation(len(train))[: args.n]]

    input_range = TF_RANGE if args.tf_range else (-1.0, 1.0)
    extractor = load_inception(args.weights, device="cpu", batch_size=args.batch_size,
                               input_range=input_range)
    print(f"weights {extractor.weights_id}, input range {input_range}, torch threads "
          f"{torch.get_num_threads()}, {args.n} test + {args.n} train images from {data}", flush=True)

    out = Path(args.out)
    loadavg_at_start = [round(v, 2) for v in os.getloadavg()]
    fid_by_n: dict[str, float] = {}

    def summarize(k: int, f_test, f_train, times: list, complete: bool) -> dict:
        fid = fid_of(f_test, f_train)
        fid_by_n[str(k)] = round(fid, 4)
        # Throughput: median over full batches after 2 warm-up batches (preprocessing included).
        full = [t for t, b in times[2:] if b == args.batch_size] or [t for t, _ in times]
        result = {
            "fid_test_vs_train": round(fid, 4),
            "n_test": k, "n_train": k,
            "complete": complete,  # False: a partial result of a run still going (or stopped)
            "n_target": int(args.n),
            "fid_by_n": dict(fid_by_n),
            "test_subset": "first n of t10k",
            "train_subset": f"first n of numpy default_rng({args.seed}).permutation(60000)",
            "images_per_s": round(args.batch_size / statistics.median(full), 2),
            "batch_size": args.batch_size,
            "seconds": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": loadavg_at_start,  # the machine is shared: context for images_per_s
            "loadavg_now": [round(v, 2) for v in os.getloadavg()],
            "device": cpu_model(),
            "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv),
            "weights": args.weights, "weights_id": extractor.weights_id,
            "input_range": list(input_range),
            "pipeline": "ALGORITHM §5: [-1,1] -> bilinear 299 no antialias -> clip -> pool3; "
                        "np.cov; 1e-6 inside sqrtm",
        }
        if args.note:
            result["note"] = args.note
        write(out, result)
        return result

    def on_report(k, f_test, f_train, times):  # partial result, overwritten by later ones
        r = summarize(k, f_test, f_train, times, complete=False)
        print(f"  partial: FID(test {k} vs train {k}) = {r['fid_test_vs_train']}, "
              f"{r['images_per_s']} img/s; wrote {out}", flush=True)

    t0 = time.perf_counter()
    f_test, f_train, times = extract_pairwise(extractor, to_model_range(test), to_model_range(train),
                                              args.batch_size, args.report_every, on_report)
    print(json.dumps(summarize(args.n, f_test, f_train, times, complete=True), indent=2))
    print(f"wrote {out}")


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
