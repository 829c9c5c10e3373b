"""Ray Train end to end on CPU: 2 FSDP2 workers, Ray Data input, DCP checkpoints, a worker failure and
restart, a relaunch that resumes, and the MLflow run on a real `mlflow server` (issue: distributed
training). Slow (minutes on 2 cores): marked slow + services."""

from __future__ import annotations

import os

import pytest

from shortcut_ray.config import apply_overrides
from shortcut_ray.presets import get_preset

from tests.services import mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    fault = tmp_path_factory.mktemp("fault") / "fault.txt"
    os.environ["SHORTCUT_RAY_FAULT_FILE"] = str(fault)  # inherited by the workers of the local cluster
    ray.init(num_cpus=2, include_dashboard=True)
    yield fault
    ray.shutdown()
    os.environ.pop("SHORTCUT_RAY_FAULT_FILE", None)


def _config(tmp_path, uri, name, max_steps):
    cfg = apply_overrides(get_preset("debug_cpu"), [
        f"train.max_steps={max_steps}", "train.checkpoint_every=8", "train.log_every=1", "train.sample_every=100",
        "train.num_workers=2", f"train.storage_path={tmp_path / 'runs'}", f"train.run_name={name}",
        "train.max_failures=1", f"tracking.tracking_uri={uri}", "tracking.experiment=test-train",
        "eval.sample_steps=1,128", "eval.grid_size=2"])
    return cfg


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_fsdp_training_fails_restarts_and_resumes(tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from shortcut_ray.launch import fit, resolve_runtime

    fault = ray_session
    with mlflow_server(tmp_path) as uri:
        client = MlflowClient(uri)
        # A: uninterrupted reference run
        a = fit(resolve_runtime(_config(tmp_path, uri, "run-a", 24)))
        assert a.error is None and a.metrics["step"] == 24

        # B: rank 1 dies at step 13; Ray restarts the worker group from checkpoint 8
        fault.write_text("13 1")
        b = fit(resolve_runtime(_config(tmp_path, uri, "run-b", 24)))
        assert b.error is None and b.metrics["step"] == 24
        assert not fault.exists()  # the fault really fired
        run_dir = tmp_path / "runs" / "run-b"
        ckpts = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
        assert ckpts == ["checkpoint_0000008", "checkpoint_0000016", "checkpoint_0000024"]  # none lost
        for c in ckpts:
            assert (run_dir / c / "state.json").exists() and (run_dir / c / ".metadata").exists()
            assert len(list((run_dir / c).glob("*.distcp"))) == 2  # one shard file per FSDP rank

        exp = client.get_experiment_by_name("test-train")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        ra, rb = runs["run-a"], runs["run-b"]
        steps_b = [s for s, _ in _history(client, rb.info.run_id, "train/loss")]
        # after the fault the run restarted at step 9; steps MLflow already held are not logged twice
        assert steps_b.count(9) == 1 and 13 in steps_b and steps_b == sorted(set(steps_b))
        assert rb.data.tags["resumed_at_step"] == "8"
        assert int(rb.data.tags["metrics.not_relogged_through_step"]) >= 9
        # the resumed run's losses match the uninterrupted run's (same per-step draws; data order differs)
        la = dict(_history(client, ra.info.run_id, "train/loss"))
        lb = dict(_history(client, rb.info.run_id, "train/loss"))
        tail_a = sum(la[s] for s in range(17, 25)) / 8
        tail_b = sum(lb[s] for s in range(17, 25)) / 8
        assert abs(tail_a - tail_b) / tail_a < 0.15, (tail_a, tail_b)
        assert tail_a < la[1]  # and it trains

        # MLflow holds params, namespaced metrics, sample grids and the checkpoint URI
        assert rb.data.params["objective.bootstrap_every"] == "8"
        assert rb.data.params["derived.world_size"] == "2"
        for key in ("train/loss_flow", "train/loss_bootstrap", "train/grad_norm", "train/lr", "perf/images_per_s"):
            assert key in rb.data.metrics, key
        art = [a.path for a in client.list_artifacts(rb.info.run_id, "samples/step_0000024")]
        assert "samples/step_0000024/N001.png" in art and "samples/step_0000024/N128.png" in art
        assert rb.data.tags["checkpoint.latest"].endswith("run-b/checkpoint_0000024")

        # C: relaunch run-b with a larger budget: it resumes at 24 in the same MLflow run
        c = fit(resolve_runtime(_config(tmp_path, uri, "run-b", 32)))
        assert c.error is None and c.metrics["step"] == 32
        rb2 = client.get_run(rb.info.run_id)
        assert rb2.data.tags["resumed_at_step"] == "24" and rb2.info.status == "FINISHED"
        steps = [s for s, _ in _history(client, rb.info.run_id, "train/loss")]
        assert min(s for s in steps if s > 24) == 25 and max(steps) == 32
        assert (run_dir / "checkpoint_0000032" / "state.json").exists()
