"""A sweep's MLflow runs: the parent run's record of the result, and the trials' child runs closed
with the right status (an ASHA stop kills the trial actor, so the worker never ends its own run).

Called by `tune.run_sweep`; talks to MLflow only through the `tracking.MlflowTracker` it is handed.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from .config import Config
    from .tune import SweepResult


def runs(tracker, filt: str):
    return tracker.client.search_runs([tracker.experiment_id], filter_string=filt, max_results=5000)


def close_trial_runs(tracker, parent_id: str, statuses: dict[str, str], run_name: str = "") -> list[str]:
    """Close child runs still RUNNING after their trial ended (all, or the one of `run_name`) with
    statuses[ray_run_name] (default KILLED). An ASHA stop kills the trial actor, so the worker never
    ends its run (RAY_NOTES §3); a resumed trial's worker reopens it. Returns the closed run ids."""
    filt = f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"
    closed = []
    for r in runs(tracker, filt + (f" and tags.ray_run_name = '{run_name}'" if run_name else "")):
        tracker.client.set_terminated(r.info.run_id, statuses.get(r.data.tags.get("ray_run_name"), "KILLED"))
        closed.append(r.info.run_id)
    return closed


def final_status(error: bool, step, max_steps: int) -> str:
    # a stop right after the last report (ASHA's top rung can sit at max_steps) still finished training
    return "FAILED" if error else "FINISHED" if (step or 0) >= max_steps else "KILLED"


def closer_callback(tracking: dict, parent_id: str, sweep: str, max_steps: int):
    """Tune callback closing a trial's child run as soon as the trial ends (it is pickled into the
    sweep state, so it holds plain values and opens its MLflow client when called)."""
    from ray import tune

    class CloseTrialRuns(tune.Callback):
        def _close(self, trial, error: bool):
            from .tracking import MlflowTracker

            name = f"{sweep}-{trial.trial_id}"
            status = final_status(error, (trial.last_result or {}).get("step"), max_steps)
            try:
                close_trial_runs(MlflowTracker(**tracking), parent_id, {name: status}, name)
            except Exception as e:  # tracking trouble must not stop the sweep; the final pass retries
                print(f"[shortcut-ray] sweep: could not close the MLflow run of {name}: {e}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, error=True)

    return CloseTrialRuns()


def register_best(tracker, out: SweepResult, base: Config) -> None:
    """The best trial's logged generator (its run's tag model_uri) into the Model Registry (issue 14)."""
    name = base.tracking.register_model
    name = f"shortcut-ray-{base.preset}" if name == "auto" else name
    if not (name and out.best_run_id and base.tracking.log_model):
        return
    uri = tracker.client.get_run(out.best_run_id).data.tags.get("model_uri")
    if uri:
        out.best_model_uri = tracker.register_model(uri, name)
        tracker.set_tags({"best.model_uri": out.best_model_uri})


def finish_parent(tracker, out: SweepResult, max_steps: int) -> None:
    """Close leftover child runs, tag the ones ASHA cut short, and record on the parent trials.json and
    the best trial's params (best.*), metric (best/<metric>), config (best_config.json) and checkpoint."""
    trials = {t["run_name"]: t for t in out.trials}
    close_trial_runs(tracker, tracker.run_id,
                     {n: final_status(t["status"] == "ERROR", t["step"], max_steps) for n, t in trials.items()})
    children = {r.data.tags.get("ray_run_name"): r
                for r in runs(tracker, f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")}
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
