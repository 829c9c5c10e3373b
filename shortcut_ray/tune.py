"""Hyper-parameter sweeps: schedulers, the Tune trial driver and the sweep's result (the search space
lives in `tune_space`, the MLflow parent and child runs in `sweep_runs`).

Each Tune trial is a *driver function* that builds and fits one Ray Train `TorchTrainer` and forwards
its rank-0 reports to Tune through `TuneReportCallback` (RAY_NOTES §3; `Tuner(trainer)` is
deprecated). The driver takes no CPU: it asks for one unit of the custom `train_driver` resource
(`ray start ... --resources='{"train_driver": 8}'`), or a hundredth of a CPU on clusters without it.

Identity and resume: the sweep is `<storage>/<name>` (the Tune experiment); trial T's Train run is
`<storage>/<name>/train/<name>-<T>`, so a retried or resumed trial resumes its Train run from its
latest checkpoint. `run_sweep(..., resume=True)` continues an interrupted sweep through
`tune.Tuner.can_restore` / `Tuner.restore` (the Tune API that works in Ray 2.60; the Train-side
`Trainer.restore` is deprecated there).

MLflow: one parent run per sweep (tags sweep=<name>, sweep.role=parent; params = base config and
search space); each trial's run is a nested child (the worker sets mlflow.parentRunId from
tracking.parent_run_id). At the end the parent gets the best trial's hyper-parameters (`best.*`),
`best_config.json`, the metric (`best/<metric>`) and the checkpoint URI (tag best.checkpoint); child
runs left RUNNING by an ASHA stop (the trial actor is killed, so the worker never ends its run) are
closed as KILLED.

Default metric `eval/fd_pixel/N1`, mode min: 1-step sample quality is what shortcut models exist
for, and the pixel-space Frechet distance is cheap and needs no Inception weights. With
eval.fid_weights set, `eval/fid/N1` is the real thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from .config import Config, ConfigError, override
from .storage import atomic_write, filesystem, is_remote
from .sweep_runs import close_trial_runs, closer_callback, finish_parent, register_best, runs
from .sweep_runs import final_status as _final_status

# the trial-closing Tune callback of a sweep saved before sweep_runs.py existed refers to these by name
_PICKLED_NAMES = (close_trial_runs, _final_status)
from .tune_space import (DRIVER_RESOURCE, Dim, asha_grace_period, check_metric, default_space,
                         expected_trials, fmt_value, max_concurrent_trials, param_space)

DEFAULT_METRIC = "eval/fd_pixel/N1"
DEFAULT_MODE = "min"
SCHEDULERS = ("asha", "fifo")  # PBT would need trials to load each other's Train checkpoints: not wired


# -- the trial --------------------------------------------------------------------------------------

BASE_CONFIG_FILE = "base_config.json"


def read_base(uri: str) -> Config:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return Config.from_dict(json.load(f))


def write_base(cfg: Config, uri: str) -> None:
    atomic_write(uri, cfg.to_json())


def trial_config(config: dict, trial_id: str, base: Config | None = None) -> Config:
    """The Config of one trial: the sweep's base config (stored beside the Tune state, not in the
    param space, which Tune prints and copies into every result row) with the sampled values, a
    stable Train run name from the trial id (a retried trial resumes its run), and the MLflow parent."""
    sweep = config["sweep"]
    cfg = override(base or read_base(sweep["base_config"]), {k: v for k, v in config.items() if "." in k})
    name = f"{sweep['name']}-{trial_id}"
    tags = ",".join(t for t in (cfg.tracking.tags, f"sweep={sweep['name']}", f"trial_id={trial_id}") if t)
    return override(cfg, {"train.run_name": name, "train.storage_path": sweep["train_storage"],
                          "tracking.run_name": name, "tracking.parent_run_id": sweep["parent_run_id"],
                          "tracking.tags": tags, "tracking.register_model": ""})  # the sweep registers its best


def shortcut_trial(config: dict) -> None:
    """Tune trainable: fit one TorchTrainer, forwarding its reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .launch import build_trainer

    cfg = trial_config(config, tune.get_context().get_trial_id())
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# -- the sweep ----------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    path: str  # the Tune experiment (what --resume continues)
    metric: str
    mode: str
    tracking_uri: str
    parent_run_id: str | None
    finished: bool = True  # False: interrupted (Ctrl-C); resume with the same name
    best_trial_id: str | None = None
    best_value: float | None = None
    best_config: Config | None = None
    best_checkpoint: str | None = None
    best_run_id: str | None = None
    best_model_uri: str | None = None
    trials: list = dataclasses.field(default_factory=list)


def init_local_ray(num_cpus: int | None = None, driver_slots: int = 64, **kwargs) -> None:
    """Start a local Ray for sweeps, with `train_driver` slots for the trial drivers.

    The dashboard port is chosen here and given to every Ray process as RAY_API_SERVER_ADDRESS:
    otherwise Train's PlacementGroupCleaner finds the State API by scanning the machine for Ray
    instances, and its thread dies ("Found multiple active Ray instances") when another Ray runs on
    the same machine -- then the placement groups of ASHA-stopped trials leak (RAY_NOTES §3).
    """
    import socket

    import logging

    import ray

    from .console import quiet_environment

    for k, v in quiet_environment().items():  # Ray Data / MLflow INFO lines out of the console
        os.environ.setdefault(k, v)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, resources={DRIVER_RESOURCE: driver_slots}, include_dashboard=True,
             dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             **kwargs)


def ensure_ray() -> None:
    """Join $RAY_ADDRESS (ray job submit sets it), else start a local Ray (`init_local_ray`)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"]) if os.environ.get("RAY_ADDRESS") else init_local_ray()


def _absolute(cfg: Config) -> Config:
    """Trial actors run in their trial directory: make local relative paths absolute on the driver."""
    for key in ("data.uri", "eval.fid_weights", "eval.fid_ref_stats", "train.resume_from", "train.storage_path"):
        v = cfg.flat()[key]
        if v and not is_remote(v) and not os.path.isabs(os.path.expanduser(v)):
            cfg = override(cfg, {key: os.path.abspath(v)})
    return cfg


def _tune_config(scheduler, search, metric, mode, num_samples, concurrent, base):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    # Rungs at grace * 2^k land on eval steps. A STOP on the top rung (max_t = max_steps) comes after
    # the final report: the run is complete and is closed FINISHED (see sweep_runs.final_status).
    sched = FIFOScheduler() if scheduler == "fifo" else ASHAScheduler(
        time_attr="step", max_t=base.train.max_steps, reduction_factor=2,
        grace_period=asha_grace_period(base, metric, 2), stop_last_trials=False)
    if search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError(f"--search optuna needs `pip install optuna` ({e})") from None
        alg, limit = OptunaSearch(metric=metric, mode=mode, seed=base.train.seed), concurrent
    else:  # Tune ignores max_concurrent_trials for an explicit BasicVariantGenerator (only a warning)
        alg, limit = BasicVariantGenerator(random_state=base.train.seed, max_concurrent=concurrent), None
    return tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=sched, search_alg=alg,
                           max_concurrent_trials=limit, trial_dirname_creator=_trial_dirname)


def run_sweep(base: Config, name: str = "", space: dict[str, Dim] | None = None, num_samples: int = 8,
              scheduler: str = "asha", search: str = "random", metric: str = DEFAULT_METRIC,
              mode: str = DEFAULT_MODE, resume: bool = False, max_concurrent: int | None = None,
              data_cpus: float = 1.0, max_trial_failures: int = 1, log=print) -> SweepResult:
    """Run a sweep over `space` (default: `default_space(base)`); with resume=True continue the sweep
    `name` if it exists -- its stored base config, space, scheduler and metric win over the arguments."""
    import datetime

    from ray import tune

    from .launch import storage_root
    from .storage import pyarrow_filesystem
    from .tracking import MlflowTracker

    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    name = name or f"sweep-{base.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    root = storage_root(_absolute(base)).rstrip("/")
    fs, root_path = pyarrow_filesystem(root)
    exp = _Experiment(name, root, fs, root_path)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # checkpoint-only reports carry no eval metric
    ensure_ray()
    restoring = tune.Tuner.can_restore(exp.path, storage_filesystem=fs)
    if restoring and not resume:
        raise ConfigError(f"sweep {name!r} already exists at {exp.uri}; pass --resume to continue it "
                          f"or choose another --name")
    if restoring:
        base, plan = read_base(f"{exp.uri}/{BASE_CONFIG_FILE}"), None
    else:
        plan = _plan(base, root, space, {"scheduler": scheduler, "search": search, "num_samples": num_samples,
                                         "metric": metric, "mode": mode, "max_concurrent": max_concurrent,
                                         "data_cpus": data_cpus})
        base = plan.base
    tracking = {"tracking_uri": base.tracking.tracking_uri, "experiment": base.tracking.experiment}
    tracker = MlflowTracker(**tracking) if base.tracking.enabled else None
    old = runs(tracker, f"tags.sweep = '{name}' and tags.`sweep.role` = 'parent'") if tracker and restoring else []
    tags = {"sweep": name, "sweep.role": "parent", "sweep.path": exp.uri, "sweep.metric": metric, "sweep.mode": mode}
    parent_id = tracker.start(name, tags, old[0].info.run_id if old else None) if tracker else None
    if old:
        tracker.set_tags({"sweep.interrupted": "false", "sweep.resumed": "true"})
    trainable = tune.with_resources(shortcut_trial, driver_resources())
    if restoring:
        log(f"[shortcut-ray] sweep {name}: resuming {exp.uri} with its stored config, space, scheduler and metric")
        tuner = tune.Tuner.restore(exp.uri if fs is None else exp.path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = _new_tuner(trainable, exp, plan, tracker, parent_id, tracking, max_trial_failures, log)
    grid = tuner.fit()
    saved = tune.ExperimentAnalysis(exp.uri if fs is None else exp.path, storage_filesystem=fs).trials
    out = _summarise(grid, saved, base, name, exp.uri, metric, mode, parent_id)
    if tracker:
        if not out.finished:  # Tune caught Ctrl-C and saved its state; the resume finishes the trial runs
            tracker.set_tags({"sweep.interrupted": "true"})
            tracker.end("KILLED")
            return out
        finish_parent(tracker, out, base.train.max_steps)
        register_best(tracker, out, base)
        tracker.end("FINISHED" if out.best_trial_id else "FAILED")
    return out


@dataclasses.dataclass(frozen=True)
class _Experiment:
    """Where a sweep lives: its name, the storage root (URI), and the pyarrow filesystem and path for it."""
    name: str
    root: str
    fs: object
    root_path: str

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def path(self) -> str:
        return f"{self.root_path}/{self.name}"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A new sweep, checked before anything is created: its base config, space, Tune domains and settings."""
    base: Config
    space: dict
    domains: dict
    tune_config: object
    concurrent: int
    args: dict


def _plan(base: Config, root: str, space: dict[str, Dim] | None, args: dict) -> _Plan:
    """Check a new sweep before any run or file exists: tracking, storage, dataset and metric (preflight),
    the space (default: `default_space`) and its search, and how many trials run at a time."""
    import ray

    from .launch import preflight, resolve_runtime

    base = _absolute(check_metric(resolve_runtime(base), args["metric"]))
    preflight(base)  # PermanentError before anything is created
    base = override(base, {"train.storage_path": root, "train.run_name": ""})
    space = space if space is not None else default_space(base)
    domains = param_space(space, args["search"])
    concurrent = args["max_concurrent"] or max_concurrent_trials(
        ray.cluster_resources(), base.train, args["data_cpus"], driver_resources().get("CPU", 0.0))
    tune_config = _tune_config(args["scheduler"], args["search"], args["metric"], args["mode"],
                               args["num_samples"], concurrent, base)
    return _Plan(base, space, domains, tune_config, concurrent, args)


def _new_tuner(trainable, exp: _Experiment, plan: _Plan, tracker, parent_id, tracking: dict,
               max_trial_failures: int, log):
    """A new sweep's Tuner: its space logged (console and MLflow parent), the base config and the built-in
    dataset written once, the trials' shared `sweep` entry."""
    from ray import tune

    from . import data

    base, space, args = plan.base, plan.space, plan.args
    for d in space.values():
        for v, why in d.dropped:
            log(f"[shortcut-ray] sweep: dropped {d.key}={fmt_value(v)}: {why}")
    if tracker:
        tracker.log_params({**base.flat(), **{f"space.{k}": d.spec() for k, d in space.items()},
                            **{f"sweep.{k}": args[k] for k in ("scheduler", "search", "num_samples")}})
        tracker.log_dict({k: {"spec": d.spec(), "dropped": [[fmt_value(v), w] for v, w in d.dropped]}
                          for k, d in space.items()}, "space.json")
    data.resolve_dataset(base.data)  # write a built-in dataset once, not in every trial at the same time
    write_base(base, f"{exp.uri}/{BASE_CONFIG_FILE}")
    log(f"[shortcut-ray] sweep {exp.name}: {exp.uri}, {plan.concurrent} trial(s) at a time, {args['scheduler']}/"
        f"{args['search']} on {args['metric']} ({args['mode']}); space "
        + ", ".join(f"{k}={d.spec()}" for k, d in space.items()))
    sweep = {"name": exp.name, "parent_run_id": parent_id or "", "train_storage": f"{exp.uri}/train",
             "base_config": f"{exp.uri}/{BASE_CONFIG_FILE}", "metric": args["metric"], "mode": args["mode"],
             "num_trials": expected_trials(space, args["search"], args["num_samples"])}
    return tune.Tuner(
        trainable, param_space={**plan.domains, "sweep": sweep}, tune_config=plan.tune_config,
        run_config=tune.RunConfig(name=exp.name, storage_path=exp.root_path, storage_filesystem=exp.fs,
                                  failure_config=tune.FailureConfig(max_failures=max_trial_failures),
                                  callbacks=[closer_callback(tracking, parent_id, exp.name, base.train.max_steps)]
                                  if tracker else []))


def driver_resources() -> dict:
    """One train_driver slot where the cluster has them (0 CPU), else a hundredth of a CPU."""
    import ray

    return {DRIVER_RESOURCE: 1} if DRIVER_RESOURCE in ray.cluster_resources() else {"CPU": 0.01}


def _summarise(grid, saved, base: Config, name, exp_uri, metric, mode, parent_id) -> SweepResult:
    """Trials, the best one (trials that reached max_steps beat ones stopped early, then the metric)
    and whether the sweep finished. Tune marks trials it stops on Ctrl-C as TERMINATED in memory, so
    completeness is read from the saved experiment state (`saved`: trials as last checkpointed)."""
    configs = [r.config or {} for r in grid]
    stored = next((c["sweep"] for c in configs if "sweep" in c), {})  # a resumed sweep keeps its metric
    metric, mode, want = stored.get("metric", metric), stored.get("mode", mode), stored.get("num_trials", 0)
    done = len(saved) >= want and all(t.status in ("TERMINATED", "ERROR") for t in saved)
    out = SweepResult(name, exp_uri, metric, mode, base.tracking.tracking_uri, parent_id, finished=done)
    root = base.train.storage_path
    scheme = root.split("://")[0] + "://" if is_remote(root) else ""
    best_key, best_config = None, None
    for r, config in zip(grid, configs):
        m = r.metrics or {}
        tid = m.get("trial_id") or os.path.basename(str(r.path)).removeprefix("trial_")
        df = r.metrics_dataframe
        paths = df["checkpoint_path"].dropna() if df is not None and "checkpoint_path" in df else ()
        value = m.get(metric)
        value = float(value) if value is not None and math.isfinite(float(value)) else None
        trial = {"trial_id": tid, "run_name": f"{name}-{tid}", "status": "ERROR" if r.error else "TERMINATED",
                 "step": m.get("step"), metric: value,
                 "checkpoint": scheme + str(paths.iloc[-1]) if len(paths) else None,
                 "params": {k: v for k, v in config.items() if "." in k}}
        out.trials.append(trial)
        if r.error or value is None:
            continue
        key = (m.get("step", 0) >= base.train.max_steps, -value if mode == "min" else value)
        if best_key is None or key > best_key:
            best_key, best, best_config = key, trial, config
    if best_key is not None:
        out.best_trial_id, out.best_value, out.best_checkpoint = best["trial_id"], best[metric], best["checkpoint"]
        out.best_config = trial_config(best_config, best["trial_id"], base)
    return out
