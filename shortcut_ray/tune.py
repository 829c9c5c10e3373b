"""Hyper-parameter sweeps: schedulers, the Tune trial driver and MLflow bookkeeping (the search space
lives in `tune_space`).

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


def _runs(tracker, filt: str):
    return tracker.client.search_runs([tracker.experiment_id], filter_string=filt, max_results=5000)


def close_trial_runs(tracker, parent_id: str, statuses: dict[str, str], run_name: str = "") -> list[str]:
    """Close child runs still RUNNING after their trial ended (all, or the one of `run_name`) with
    statuses[ray_run_name] (default KILLED). An ASHA stop kills the trial actor, so the worker never
    ends its run (RAY_NOTES §3); a resumed trial's worker reopens it. Returns the closed run ids."""
    filt = f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"
    closed = []
    for r in _runs(tracker, filt + (f" and tags.ray_run_name = '{run_name}'" if run_name else "")):
        tracker.client.set_terminated(r.info.run_id, statuses.get(r.data.tags.get("ray_run_name"), "KILLED"))
        closed.append(r.info.run_id)
    return closed


def _final_status(error: bool, step, max_steps: int) -> str:
    # a stop right after the last report (ASHA's top rung can sit at max_steps) still finished training
    return "FAILED" if error else "FINISHED" if (step or 0) >= max_steps else "KILLED"


def _closer_callback(tracking: dict, parent_id: str, sweep: str, max_steps: int):
    """Tune callback closing a trial's child run as soon as the trial ends (it is pickled into the
    sweep state, so it holds plain values and opens its MLflow client when called)."""
    from ray import tune

    class CloseTrialRuns(tune.Callback):
        def _close(self, trial, error: bool):
            from .tracking import MlflowTracker

            name = f"{sweep}-{trial.trial_id}"
            status = _final_status(error, (trial.last_result or {}).get("step"), max_steps)
            try:
                close_trial_runs(MlflowTracker(**tracking), parent_id, {name: status}, name)
            except Exception as e:  # tracking trouble must not stop the sweep; the final pass retries
                print(f"[shortcut-ray] sweep: could not close the MLflow run of {name}: {e}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, error=True)

    return CloseTrialRuns()


def _tune_config(scheduler, search, metric, mode, num_samples, concurrent, base):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    # Rungs at grace * 2^k land on eval steps. A STOP on the top rung (max_t = max_steps) comes after
    # the final report: the run is complete and is closed FINISHED (see _final_status).
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

    import ray
    from ray import tune

    from . import data
    from .launch import preflight, resolve_runtime, storage_root
    from .storage import pyarrow_filesystem
    from .tracking import MlflowTracker

    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    name = name or f"sweep-{base.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    root = storage_root(_absolute(base)).rstrip("/")
    fs, root_path = pyarrow_filesystem(root)
    exp_uri, exp_path = f"{root}/{name}", f"{root_path}/{name}"
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # checkpoint-only reports carry no eval metric
    ensure_ray()
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restoring and not resume:
        raise ConfigError(f"sweep {name!r} already exists at {exp_uri}; pass --resume to continue it "
                          f"or choose another --name")
    if restoring:
        base = read_base(f"{exp_uri}/{BASE_CONFIG_FILE}")
    else:
        base = _absolute(check_metric(resolve_runtime(base), metric))
        preflight(base)  # tracking, storage, dataset: before any trial starts (PermanentError)
        base = override(base, {"train.storage_path": root, "train.run_name": ""})
        space = space if space is not None else default_space(base)
        domains = param_space(space, search)  # checked before anything is created: bad input fails here
        concurrent = max_concurrent or max_concurrent_trials(
            ray.cluster_resources(), base.train, data_cpus, _driver_resources().get("CPU", 0.0))
        tune_config = _tune_config(scheduler, search, metric, mode, num_samples, concurrent, base)
    tracking = {"tracking_uri": base.tracking.tracking_uri, "experiment": base.tracking.experiment}
    tracker = MlflowTracker(**tracking) if base.tracking.enabled else None
    old = _runs(tracker, f"tags.sweep = '{name}' and tags.`sweep.role` = 'parent'") if tracker and restoring else []
    tags = {"sweep": name, "sweep.role": "parent", "sweep.path": exp_uri, "sweep.metric": metric, "sweep.mode": mode}
    parent_id = tracker.start(name, tags, old[0].info.run_id if old else None) if tracker else None
    if old:
        tracker.set_tags({"sweep.interrupted": "false", "sweep.resumed": "true"})
    trainable = tune.with_resources(shortcut_trial, _driver_resources())
    if restoring:
        log(f"[shortcut-ray] sweep {name}: resuming {exp_uri} with its stored config, space, scheduler and metric")
        tuner = tune.Tuner.restore(exp_uri if fs is None else exp_path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        for d in space.values():
            for v, why in d.dropped:
                log(f"[shortcut-ray] sweep: dropped {d.key}={fmt_value(v)}: {why}")
        if tracker:
            tracker.log_params({**base.flat(), **{f"space.{k}": d.spec() for k, d in space.items()},
                                "sweep.scheduler": scheduler, "sweep.search": search, "sweep.num_samples": num_samples})
            tracker.log_dict({k: {"spec": d.spec(), "dropped": [[fmt_value(v), w] for v, w in d.dropped]}
                              for k, d in space.items()}, "space.json")
        data.resolve_dataset(base.data)  # write a built-in dataset once, not in every trial at the same time
        write_base(base, f"{exp_uri}/{BASE_CONFIG_FILE}")
        log(f"[shortcut-ray] sweep {name}: {exp_uri}, {concurrent} trial(s) at a time, {scheduler}/{search} on "
            f"{metric} ({mode}); space " + ", ".join(f"{k}={d.spec()}" for k, d in space.items()))
        sweep = {"name": name, "parent_run_id": parent_id or "", "train_storage": f"{exp_uri}/train",
                 "base_config": f"{exp_uri}/{BASE_CONFIG_FILE}", "metric": metric, "mode": mode,
                 "num_trials": expected_trials(space, search, num_samples)}
        tuner = tune.Tuner(
            trainable, param_space={**domains, "sweep": sweep}, tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=root_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=max_trial_failures),
                                      callbacks=[_closer_callback(tracking, parent_id, name, base.train.max_steps)]
                                      if tracker else []))
    grid = tuner.fit()
    saved = tune.ExperimentAnalysis(exp_uri if fs is None else exp_path, storage_filesystem=fs).trials
    out = _summarise(grid, saved, base, name, exp_uri, metric, mode, parent_id)
    if tracker:
        if not out.finished:  # Tune caught Ctrl-C and saved its state; the resume finishes the trial runs
            tracker.set_tags({"sweep.interrupted": "true"})
            tracker.end("KILLED")
            return out
        _finish_parent(tracker, out, base.train.max_steps)
        _register_best(tracker, out, base)
        tracker.end("FINISHED" if out.best_trial_id else "FAILED")
    return out


def _register_best(tracker, out: SweepResult, base: Config) -> None:
    """The best trial's logged generator (its run's tag model_uri) into the Model Registry (issue 14)."""
    name = base.tracking.register_model
    name = f"shortcut-ray-{base.preset}" if name == "auto" else name
    if not (name and out.best_run_id and base.tracking.log_model):
        return
    uri = tracker.client.get_run(out.best_run_id).data.tags.get("model_uri")
    if uri:
        out.best_model_uri = tracker.register_model(uri, name)
        tracker.set_tags({"best.model_uri": out.best_model_uri})


def _driver_resources() -> dict:
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


def _finish_parent(tracker, out: SweepResult, max_steps: int) -> None:
    """Close leftover child runs, tag the ones ASHA cut short, and record on the parent trials.json and
    the best trial's params (best.*), metric (best/<metric>), config (best_config.json) and checkpoint."""
    trials = {t["run_name"]: t for t in out.trials}
    close_trial_runs(tracker, tracker.run_id,
                     {n: _final_status(t["status"] == "ERROR", t["step"], max_steps) for n, t in trials.items()})
    children = {r.data.tags.get("ray_run_name"): r
                for r in _runs(tracker, f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")}
    for n, r in children.items():  # set on all: a resumed trial's run may have been closed on Ctrl-C
        t = trials.get(n, {})
        stopped = t.get("status") == "TERMINATED" and (t.get("step") or 0) < max_steps
        tracker.client.set_tag(r.info.run_id, "sweep.stopped_early", str(stopped).lower())
    tracker.log_dict({"metric": out.metric, "mode": out.mode, "trials": out.trials}, "trials.json")
    if out.best_trial_id is None:
        return
    cfg = out.best_config
    tracker.log_params({**{f"best.{k}": v for k, v in trials[cfg.train.run_name]["params"].items()},
                        "best.trial_id": out.best_trial_id})
    tracker.log_metrics({f"best/{out.metric}": out.best_value}, max_steps)
    tracker.log_dict(cfg.to_dict(), "best_config.json")
    out.best_run_id = children[cfg.train.run_name].info.run_id if cfg.train.run_name in children else None
    tracker.set_tags({"best.trial_id": out.best_trial_id, "best.run_name": cfg.train.run_name,
                      "best.checkpoint": out.best_checkpoint or "", "best.run_id": out.best_run_id or "",
                      "best.value": f"{out.best_value:.6g}"})
