"""The benchmark harness: arguments, inputs, device and version description, timing, results JSON.

Scripts run from the repository root as `python -m bench.NAME`. Every benchmark writes
`bench/results/<name>.json` through `write_result`, which adds the command line, date, versions and
host description (DESIGN §5: medians and ratios measured side by side in one run; absolute throughput
only on a GPU, with the device named). `timed` / `interleaved` return per-repeat seconds, synchronising
CUDA around every repeat so that asynchronous kernels are counted. `add_*_args` are the argument
blocks the scripts share; `fid_weights` / `fashion_mnist_dir` find inputs from a flag or the
environment and say what to pass when they are missing (no machine paths in the scripts).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_FASHION_MNIST = "SHORTCUT_FASHION_MNIST"  # folder of the four Fashion-MNIST IDX files
FASHION_MNIST_FALLBACK = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
GPU_OWED = ("measured on CPU only (no GPU was lent to this task): absolute numbers are not meaningful; "
            "the GPU figures are owed -- run the GPU command in bench/README.md when a GPU is lent")


# -- description ------------------------------------------------------------------------------------

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str | None) -> torch.device:
    """'cuda' when available and nothing is asked for; refuse 'cuda' without a GPU with a clear message."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_tag(device: torch.device) -> str:
    """Short tag for result file names: 'cpu', 'h100', 'h200', 'a100', ... (else the sanitised GPU name)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    for known in ("H200", "H100", "B200", "A100", "L40S", "L40", "L4", "A10G", "A10", "V100", "T4"):
        if known in name:
            return known.lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def device_info(device: torch.device) -> dict:
    """What ran the benchmark: the GPU (name, memory, capability) and always the host CPU and its load."""
    info: dict = {"type": device.type, "tag": device_tag(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory_gb=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_count=torch.cuda.device_count())
    else:
        info["name"] = cpu_model()
    info["host"] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": ([round(v, 2) for v in os.getloadavg()]
                                              if hasattr(os, "getloadavg") else None),
                    "platform": platform.platform()}
    return info


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on (packages read from metadata, so nothing heavy is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("ray", "mlflow", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["shortcut_ray"] = importlib.metadata.version("shortcut-ray")
    except importlib.metadata.PackageNotFoundError:
        out["shortcut_ray"] = None
    out["git_commit"] = _git_commit()
    return out


def _git_commit() -> str | None:
    """HEAD of the checkout (the working tree may differ; recorded as a hint, not a guarantee)."""
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def command_line() -> str:
    """The command as run: `python -m bench.NAME ARGS` for a script of this package."""
    script = Path(sys.argv[0]).resolve()
    if script.parent == Path(__file__).resolve().parent:
        head = ["python", "-m", f"bench.{script.stem}"]
    else:
        head = ["python", shlex.quote(sys.argv[0])]
    return " ".join([*head, *(shlex.quote(a) for a in sys.argv[1:])])


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- timing ------------------------------------------------------------------------------------------

def synchronizer(sync) -> Callable[[], None]:
    """A no-argument barrier: sync may be a callable, a device (CUDA -> synchronize it), True (the current
    CUDA device if any) or False/None (nothing)."""
    if callable(sync):
        return sync
    if sync is True:
        return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if sync:
        device = torch.device(sync)
        if device.type == "cuda":
            return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, sync=True) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed calls; the device is synchronised
    before and after every timed call, so queued CUDA work is inside the repeat that launched it."""
    barrier = synchronizer(sync)
    for _ in range(warmup):
        fn()
    barrier()
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: Mapping[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
                sync=True) -> dict[str, list[float]]:
    """`timed` for several functions measured side by side: every repeat runs each once, in forward order
    on even repeats and reversed on odd ones (ABBA), so slow drifts of a shared machine hit all alike."""
    barrier = synchronizer(sync)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    barrier()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            barrier()
            t0 = time.perf_counter()
            fns[n]()
            barrier()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def stats(xs) -> dict:
    """{median, min, max, n, values} of a list of seconds (values rounded to microseconds)."""
    xs = [float(x) for x in xs]
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": [round(x, 6) for x in xs]}


# -- memory ------------------------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages of some tensors (DTensor: the local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# -- results ------------------------------------------------------------------------------------------

def write_result(name: str, payload: Mapping, device: torch.device | None = None,
                 out_dir: Path | str | None = None, quiet: bool = False) -> Path:
    """Write <out_dir or bench/results>/<name>.json atomically: the payload plus command, date, versions
    and device."""
    from shortcut_ray.storage import atomic_write

    out = {"benchmark": name, "command": command_line(), "date": now_utc(), "versions": versions()}
    if device is not None:
        out["device"] = device_info(device)
        if device.type != "cuda":
            out["gpu_figures_owed"] = GPU_OWED
    out.update(payload)
    path = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    atomic_write(str(path), json.dumps(out, indent=1, default=_json_default) + "\n")
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


def _json_default(o):
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def set_threads(n: int | None) -> int:
    """torch intra-op threads (None: leave torch's default); returns the number in use."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# -- arguments and inputs -------------------------------------------------------------------------------

def add_device_args(p: argparse.ArgumentParser, device_default: str | None = None) -> None:
    p.add_argument("--device", default=device_default, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="train.precision (auto: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile every DiT block")


def add_config_args(p: argparse.ArgumentParser, preset: str = "digits") -> None:
    from shortcut_ray.presets import PRESETS

    p.add_argument("--preset", default=preset, help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-cpus", type=int, default=None, help="ray.init(num_cpus=...) (default: all cores)")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="$RAY_worker_niceness of the local cluster (Ray's default is 15, which on a busy shared "
                        "host starves the workers against a nice-0 process)")


def add_out_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, help=f"results name under bench/results (default {what})")


def fid_weights(flag: str | None) -> str:
    """FID Inception weights from --fid-weights, else $SHORTCUT_FID_WEIGHTS; a clear error otherwise."""
    from shortcut_ray.fid import ENV_WEIGHTS

    weights = flag or os.environ.get(ENV_WEIGHTS, "")
    if not weights:
        raise SystemExit(f"no FID Inception weights: pass --fid-weights PATH_OR_URI (fid_inception_v3.pt, a "
                         f"TorchScript file, or pytorch-fid's pt_inception-2015-12-05-*.pth) or set ${ENV_WEIGHTS}")
    return weights


def fashion_mnist_dir(flag: str | None) -> str:
    """The Fashion-MNIST IDX folder from --data, else $SHORTCUT_FASHION_MNIST, else Debian's package path."""
    from shortcut_ray.shards import find_idx_pair

    src = flag or os.environ.get(ENV_FASHION_MNIST) or FASHION_MNIST_FALLBACK
    try:
        find_idx_pair(src, "test")
    except FileNotFoundError:
        raise SystemExit(f"Fashion-MNIST IDX files not found in {src}: pass --data DIR or set ${ENV_FASHION_MNIST} "
                         f"(Debian: apt-get install dataset-fashion-mnist)") from None
    return src


def shard_images(uri: str, data_cfg, start: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start..start+count-1 of the shards at `uri` in file (manifest) order, decoded by the training
    pipeline's own `data.decode_batch` without random flips: ((n, C, H, W) in [-1, 1], (n,) labels)."""
    import numpy as np
    import pyarrow.parquet as pq

    from shortcut_ray import data, shards, storage

    info = shards.dataset_info(uri)
    fs, root = storage.filesystem(uri)
    end = info["count"] if count is None else start + count
    xs, ys, seen = [], [], 0
    for shard in info["shards"]:
        lo, hi = max(0, start - seen), min(shard["rows"], end - seen)
        seen += shard["rows"]
        if lo >= hi:
            continue
        with fs.open(storage.join_uri(root, shard["file"]), "rb") as f:
            table = pq.read_table(f).slice(lo, hi - lo).to_pydict()
        batch = {k: np.asarray(v, dtype=object if k != "label" else np.int64) for k, v in table.items()}
        out = data.decode_batch(batch, kind=data_cfg.kind, channels=data_cfg.channels, image_size=data_cfg.image_size,
                                random_flip=False, latent_scale=data_cfg.latent_scale,
                                latent_shape=info.get("latent_shape"))
        xs.append(torch.from_numpy(out["image"]))
        ys.append(torch.from_numpy(out["label"]))
    x = torch.cat(xs) if xs else torch.zeros(0)
    if x.shape[0] != end - start:
        raise SystemExit(f"{uri} has {info['count']} rows; need rows {start}..{end - 1}")
    return x, torch.cat(ys)
