"""End to end against real services on 127.0.0.1: a Ray head with token auth, an MLflow server
(sqlite, local artifacts) and a GCS emulator. Digits shards are prepared to gs://, a training job is
`ray job submit`ted, stopped mid-run with `ray job stop`, resubmitted with --resume, and a checkpoint is
evaluated. Every service is stopped by PID (tests/services.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.services import client_environ, gcs_emulator, gcsfs_filesystem, job_logs, mlflow_server, pid_alive, \
    ray_head, submit_job, wait_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.services]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "e2e-run"


def _train_cmd(max_steps: int, resume: bool) -> str:
    sets = [f"train.max_steps={max_steps}", "train.checkpoint_every=5", "train.log_every=1", "train.sample_every=5",
            "train.num_workers=2", "train.storage_path=gs://testbucket/runs", "data.source=parquet",
            "data.uri=gs://testbucket/data/digits-16", "tracking.experiment=e2e", "eval.sample_steps=1,4,128",
            "eval.grid_size=2"]
    cmd = "python -m jobs.train --preset debug_cpu " + " ".join(f"--set {s}" for s in sets)
    return cmd + (f" --resume {RUN}" if resume else f" --set train.run_name={RUN}")


def _checkpoint_steps(fs) -> list[int]:
    fs.invalidate_cache()  # gcsfs caches listings; we poll for new objects
    try:
        names = fs.ls(f"testbucket/runs/{RUN}", detail=False)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        m = re.search(r"checkpoint_(\d+)$", n.rstrip("/"))
        if m and fs.exists(f"{n.rstrip('/')}/state.json"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _snapshot(fs) -> bytes:
    path = f"testbucket/runs/{RUN}/checkpoint_manager_snapshot.json"
    fs.invalidate_cache()
    return fs.cat(path) if fs.exists(path) else b""


def _committed(snapshot: bytes) -> int:
    """Step of the latest checkpoint Ray Train committed (0: none yet)."""
    latest = json.loads(snapshot)["latest_checkpoint_result"] if snapshot else None
    return int(re.fullmatch(r"checkpoint_(\d+)", latest["checkpoint_dir_name"]).group(1)) if latest else 0


def _committed_step(fs, settle_s: float = 10.0, timeout_s: float = 120.0) -> int:
    """Step of the latest committed checkpoint, once the run's storage stops changing for settle_s."""
    seen, since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = (_checkpoint_steps(fs), _snapshot(fs))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return _committed(seen[1])
        time.sleep(1)
    raise AssertionError(f"run storage still changing {timeout_s} s after the job stopped: {seen}")


def test_prepare_train_stop_resume_evaluate_on_real_services(tmp_path):
    from mlflow.tracking import MlflowClient

    with gcs_emulator(tmp_path) as gcs, mlflow_server(tmp_path) as mlf, ray_head(tmp_path, num_cpus=2) as head:
        env_vars = {"STORAGE_EMULATOR_HOST": str(gcs), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                    "MLFLOW_TRACKING_URI": str(mlf), "PYTHONUNBUFFERED": "1"}
        fs = gcsfs_filesystem(str(gcs))
        # 1. prepare the digits shards in the bucket
        subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--format", "digits", "--input", "sklearn",
                        "--output", "gs://testbucket/data/digits-16", "--image-size", "16"],
                       env={**os.environ, **env_vars}, cwd=ROOT, check=True, timeout=300)
        assert fs.exists("testbucket/data/digits-16/manifest.json")
        runtime_env = {"working_dir": ROOT, "env_vars": env_vars,
                       "excludes": [".git", ".venv", ".venv-gcs", "runs", "mlruns", "*.db", "bench/results"]}

        # 2. submit a long training job; stop it once Ray Train has committed a checkpoint
        first = submit_job(head, _train_cmd(10_000, resume=False), runtime_env, "e2e-train-1", cwd=ROOT)
        deadline = time.monotonic() + 420
        while not _committed(_snapshot(fs)):  # a committed checkpoint, not just an uploaded directory
            assert time.monotonic() < deadline, job_logs(head, first)[-3000:]
            time.sleep(2)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "stop", "--address", head.dashboard_url, first], env=client_environ(head),
                       check=True, timeout=120, capture_output=True)
        assert wait_job(head, first, timeout=120) == "STOPPED"
        # The resume point is Ray Train's latest *committed* checkpoint (RAY_NOTES §2c/e): a directory
        # uploaded in the instant the job was killed may never have been committed. Wait for the dying
        # workers to settle, then read the snapshot the next launch restores from.
        stopped_at = _committed_step(fs)
        assert 0 < stopped_at < 10_000 and stopped_at in _checkpoint_steps(fs)

        # 3. resubmit with --resume: continues from the latest checkpoint to a few steps further
        uncommitted = [s for s in _checkpoint_steps(fs) if s > stopped_at]
        target = stopped_at + 10
        second = submit_job(head, _train_cmd(target, resume=True), runtime_env, "e2e-train-2", cwd=ROOT)
        status = wait_job(head, second, timeout=600)
        logs = job_logs(head, second)
        assert status == "SUCCEEDED", logs[-4000:]
        resumed = re.findall(rf"resumed {RUN} at step (\d+)", logs)
        assert resumed == [str(stopped_at)], (stopped_at, _checkpoint_steps(fs), logs[:6000])  # once, not twice
        assert "never committed by Ray Train" in logs or not uncommitted, (uncommitted, logs[:6000])
        steps = _checkpoint_steps(fs)
        assert steps[-1] == target  # (train.num_to_keep = 3 may have deleted the older ones)
        assert fs.exists(f"testbucket/runs/{RUN}/checkpoint_{target:07d}/.metadata")

        # 4. evaluate the final checkpoint (FD proxy at N=1,4) into the same MLflow run
        third = submit_job(head, f"python -m jobs.evaluate gs://testbucket/runs/{RUN}/checkpoint_{target:07d} "
                                 "--steps 1,4 --samples 256 --set train.num_workers=2",
                           runtime_env, "e2e-eval", cwd=ROOT)
        status = wait_job(head, third, timeout=600)
        assert status == "SUCCEEDED", job_logs(head, third)[-4000:]

        # 5. MLflow: one run with params, metrics (before and after the resume) and grids
        client = MlflowClient(str(mlf))
        exp = client.get_experiment_by_name("e2e")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.ray_run_name = '{RUN}'")
        assert len(runs) == 1
        run = runs[0]
        assert run.data.params["data.uri"] == "gs://testbucket/data/digits-16"
        assert run.data.tags["resumed_at_step"] == str(stopped_at)
        hist = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert min(hist) == 1 and max(hist) == target and stopped_at + 1 in hist
        assert "eval/fd_pixel/N1" in run.data.metrics and "eval/fd_pixel/N4" in run.data.metrics
        grids = [a.path for a in client.list_artifacts(run.info.run_id, f"samples/step_{target:07d}")]
        assert f"samples/step_{target:07d}/N001.png" in grids
        assert run.data.tags["checkpoint.latest"] == f"gs://testbucket/runs/{RUN}/checkpoint_{target:07d}"
        pids = [gcs.pid, mlf.pid, head.pid]
    assert not any(pid_alive(p) for p in pids)
