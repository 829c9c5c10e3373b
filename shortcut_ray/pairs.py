"""Two-stage reflow (ALGORITHM §6.6): (noise, sample) pairs from a flow-matching teacher, as batch
inference on Ray Data actors, written as a paired dataset in the shard format (shards.py).

    python -m jobs.generate_pairs --teacher runs/RUN/checkpoint_0001500 --output data/pairs --count 50000

Rows are a pure function of the plan: row i's noise x0 and label come from a generator seeded by
(seed, i) alone, so any shard can be (re)generated on any actor and a rerun reproduces it. x1 is the
teacher's sample from x0: `sampler.sample` with `steps` Euler steps (default 128, the teacher's best
sampler) of its `weights` (default EMA), with CFG at `cfg_scale` (default: the teacher's
eval.cfg_scale) when it is class-conditional. Labels are uniform over the classes, or drawn in the
proportions of the teacher's training set (`labels="dataset"`).

Ray Data runs one task per shard: `from_items(shard specs).map_batches(PairWriter, concurrency=N,
num_gpus=1 on GPU clusters)`; each actor holds the teacher, writes its shards atomically and records
each finished one under `_pairs_progress/` (shards.py). A rerun skips shards whose record matches the
plan and whose bytes still hash to the recorded sha256, then writes manifest.json (last).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import Config, ConfigError
from .shards import FORMAT, MANIFEST, PAIR_DTYPES, VERSION, array_bytes, put_table, shard_name, write_manifest
from .storage import atomic_write, filesystem, join_uri, local_copy

PROGRESS_DIR = "_pairs_progress"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PairPlan:
    """What determines the rows (everything but `count` enters `plan_id`: more rows can be added later)."""

    teacher: str
    """Checkpoint URI of the flow-matching teacher (local or gs://)."""
    count: int
    steps: int = 128
    weights: str = "ema"
    cfg_scale: float | None = None
    """None: the teacher's eval.cfg_scale when class-conditional, else 1 (resolved by `resolve_plan`)."""
    seed: int = 0
    labels: str = "uniform"
    """'uniform' over the classes, or 'dataset': the class proportions of the teacher's training set."""
    shard_size: int = 1024
    dtype: str = "float32"
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast on GPU) for the teacher's forwards."""

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("count")
        return d

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# -- plan and rows (Ray-free) ------------------------------------------------------------------------

def resolve_plan(plan: PairPlan) -> tuple[PairPlan, Config, dict]:
    """Check the plan against the teacher's state.json (driver side); fill cfg_scale. -> (plan, teacher cfg, meta)."""
    from .teacher import FLOW_MATCHING_TYPES, read_checkpoint_state

    meta = read_checkpoint_state(plan.teacher)
    tcfg = Config.from_dict(meta["config"])
    tt = tcfg.objective.train_type
    if tt not in FLOW_MATCHING_TYPES:
        raise ConfigError(f"teacher {plan.teacher} was trained with objective.train_type={tt!r}; two-stage reflow "
                          f"generates pairs from a flow-matching teacher (§6.6): pass a flow_matching checkpoint")
    m = tcfg.objective.denoise_timesteps
    checks = [(plan.count >= 1, f"count must be >= 1, got {plan.count}"),
              (1 <= plan.steps <= m, f"steps must be in 1..{m} (the teacher's objective.denoise_timesteps), got {plan.steps}"),
              (plan.weights in ("ema", "online"), f"weights must be 'ema' or 'online', got {plan.weights!r}"),
              (plan.labels in ("uniform", "dataset"), f"labels must be 'uniform' or 'dataset', got {plan.labels!r}"),
              (plan.shard_size >= 1, f"shard_size must be >= 1, got {plan.shard_size}"),
              (plan.dtype in PAIR_DTYPES, f"dtype must be one of {PAIR_DTYPES}, got {plan.dtype!r}"),
              (plan.precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {plan.precision!r}")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if plan.cfg_scale is None:
        plan = dataclasses.replace(plan, cfg_scale=tcfg.eval.cfg_scale if tcfg.objective.class_conditional else 1.0)
    return plan, tcfg, meta


def label_probs(plan: PairPlan, tcfg: Config) -> list[float] | None:
    """None for uniform labels; else the class proportions of the teacher's training data."""
    if plan.labels == "uniform":
        return None
    from .data import resolve_dataset
    from .shards import dataset_info

    counts = dataset_info(resolve_dataset(tcfg.data)).get("class_counts")
    if not counts or sum(counts) == 0:
        raise ConfigError("labels='dataset' needs the teacher's dataset to record class_counts; use labels='uniform'")
    return [c / sum(counts) for c in counts]


def row_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def draw_rows(seed: int, start: int, n: int, shape: tuple[int, ...], num_classes: int,
              probs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (n, *shape) float32 and labels (n,) of rows start..start+n-1; row i uses only row_seed(seed, i)."""
    x0 = torch.empty((n, *shape))
    y = torch.empty(n, dtype=torch.long)
    p = torch.tensor(probs, dtype=torch.float64) if probs is not None else None
    for j in range(n):
        g = torch.Generator().manual_seed(row_seed(seed, start + j))
        x0[j] = torch.randn(shape, generator=g)
        y[j] = torch.multinomial(p, 1, generator=g)[0] if p is not None else torch.randint(num_classes, (1,), generator=g)[0]
    return x0, y


@torch.no_grad()
def sample_pairs(model, tcfg: Config, plan: PairPlan, x0: torch.Tensor, y: torch.Tensor, device: torch.device,
                 batch_size: int = 256) -> torch.Tensor:
    """The teacher's samples x1 (n, C, H, W) float32 on CPU from noise x0 and labels y."""
    from .sampler import sample

    d = tcfg.data
    y_model = y if tcfg.objective.class_conditional else torch.full_like(y, d.num_classes)
    out = []
    for lo in range(0, x0.shape[0], batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            x1 = sample(model, x0[lo:lo + batch_size].to(device), y_model[lo:lo + batch_size].to(device), plan.steps,
                        plan.cfg_scale, d.num_classes, tcfg.objective.denoise_timesteps)
        out.append(x1.float().cpu())
    return torch.cat(out)


def shard_specs(plan: PairPlan) -> list[dict]:
    return [{"index": i, "start": i * plan.shard_size, "rows": min(plan.shard_size, plan.count - i * plan.shard_size)}
            for i in range(math.ceil(plan.count / plan.shard_size))]


def write_pair_shard(output: str, spec: dict, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor,
                     plan: PairPlan, num_classes: int) -> dict:
    """One shard, atomically, then its progress record (the record marks the shard done)."""
    import pyarrow as pa

    fs, root = filesystem(output)
    table = pa.table({"x0": pa.array(array_bytes(x0.numpy(), plan.dtype), pa.binary()),
                      "x1": pa.array(array_bytes(x1.numpy(), plan.dtype), pa.binary()),
                      "label": pa.array(y.numpy().astype(np.int64), pa.int64())})
    entry = put_table(fs, root, shard_name(spec["index"]), table)
    record = {**entry, **spec, "plan_id": plan.plan_id,
              "class_counts": np.bincount(y.numpy(), minlength=num_classes).tolist()}
    fs.makedirs(join_uri(root, PROGRESS_DIR), exist_ok=True)
    atomic_write(_record_path(root, spec["index"]), json.dumps(record).encode(), fs=fs)
    return record


def _record_path(root: str, index: int) -> str:
    return join_uri(join_uri(root, PROGRESS_DIR), f"part-{index:05d}.json")


class PairWriter:
    """Ray Data actor (a callable class): holds the teacher, turns shard specs into written shards."""

    def __init__(self, plan: dict, output: str, probs: list[float] | None, batch_size: int):
        from .checkpoint import load_for_inference

        self.plan, self.output, self.probs, self.batch_size = PairPlan(**plan), output, probs, batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tcfg, _ = load_for_inference(local_copy(self.plan.teacher), self.plan.weights)
        self.model = model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = self.tcfg.data
        for index, start, rows in zip(batch["index"], batch["start"], batch["rows"]):
            spec = {"index": int(index), "start": int(start), "rows": int(rows)}
            x0, y = draw_rows(self.plan.seed, spec["start"], spec["rows"], (d.channels, d.image_size, d.image_size),
                              d.num_classes, self.probs)
            x1 = sample_pairs(self.model, self.tcfg, self.plan, x0, y, self.device, self.batch_size)
            write_pair_shard(self.output, spec, x0, x1, y, self.plan, d.num_classes)
        return {"index": np.asarray(batch["index"])}


# -- resume ----------------------------------------------------------------------------------------

def _verified_record(fs, root: str, spec: dict, plan_id: str) -> dict | None:
    """The progress record of a finished shard that matches the plan and still hashes right, else None."""
    path = _record_path(root, spec["index"])
    try:
        record = json.loads(fs.cat_file(path))
        if record.get("plan_id") != plan_id or (record["start"], record["rows"]) != (spec["start"], spec["rows"]):
            return None
        data = fs.cat_file(join_uri(root, record["file"]))
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None
    return record if hashlib.sha256(data).hexdigest() == record["sha256"] else None


def done_records(output: str, specs: list[dict], plan_id: str) -> dict[int, dict]:
    """{shard index: record} of the shards a rerun may skip (hashed in parallel threads: I/O bound)."""
    fs, root = filesystem(output)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(lambda s: _verified_record(fs, root, s, plan_id), specs))
    return {s["index"]: r for s, r in zip(specs, records) if r is not None}


def _claim_output(output: str, plan: PairPlan, overwrite: bool) -> None:
    """Refuse to mix plans in one output (unless overwrite); write the plan; drop a stale manifest."""
    fs, root = filesystem(output)
    fs.makedirs(join_uri(root, PROGRESS_DIR), exist_ok=True)
    plan_path = join_uri(join_uri(root, PROGRESS_DIR), PLAN_FILE)
    if fs.exists(plan_path) and not overwrite:
        old = json.loads(fs.cat_file(plan_path))
        diff = {k: (old.get(k), v) for k, v in plan.identity().items() if old.get(k) != v}
        if diff:
            raise ConfigError(f"{output} holds pairs of another plan (existing vs requested: {diff}); choose "
                              f"another --output, or pass --overwrite to regenerate them")
    if fs.exists(join_uri(root, MANIFEST)):
        fs.rm(join_uri(root, MANIFEST))
    atomic_write(plan_path, json.dumps(plan.identity(), indent=1, sort_keys=True).encode(), fs=fs)


# -- the job ---------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    manifest: dict
    written: list[int]
    """Shard indices generated by this call."""
    skipped: list[int]
    """Shard indices found done and verified (resume)."""


def generate(plan: PairPlan, output: str, *, concurrency: int | None = None, use_gpu: bool | None = None,
             batch_size: int = 256, overwrite: bool = False, use_ray: bool = True,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> GenerationResult:
    """Generate (or finish generating) the paired dataset of `plan` at `output`; returns its manifest.

    use_ray=False runs the same PairWriter in this process (tests, tiny jobs); concurrency defaults to
    the cluster's GPUs (one actor per GPU) or 1 on CPU.
    """
    plan, tcfg, tmeta = resolve_plan(plan)
    probs = label_probs(plan, tcfg)
    specs = shard_specs(plan)
    _claim_output(output, plan, overwrite)
    done = {} if overwrite else done_records(output, specs, plan.plan_id)
    pending = [s for s in specs if s["index"] not in done]
    log(f"[shortcut-ray] pairs: {len(specs)} shard(s) of {plan.shard_size} rows at {output}: {len(done)} done "
        f"and verified, {len(pending)} to generate ({plan.steps} Euler steps of the teacher's {plan.weights} "
        f"weights, cfg {plan.cfg_scale})")
    if pending and use_ray:
        _run_on_ray(pending, plan, output, probs, batch_size, concurrency, use_gpu)
    elif pending:
        PairWriter(dataclasses.asdict(plan), output, probs, batch_size)(
            {k: np.asarray([s[k] for s in pending]) for k in ("index", "start", "rows")})
    records = {**done, **done_records(output, pending, plan.plan_id)}  # re-read what the actors wrote
    missing = [s["index"] for s in specs if s["index"] not in records]
    if missing:
        raise RuntimeError(f"shards {missing} of {output} were not written; rerun to resume")
    manifest = _manifest(plan, tcfg, tmeta, [records[s["index"]] for s in specs])
    fs, root = filesystem(output)
    keep = {r["file"] for r in records.values()}
    for stale in fs.glob(join_uri(root, "part-*.parquet")):  # e.g. from an earlier, larger count
        if stale.rsplit("/", 1)[-1] not in keep:
            fs.rm(stale)
    write_manifest(fs, root, manifest)
    log(f"[shortcut-ray] pairs: wrote {output}/{MANIFEST} ({manifest['count']} pairs)")
    return GenerationResult(manifest, [s["index"] for s in pending], sorted(done))


def _run_on_ray(pending: list[dict], plan: PairPlan, output: str, probs, batch_size: int,
                concurrency: int | None, use_gpu: bool | None) -> None:
    """Batch inference: one row per shard spec, PairWriter actors (one per GPU when there are GPUs)."""
    import ray

    from .launch import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if use_gpu and gpus == 0:
        raise ConfigError("use_gpu=True but the Ray cluster has no GPUs; drop --gpu or add GPU nodes")
    concurrency = concurrency or (gpus if use_gpu else 1)
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(PairWriter, batch_size=1, concurrency=concurrency, num_gpus=1 if use_gpu else 0,
                        num_cpus=1, fn_constructor_kwargs={"plan": dataclasses.asdict(plan), "output": output,
                                                           "probs": probs, "batch_size": batch_size})
    ds.materialize()  # runs the actors (Ray Data's progress bar shows shards done)


def _manifest(plan: PairPlan, tcfg: Config, tmeta: dict, records: list[dict]) -> dict:
    d = tcfg.data
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": d.kind, "image_size": d.image_size, "channels": d.channels,
        "num_classes": d.num_classes, "classes": [str(i) for i in range(d.num_classes)],
        "count": sum(r["rows"] for r in records),
        "class_counts": np.sum([r["class_counts"] for r in records], axis=0).astype(int).tolist(),
        "skipped": 0, "skipped_files": [], "has_flip": False,
        "latent_shape": [d.channels, d.image_size, d.image_size] if d.kind == "latents" else None,
        "shards": [{k: r[k] for k in ("file", "rows", "bytes", "sha256")} for r in records],
        "paired": True, "pair_dtype": plan.dtype, "plan_id": plan.plan_id,
        "teacher": {"checkpoint": plan.teacher, "step": tmeta.get("step"), "train_type": tcfg.objective.train_type,
                    "run_name": tmeta.get("run_name"), "class_conditional": tcfg.objective.class_conditional},
        "sampler": {"steps": plan.steps, "weights": plan.weights, "cfg_scale": plan.cfg_scale, "seed": plan.seed,
                    "labels": plan.labels, "precision": plan.precision, "method": "euler (sampler.sample)"},
        "source": f"jobs.generate_pairs from {plan.teacher}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if d.kind == "latents":
        manifest.update(latent_scale=d.latent_scale, vae=d.vae)
    return manifest


# -- training on pairs: driver-side check ----------------------------------------------------------

def uses_pairs(train_type: str) -> bool:
    """Whether the objective trains on a stored coupling (its registry class sets `uses_pairs = True`)."""
    from .objectives import objective_class

    return bool(getattr(objective_class(train_type), "uses_pairs", False))


def check_paired(cfg: Config, info: dict, uri: str) -> None:
    """Refuse a paired dataset for an objective that ignores the pairs, and the reverse (before any
    cluster work; shape/channels/classes are data.check_matches' job)."""
    tt = cfg.objective.train_type
    if info.get("paired") and not uses_pairs(tt):
        from .objectives import names

        users = [name for name in names() if uses_pairs(name)]
        raise ConfigError(f"dataset {uri} is a paired (reflow) dataset but objective.train_type={tt!r} would "
                          f"ignore its stored noise; " + (f"train it with objective.train_type in {users}" if users
                                                          else "no objective in this build trains on stored pairs yet"))
    if uses_pairs(tt) and not info.get("paired"):
        raise ConfigError(f"objective.train_type={tt!r} trains on stored (noise, sample) pairs but {uri} has none; "
                          f"generate them with `python -m jobs.generate_pairs --teacher CKPT --output URI` and "
                          f"set data.source=parquet data.uri=URI")
