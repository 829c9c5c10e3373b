"""Driver side: builds the Ray Train `TorchTrainer` for a Config and runs it.

Run identity is (storage_path, run_name): launching again with the same pair resumes the run from its
latest checkpoint (Train V2 restores it through `ray.train.get_checkpoint()`, RAY_NOTES §1c); a lost
worker restarts the whole group from the last checkpoint up to train.max_failures times (§1e).
"""

from __future__ import annotations

import datetime
import os

from .config import Config, override
from .storage import pyarrow_filesystem
from .tracking import MlflowTracker, resolve_tracking_uri


def default_run_name(cfg: Config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.preset}-{cfg.objective.train_type}-{stamp}"


def storage_root(cfg: Config) -> str:
    return cfg.train.storage_path or os.path.abspath("runs")


def ensure_ray(num_cpus: int | None = None, progress_bars: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit sets it), else start a local one
    ("local": a fresh cluster, never a stale /tmp/ray/ray_current_cluster, RAY_NOTES §1 misc); quietly."""
    from .console import init_ray_quietly

    init_ray_quietly(num_cpus, progress_bars, address=os.environ.get("RAY_ADDRESS") or None)


def resolve_runtime(cfg: Config) -> Config:
    """Fill what must be decided once on the driver: the run name and an absolute tracking URI."""
    return override(cfg, {"train.run_name": cfg.train.run_name or default_run_name(cfg),
                          "tracking.tracking_uri": resolve_tracking_uri(cfg.tracking)})


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for a resolved config (see resolve_runtime)."""
    import ray.train

    from . import data
    from .pairs import check_paired
    from .shards import dataset_info
    from .teacher import check_teacher
    from .console import configure_data_context, train_logging_config
    from .ray_trainer import ShortcutTrainer as TorchTrainer
    from .worker import train_loop_per_worker

    check_teacher(cfg)  # distillation: the teacher checkpoint exists and matches (before any Ray work)
    configure_data_context(cfg.train.progress_bars)  # before the Dataset exists: it copies the context
    uri = data.resolve_dataset(cfg.data)
    check_paired(cfg, dataset_info(uri), uri)
    dataset = data.build_dataset(cfg.data, uri, seed=cfg.train.seed)
    storage = storage_root(cfg)
    fs, storage_path = pyarrow_filesystem(storage)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    run_config = ray.train.RunConfig(
        name=t.run_name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
        callbacks=callbacks or None, logging_config=train_logging_config())
    loop_config = {"config": cfg.to_dict(), "run_name": t.run_name, "resume_from": t.resume_from, "dataset_uri": uri,
                   "checkpoint_root": f"{storage.rstrip('/')}/{t.run_name}"}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config, datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))


def build_evaluator(cfg: Config, checkpoint_uri: str):
    """A TorchTrainer that evaluates `checkpoint_uri` (every worker samples; see worker.evaluate_loop_per_worker)."""
    import ray.train
    from . import data
    from .ray_trainer import ShortcutTrainer as TorchTrainer
    from .worker import evaluate_loop_per_worker

    uri = data.resolve_dataset(cfg.data)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    fs, storage_path = pyarrow_filesystem(storage_root(cfg))
    return TorchTrainer(
        evaluate_loop_per_worker, train_loop_config={"config": cfg.to_dict(), "checkpoint": checkpoint_uri},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"{t.run_name}-eval", storage_path=storage_path, storage_filesystem=fs),
        datasets={"train": data.build_dataset(cfg.data, uri, seed=cfg.eval.seed)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))


def preflight(cfg: Config, resume: bool = False, log=print) -> None:
    """Driver-side checks before any worker starts (preflight.py): PermanentError in seconds."""
    from . import data, preflight as checks
    from .shards import dataset_info

    uri = data.resolve_dataset(cfg.data)
    checks.run(cfg, storage_root(cfg), uri, dataset_info(uri), resume=resume, log=log)


def fit(cfg: Config, resume: bool = False):
    """Run (or resume: the run must exist) training; returns the ray.train.Result."""
    from .teacher import check_teacher

    check_teacher(cfg)  # fail before starting Ray (build_trainer checks again: Tune calls it directly)
    preflight(cfg, resume)  # tracking reachable, experiment created here (durable artifacts), storage, data
    if cfg.tracking.enabled:  # sets the experiment's UI kind tag once
        MlflowTracker(resolve_tracking_uri(cfg.tracking), cfg.tracking.experiment)
    ensure_ray(progress_bars=cfg.train.progress_bars)
    _check_cpus(cfg)
    return build_trainer(cfg).fit()


def _check_cpus(cfg: Config) -> None:
    """preflight.check_cpus against the running cluster; a cluster joined through RAY_ADDRESS may autoscale."""
    import ray

    from .preflight import check_cpus

    check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0), autoscaling=bool(os.environ.get("RAY_ADDRESS")))
