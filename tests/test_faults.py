"""Faults and bad input (issue: no hang, nothing lost, nothing run, no silent success).

Each test reproduces one probe that failed before its fix. Tests that need Ray are marked slow.
"""

from __future__ import annotations

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
