"""Faults and bad input (issue: no hang, nothing lost, nothing run, no silent success).

Each test reproduces one probe that failed before its fix. Tests that need Ray are marked slow.
"""

from __future__ import annotations

import re
import threading

import pytest

from shortcut_ray.config import apply_overrides
from shortcut_ray.presets import get_preset


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_eval_between_checkpoints_does_not_hang(tmp_path, local_ray):
    """Point 0: every rank must make the same ray.train.report calls. Eval at 3, 6, 9 is not a checkpoint
    step (10); only rank 0 holds eval metrics, so branching on them left rank 0 in report's barrier and
    rank 1 in the next step's all-gather, forever."""
    from shortcut_ray.launch import fit, resolve_runtime

    cfg = apply_overrides(get_preset("debug_cpu"), [
        "train.eval_every=3", "train.checkpoint_every=10", "train.max_steps=12", "train.num_workers=2",
        "train.sample_every=0", "train.log_every=4", "eval.fid_samples=16", "eval.fid_steps=1,2",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=cadence", "tracking.enabled=false"])
    box: dict = {}

    def target():
        try:
            box["result"] = fit(resolve_runtime(cfg))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout=300)
    assert not th.is_alive(), "training with eval between checkpoints hung (report barrier mismatch)"
    assert "error" not in box, box.get("error")
    assert box["result"].metrics["step"] == 12


def _cfg(tmp_path, name, *overrides, tracking=False):
    sets = [f"train.storage_path={tmp_path / 'runs'}", f"train.run_name={name}", "train.sample_every=0",
            "train.num_workers=2", "train.log_every=5", "eval.fid_samples=16"]
    sets += [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracking else ["tracking.enabled=false"]
    return apply_overrides(get_preset("debug_cpu"), [*sets, *overrides])


@pytest.mark.slow
def test_divergence_stops_fast_keeps_last_good_checkpoint_and_fails_mlflow_run(tmp_path, local_ray):
    """Point 1: a diverged run (lr 1e30 after a good start) used to run on, report success, write non-finite
    checkpoints and rotate the good ones away. Now: a DivergenceError naming the step and the last good
    checkpoint, raised without retries; no checkpoint after it; the MLflow run FAILED with the reason."""
    import time

    from mlflow.tracking import MlflowClient

    from shortcut_ray.faults import DivergenceError, find_permanent
    from shortcut_ray.launch import fit, resolve_runtime

    good = fit(resolve_runtime(_cfg(tmp_path, "div", "train.max_steps=10", "train.checkpoint_every=5",
                                    tracking=True)))
    assert good.metrics["step"] == 10
    t0 = time.perf_counter()
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray wraps it; the cause is checked below
        fit(resolve_runtime(_cfg(tmp_path, "div", "train.max_steps=60", "train.checkpoint_every=5",
                                 "train.num_to_keep=1", "train.max_failures=3", "optim.lr=1e30", tracking=True)))
    elapsed = time.perf_counter() - t0
    err = find_permanent(info.value)
    assert isinstance(err, DivergenceError), info.value
    assert "checkpoint_0000010" in str(err) and re.search(r"at step 1\d ", str(err)), str(err)
    assert elapsed < 90, f"divergence took {elapsed:.0f} s to surface (retried?)"
    run_dir = tmp_path / "runs" / "div"
    ckpts = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_0"))
    assert ckpts[-1] == "checkpoint_0000010", ckpts  # nothing after the divergence; the good one kept
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shortcut-ray").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "diverged" in runs[0].data.tags["failure_reason"]
