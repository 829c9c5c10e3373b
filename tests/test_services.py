"""Each real service in tests/services.py starts, does one real thing, and is gone afterwards.

Run: python -m pytest tests/test_services.py -m services -q   (about a minute on 2 busy CPUs)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import (
    client_environ,
    gcs_emulator,
    gcsfs_filesystem,
    http_get,
    job_logs,
    mlflow_server,
    pid_alive,
    pids_mentioning,
    pids_with_env,
    ray_head,
    submit_job,
    wait_job,
)

pytestmark = pytest.mark.services


def test_mlflow_server_round_trip(tmp_path):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path) as uri:
        assert uri.startswith("http://127.0.0.1:")
        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("services-test")
        run = client.create_run(exp_id)
        client.log_param(run.info.run_id, "optim.lr", "0.0003")
        # Artifacts go through the server's proxy (mlflow-artifacts:/), so this checks --artifacts-destination too.
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        client.set_terminated(run.info.run_id)

        got = client.get_run(run.info.run_id)
        assert got.data.params == {"optim.lr": "0.0003"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
        pid = uri.pid
        assert pid_alive(pid)
    assert not pid_alive(pid)


def test_ray_head_token_auth_and_job_submit(tmp_path):
    with ray_head(tmp_path, num_cpus=1) as head:
        assert head.env["RAY_AUTH_MODE"] == "token"
        assert Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text() == head.token
        assert pid_alive(head.pid) and head.pid in head.pids

        # Raw HTTP: the Jobs API refuses a request without the token and accepts the bearer token.
        assert http_get(f"{head.dashboard_url}/api/jobs/")[0] == 401
        assert http_get(f"{head.dashboard_url}/api/jobs/", head.auth_headers)[0] == 200

        # The real `ray job submit` CLI with the token, env_vars passed through runtime_env.
        sid = submit_job(
            head,
            "python -c \"import os; print('FOO=' + os.environ['FOO'])\"",
            runtime_env={"env_vars": {"FOO": "bar"}},
            submission_id="services-test-ok",
            timeout=120,
        )
        assert wait_job(head, sid, timeout=120) == "SUCCEEDED", job_logs(head, sid)
        assert "FOO=bar" in job_logs(head, sid)

        # The same CLI without the token is refused. HOME points at an empty dir so that no
        # ~/.ray/auth_token of the machine's user can be picked up.
        no_token = {k: v for k, v in client_environ(head).items() if not k.startswith("RAY_AUTH")}
        no_token["HOME"] = str(tmp_path / "empty-home")
        r = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait",
             "--address", head.dashboard_url, "--", "python", "-c", "print(1)"],
            env=no_token, capture_output=True, text=True, timeout=120,
        )
        assert r.returncode != 0
        assert "Unauthorized: Missing authentication token" in r.stderr, r.stderr[-2000:]

        # A job still running at teardown: its driver runs in its own session, outside the head's process
        # group, and must still be stopped with the head.
        sid = submit_job(head, ["python", "-c", "import time; print('up', flush=True); time.sleep(600)"],
                         submission_id="services-test-left-running")
        _wait_for_log(head, sid, "up", timeout=120)

        pids, temp_dir = head.pids, head.temp_dir
        marker = f"RAY_AUTH_TOKEN_PATH={head.env['RAY_AUTH_TOKEN_PATH']}"
        assert pids_with_env(marker)  # the driver (and Ray's processes) carry the head's token path
    assert not any(pid_alive(p) for p in pids), [p for p in pids if pid_alive(p)]
    assert pids_mentioning(temp_dir) == []
    assert [p for p in pids_with_env(marker) if pid_alive(p)] == []
    assert not Path(temp_dir).exists()


def _wait_for_log(head, submission_id: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in job_logs(head, submission_id):
        assert time.monotonic() < deadline, job_logs(head, submission_id)[-2000:]
        time.sleep(0.5)


def test_gcs_emulator_gcsfs_round_trip(tmp_path):
    with gcs_emulator(tmp_path, bucket="testbucket") as endpoint:
        fs = gcsfs_filesystem(endpoint)
        with fs.open("testbucket/dir/hello.txt", "wb") as f:
            f.write(b"shortcut")
        assert fs.cat("testbucket/dir/hello.txt") == b"shortcut"
        assert fs.ls("testbucket/dir", detail=False) == ["testbucket/dir/hello.txt"]
        pid = endpoint.pid
        assert pid_alive(pid)
    assert not pid_alive(pid)
