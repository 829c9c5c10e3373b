"""Driver-side checks before any worker starts (Ray-free): each raises a PermanentError that says
what to change, in seconds, instead of a worker-side failure that Ray retries for minutes.

- tracking: the MLflow server answers (one short HTTP request, no MLflow retries); a local store's
  folder is writable; the experiment exists with a durable artifact location (tracking.ensure_experiment).
- storage: the run storage path is writable (a probe file, removed again).
- dataset: the manifest exists and matches the config; every shard exists with the manifest's size
  and Parquet row count (one listing + one footer read per shard); sha256 re-hashed when the whole
  dataset is at most SHA_MAX_BYTES (larger ones: sizes and counts only, said once).
- resume: `--resume NAME` names a run that exists in the storage path.
- CPUs (once Ray is up, `check_cpus`): the workers' reserved CPUs leave at least one for Ray Data's
  read tasks on a fixed-size cluster; otherwise the run would wait forever for a read slot.
"""

from __future__ import annotations

import os
import threading
import uuid

from .config import Config
from .faults import PermanentError

SHA_MAX_BYTES = 2 << 30
STORAGE_TIMEOUT_S = 12.0  # a probe write of a few bytes; gcsfs retries an unreachable endpoint for minutes
TIMEOUT_S = 10.0
EXPERIMENT_TIMEOUT_S = 60.0


def _with_timeout(fn, what: str, timeout_s: float = TIMEOUT_S):
    """fn() in a thread; PermanentError if it takes longer than timeout_s (network clients retry for minutes)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise PermanentError(f"{what}: no answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_tracking(cfg: Config) -> None:
    """The MLflow server answers / the local store is writable; then the experiment exists (driver-created)."""
    from .tracking import ensure_experiment

    t = cfg.tracking
    if not t.enabled:
        return
    uri = t.tracking_uri
    change = ("start the server, fix tracking.tracking_uri / $MLFLOW_TRACKING_URI, or run without tracking "
              "with --set tracking.enabled=false")
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as e:
            raise PermanentError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); {change}") from None
        if r.status_code in (401, 403):
            raise PermanentError(f"MLflow tracking server {uri} refused the request (HTTP {r.status_code}); set "
                                 f"MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri.removeprefix("sqlite:///")) or "."
        if not _writable_dir(folder):
            raise PermanentError(f"MLflow store {uri}: folder {folder} is not writable; {change}")
    remote = uri.startswith(("http://", "https://"))  # a new local store takes its time (schema migrations)
    try:
        # The server already answered /health (an unreachable one failed above in seconds); creating the
        # experiment may be slow on a loaded server, so it gets longer before the run is refused.
        _with_timeout(lambda: ensure_experiment(t), f"MLflow at {uri}", EXPERIMENT_TIMEOUT_S) if remote \
            else ensure_experiment(t)
    except PermanentError as e:
        raise PermanentError(f"{e}; {change}") from None
    except Exception as e:  # noqa: BLE001 - any MLflow failure here is the user's to fix
        raise PermanentError(f"MLflow at {uri} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                             f"{change}") from None


def _writable_dir(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".shortcut-ray-probe-{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        return True
    except OSError:
        return False


def check_storage(storage: str) -> None:
    """Write and remove a probe file under the run storage path (local or any fsspec URI)."""
    from .shards import filesystem, join_uri

    def probe():
        fs, root = filesystem(storage)
        fs.makedirs(root, exist_ok=True)
        path = join_uri(root, f".shortcut-ray-probe-{uuid.uuid4().hex}")
        fs.pipe_file(path, b"ok")
        fs.rm_file(path)

    try:
        _with_timeout(probe, f"storage path {storage}", STORAGE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        raise PermanentError(f"cannot write to the run storage path {storage} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}); set train.storage_path to a "
                             f"writable folder or bucket (check credentials for gs://)") from None


def check_dataset(uri: str, info: dict, log=print) -> None:
    """Every shard exists with the manifest's size and row count; sha256 when the dataset is small."""
    import hashlib

    import pyarrow.parquet as pq

    from .shards import filesystem, join_uri

    fs, root = filesystem(uri)
    sizes = {os.path.basename(d["name"].rstrip("/")): d.get("size") for d in fs.ls(root, detail=True)}
    redo = "jobs.generate_pairs (it regenerates bad shards)" if info.get("paired") else "jobs.prepare_data"
    fix = f"the shards changed after writing or were copied incompletely; re-run {redo}"
    total = sum(s["bytes"] for s in info["shards"])
    for s in info["shards"]:
        path, where = join_uri(root, s["file"]), join_uri(uri, s["file"])
        if s["file"] not in sizes and fs.exists(path):  # a shard in a sub-folder
            sizes[s["file"]] = fs.info(path).get("size")
        if s["file"] not in sizes:
            raise PermanentError(f"dataset shard {where} is missing (listed in the manifest); {fix}")
        if sizes[s["file"]] != s["bytes"]:
            raise PermanentError(f"dataset shard {where} has {sizes[s['file']]} bytes, the manifest says "
                                 f"{s['bytes']} (truncated?); {fix}")
        try:
            with fs.open(path, "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid etc.: name the file
            raise PermanentError(f"dataset shard {where} is not a readable Parquet file ({e}); {fix}") from None
        if rows != s["rows"]:
            raise PermanentError(f"dataset shard {where} has {rows} rows, the manifest says {s['rows']}; {fix}")
        if total <= SHA_MAX_BYTES and hashlib.sha256(fs.cat_file(path)).hexdigest() != s["sha256"]:
            raise PermanentError(f"dataset shard {where} does not match its sha256 in the manifest (corrupt "
                                 f"bytes); {fix}")
    if total > SHA_MAX_BYTES:
        log(f"[shortcut-ray] dataset {uri}: {len(info['shards'])} shards, sizes and row counts checked; sha256 "
            f"not re-hashed ({total / 2**30:.1f} GiB > {SHA_MAX_BYTES / 2**30:.0f} GiB)")


def check_resume(storage: str, run_name: str) -> None:
    """`--resume NAME` must name a run that exists under the storage path; list the ones there are."""
    from .shards import filesystem, join_uri

    fs, root = filesystem(storage)
    if fs.exists(join_uri(root, run_name)):
        return
    try:
        runs = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    except FileNotFoundError:
        runs = []
    seen = ", ".join(runs[-20:]) if runs else "none"
    raise PermanentError(f"--resume {run_name}: no such run in the storage path {storage} (runs there: {seen}). "
                         f"Check the name, or train.storage_path / the working directory if the run was started "
                         f"elsewhere; to start a new run drop --resume")


def run(cfg: Config, storage: str, dataset_uri: str, info: dict, resume: bool = False, log=print) -> None:
    """All driver-side checks, cheapest first."""
    if resume:
        check_resume(storage, cfg.train.run_name)
    check_storage(storage)
    check_tracking(cfg)
    check_dataset(dataset_uri, info, log)


def check_cpus(cfg: Config, cluster_cpus: float, autoscaling: bool = False) -> None:
    """Ray Data's read and decode tasks need 1 CPU each: workers that reserve every CPU of a cluster that
    cannot grow leave none, and Ray Data only warns ("the job may hang forever"). Say what to change."""
    t = cfg.train
    reserved = t.num_workers * t.cpus_per_worker
    if autoscaling or cluster_cpus - reserved >= 1:
        return
    room = max(cluster_cpus - 1, 0) / t.num_workers
    raise PermanentError(
        f"{t.num_workers} worker(s) x train.cpus_per_worker={t.cpus_per_worker:g} reserve {reserved:g} of the "
        f"cluster's {cluster_cpus:g} CPUs and leave none for Ray Data's read tasks, so training would wait "
        f"forever for its first batch; use `--set train.cpus_per_worker={room:g}` or fewer train.num_workers"
        f" (`--set train.torch_threads=N` still lets a worker compute on N threads)")
