"""Real services for tests and benchmarks: an MLflow tracking server, a Ray head with token auth, a GCS emulator.

Each service is a context manager that starts the real program on 127.0.0.1 on a port found at runtime,
in its own directory, waits until it answers, yields how to reach it, and on exit stops it by PID: its
process group, plus processes that left the group but are provably its own (descendants, or carrying its
private paths) -- never `ray stop`, which would kill every Ray cluster on a shared machine. Yielded URLs are
`Endpoint`s: plain strings that also carry `.pid`. Usable from pytest fixtures and from bench/ scripts:

    with mlflow_server(tmp) as uri, ray_head(tmp, num_cpus=2) as head, gcs_emulator(tmp) as gcs:
        sid = submit_job(head, "python -m jobs.train --preset digits",
                         runtime_env={"working_dir": ".", "env_vars": {"MLFLOW_TRACKING_URI": uri}})
        assert wait_job(head, sid, timeout=600) == "SUCCEEDED"

Nothing here changes os.environ except `gcsfs_filesystem`, which must pin
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before gcsfs is imported (RAY_NOTES section 2).
The one exception to "everything in tmpdir": Ray needs a short --temp-dir (Unix socket paths are capped at
107 bytes), so the head gets /tmp/rayXXXXXXXX, removed again on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

# The CLIs of the environment running us (.venv/bin/mlflow, .venv/bin/ray), not whatever is first on PATH.
_BIN = Path(sys.executable).parent
# Project root: tests/services.py -> repo; used to find the emulator's own venv.
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_GCS_EMULATOR_BIN = _REPO / ".venv-gcs" / "bin" / "gcp-storage-emulator"

# Client-side variables that would silently redirect or re-authenticate a child process if inherited
# from the caller's shell (e.g. an RAY_AUTH_TOKEN for some other cluster beats our token file).
_RAY_CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

_TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class ServiceError(RuntimeError):
    """A service did not start (or a job did not finish) in time; the message carries its log tail."""


class Endpoint(str):
    """A URL string that also remembers the PID and log file of the process serving it.

    It is a plain `str` for every consumer (env vars, MlflowClient, gcsfs); tests use `.pid` to check that
    the process is gone after the context manager exits.
    """

    pid: int
    log_path: Path

    def __new__(cls, url: str, pid: int, log_path: Path) -> "Endpoint":
        self = super().__new__(cls, url)
        self.pid = pid
        self.log_path = log_path
        return self


@dataclass(frozen=True)
class RayHead:
    """How to reach a running Ray head started by `ray_head`."""

    address: str  # GCS address host:port, for ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job` and the Jobs REST API
    env: dict[str, str]  # what a client process needs: auth mode, token file, addresses
    token: str  # the cluster token, for `Authorization: Bearer` on raw HTTP
    pid: int  # the `ray start --block` process (leader of the head's process group)
    temp_dir: str  # Ray's --temp-dir; every Ray process of this head names it on its command line
    log_path: Path  # stdout/stderr of `ray start`
    pids: tuple[int, ...] = field(default=())  # processes of this head seen while it ran (for tests)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


# --------------------------------------------------------------------------------------------------
# Ports, processes, readiness


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`.

    Never returns the same port twice in one process, so several services started back to back do not
    collide before any of them has bound its port.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ServiceError("could not find a free port in 100 tries")


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state letter follows the parenthesised command name, which may itself contain ')'.
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-chars:]


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """GET `url`; (status, body). HTTP errors are returned, connection errors raise OSError."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _spawn(cmd: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen:
    # A new session makes the child the leader of its own process group, so one killpg reaches it and
    # everything it forks without touching our group (pytest) or anyone else's.
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), cwd=cwd, start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor


def _wait_ready(name: str, proc: subprocess.Popen, log_path: Path, probe, timeout: float) -> None:
    """Poll `probe()` until it returns True; fail early if the process exits, with the log tail either way."""
    deadline = time.monotonic() + timeout
    last_err = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"{name} exited with code {proc.returncode} before becoming ready; log {log_path}:\n{_log_tail(log_path)}"
            )
        try:
            if probe():
                return
            last_err = "answered, but not ready yet"
        except (OSError, ValueError) as e:  # connection refused/reset, timeouts, half-written files
            last_err = repr(e)
        time.sleep(0.5)
    raise ServiceError(
        f"{name} not ready after {timeout:.0f} s (last probe error: {last_err or 'none'}); "
        f"log {log_path}:\n{_log_tail(log_path)}"
    )


def _ppids() -> dict[int, int]:
    """pid -> parent pid for every process (Linux /proc; no psutil needed)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    out[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants(pid: int) -> list[int]:
    """All descendants of `pid`, including children forked by any of its threads.

    (/proc/PID/task/PID/children would miss those: Ray's JobSupervisor starts the job driver from a
    thread, and that driver then outlived the head.)
    """
    kids: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        kids.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _own_lineage() -> set[int]:
    """This process and its ancestors: never targets of a cleanup sweep."""
    ppids, pid, out = _ppids(), os.getpid(), set()
    while pid and pid not in out:
        out.add(pid)
        pid = ppids.get(pid, 0)
    return out


def pids_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains `needle` (a private temp dir, so it only matches our processes)."""
    return _scan_proc("cmdline", needle.encode())


def pids_with_env(assignment: str) -> list[int]:
    """PIDs whose environment holds exactly `NAME=value`."""
    return _scan_proc("environ", assignment.encode(), split=True)


def _scan_proc(file: str, needle: bytes, split: bool = False) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/{file}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if (needle in data.split(b"\0")) if split else (needle in data):
            found.append(int(entry.name))
    return found


def _kill_all(pids: Sequence[int], timeout: float) -> list[int]:
    """SIGTERM, wait, SIGKILL what is left; returns PIDs still alive at the end (should be none)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            break
    return pids


def _stop(proc: subprocess.Popen, name: str, grace: float = 10.0, also: Sequence[int] = ()) -> None:
    """Stop `proc`'s whole process group (and the extra PIDs in `also`) and reap `proc`.

    SIGTERM first; whatever is still alive after `grace` seconds gets SIGKILL.
    """
    tree = [proc.pid, *_descendants(proc.pid), *also]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)  # pgid == pid because of start_new_session
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # The group may outlive its leader, so SIGKILL it whether or not the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Children that left the group (or were slow to follow the leader) are stopped by PID.
    survivors = _kill_all([p for p in dict.fromkeys(tree) if p != proc.pid and pid_alive(p)], grace)
    if survivors:
        raise ServiceError(f"{name}: processes {survivors} survived SIGKILL")


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
    # Our interpreter's bin dir first: a job entrypoint `python -m jobs.train` must find this environment's
    # python (with ray, torch, the project), not whatever python the caller's PATH has when the venv is
    # used without being activated.
    env["PATH"] = os.pathsep.join([str(_BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def mlflow_server(tmpdir: str | os.PathLike, timeout: float = 120.0) -> Iterator[Endpoint]:
    """Run `mlflow server` (sqlite backend, proxied local artifacts) and yield its tracking URI.

    The job runner (7 huey consumer processes by default) is switched off: tests do not use it and the
    machines are small (RAY_NOTES section 5). Startup is mostly imports and the sqlite schema migration:
    ~20 s on 2 idle-ish cores, 50 s seen under heavy load, hence the generous timeout.
    """
    root = Path(tmpdir).resolve() / f"mlflow-{secrets.token_hex(3)}"
    (root / "artifacts").mkdir(parents=True)
    port = free_port()
    log_path = root / "server.log"
    cmd = [
        _exe("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = _clean_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = _spawn(cmd, log_path, env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready("mlflow server", proc, log_path, lambda: http_get(f"{url}/health") == (200, "OK"), timeout)
        yield Endpoint(url, proc.pid, log_path)
    finally:
        _stop(proc, "mlflow server")


def _exe(name: str) -> str:
    path = _BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found beside {sys.executable} nor on PATH; install it into this environment")
    return found


# --------------------------------------------------------------------------------------------------
# Ray head with token authentication


@contextlib.contextmanager
def ray_head(
    tmpdir: str | os.PathLike,
    num_cpus: int = 2,
    resources: Mapping[str, float] | None = None,
    object_store_memory: int | None = None,
    timeout: float = 120.0,
) -> Iterator[RayHead]:
    """Run `ray start --head --block` with token auth on and yield a `RayHead`.

    Token auth is forced on with RAY_AUTH_MODE=token and a fresh token in a file named by
    RAY_AUTH_TOKEN_PATH, so neither ~/.ray/auth_token nor the caller's environment decides it. Every
    port Ray would otherwise take at a fixed default (dashboard 8265, agent 52365, client server 10001)
    is chosen free at runtime so that several heads -- ours or other people's -- can share the machine.
    `resources` adds custom resources, e.g. {"train_driver": 2} for Tune trial drivers (RAY_NOTES section 3).
    """
    root = Path(tmpdir).resolve() / f"ray-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    token = secrets.token_hex(32)  # the same format `ray get-auth-token --generate` writes
    token_path = root / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths are capped at 107 bytes
    log_path = root / "ray_start.log"

    gcs_port, dash_port = free_port(), free_port()
    cmd = [
        _exe("ray"), "start", "--head", "--block",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(dict(resources))}")
    if object_store_memory:
        cmd.append(f"--object-store-memory={int(object_store_memory)}")

    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    marker = f"RAY_AUTH_TOKEN_PATH={token_path}"  # inherited by every process of this head
    proc = _spawn(cmd, log_path, _clean_env({**auth_env, "RAY_USAGE_STATS_ENABLED": "0"}), cwd=root)
    dashboard_url = f"http://127.0.0.1:{dash_port}"
    headers = {"Authorization": f"Bearer {token}"}
    seen: list[int] = []
    try:
        # Every dashboard route, /api/version included, wants the token; /api/jobs/ answers 200 once the
        # job module can take submissions.
        _wait_ready(
            "ray head", proc, log_path,
            lambda: http_get(f"{dashboard_url}/api/version", headers)[0] == 200
            and http_get(f"{dashboard_url}/api/jobs/", headers)[0] == 200,
            timeout,
        )
        # ray.init() resolves 127.0.0.1 to the node IP Ray picked (192.0.2.2 here); both were checked to work.
        address = f"127.0.0.1:{gcs_port}"
        env = {**auth_env, "RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": dashboard_url}
        seen = sorted(set(_descendants(proc.pid)) | set(pids_mentioning(temp_dir)) | {proc.pid})
        yield RayHead(address, dashboard_url, env, token, proc.pid, temp_dir, log_path, tuple(seen))
    finally:
        # Ray workers and job drivers get their own process groups (seen: ray::IDLE with pgid == pid; a job
        # driver left running with ppid 1), so killpg alone misses them. Also stopped: every descendant of
        # `ray start`, anything naming temp_dir on its command line, and anything whose environment holds
        # this head's RAY_AUTH_TOKEN_PATH -- all private to this head, so none can match another cluster.
        def ours() -> set[int]:
            return (set(_descendants(proc.pid)) | set(pids_mentioning(temp_dir))
                    | set(pids_with_env(marker))) - _own_lineage()

        try:
            # `ray start --block` does not bring gcs_server and the monitor down on SIGTERM (seen: still
            # alive 15 s later), and a discarded test cluster needs no graceful shutdown: short grace.
            _stop(proc, "ray head", grace=3.0, also=sorted((set(seen) | ours()) - {proc.pid}))
            late = _kill_all(sorted(ours()), 10.0)  # anything spawned or orphaned during shutdown
            if late:
                raise ServiceError(f"ray head: processes {late} survived SIGKILL")
        finally:
            # Keep Ray's own logs (dashboard, raylet, job drivers) beside ours; the temp dir goes away.
            with contextlib.suppress(OSError):
                shutil.copytree(Path(temp_dir) / "session_latest" / "logs", root / "ray_logs",
                                symlinks=True, ignore_dangling_symlinks=True)
            shutil.rmtree(temp_dir, ignore_errors=True)


def client_environ(head: RayHead, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without foreign Ray client settings, plus what reaches `head`.

    Use as the env of a `ray job ...` subprocess or of a process calling ray.init().
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _RAY_CLIENT_VARS}
    env["PATH"] = os.pathsep.join([str(_BIN), env.get("PATH", "")])  # the `ray` CLI of this environment
    env.update(head.env)
    return env


def submit_job(
    head: RayHead,
    entrypoint: str | Sequence[str],
    runtime_env: Mapping | None = None,
    submission_id: str | None = None,
    timeout: float = 120.0,
    cwd: str | os.PathLike | None = None,
) -> str:
    """Submit `entrypoint` with the real `ray job submit --no-wait` CLI (token from `head.env`); return the id.

    `entrypoint` is a shell command line or an argv list; a relative `working_dir` in `runtime_env` is
    resolved against `cwd` (default: the current directory). `timeout` bounds the submission itself,
    which includes zipping and uploading the working dir; use `wait_job` for the run.
    """
    submission_id = submission_id or f"job-{secrets.token_hex(4)}"
    argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    cmd = [_exe("ray"), "job", "submit", "--no-wait", "--address", head.dashboard_url,
           "--submission-id", submission_id]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(dict(runtime_env))]
    cmd += ["--", *argv]
    try:
        r = subprocess.run(cmd, env=client_environ(head), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ServiceError(f"`ray job submit` did not return within {timeout:.0f} s: {e.stdout}\n{e.stderr}") from e
    if r.returncode != 0:
        raise ServiceError(f"`ray job submit` failed with code {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return submission_id


def _job_client(head: RayHead):
    from ray.job_submission import JobSubmissionClient  # imported late: services.py must load without ray

    # An explicit Authorization header takes precedence over anything in our own environment.
    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)


def wait_job(head: RayHead, submission_id: str, timeout: float = 600.0) -> str:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED and return that status name.

    Raises ServiceError with the job's log tail if it is still running after `timeout` seconds (the job
    is stopped first, so nothing keeps using the shared CPUs).
    """
    client = _job_client(head)
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in _TERMINAL_JOB_STATES:
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                client.stop_job(submission_id)
            raise ServiceError(
                f"job {submission_id} still {status} after {timeout:.0f} s; logs:\n{job_logs(head, submission_id)[-4000:]}"
            )
        time.sleep(1.0)


def job_logs(head: RayHead, submission_id: str) -> str:
    """The driver log of a job (what `ray job logs` prints)."""
    return _job_client(head).get_job_logs(submission_id)


# --------------------------------------------------------------------------------------------------
# GCS emulator


@contextlib.contextmanager
def gcs_emulator(tmpdir: str | os.PathLike, bucket: str = "testbucket", timeout: float = 60.0) -> Iterator[Endpoint]:
    """Run the PyPI `gcp-storage-emulator` with `bucket` created and yield its endpoint URL.

    The emulator lives in its own venv (its pinned dependencies clash with the project's): by default
    <repo>/.venv-gcs, created with `python3 -m venv .venv-gcs && .venv-gcs/bin/pip install gcp-storage-emulator`;
    set GCS_EMULATOR_BIN to use another executable. Clients point at the endpoint explicitly
    (`gcsfs_filesystem(endpoint)`, or STORAGE_EMULATOR_HOST in a child's env); nothing is set globally.
    """
    exe = Path(os.environ.get("GCS_EMULATOR_BIN", DEFAULT_GCS_EMULATOR_BIN))
    if not exe.exists():
        raise ServiceError(
            f"gcp-storage-emulator not found at {exe}; create it with `python3 -m venv .venv-gcs && "
            f".venv-gcs/bin/pip install gcp-storage-emulator` in the repo root, or set GCS_EMULATOR_BIN"
        )
    root = Path(tmpdir).resolve() / f"gcs-{secrets.token_hex(3)}"
    (root / "data").mkdir(parents=True)
    port = free_port()
    log_path = root / "emulator.log"
    cmd = [str(exe), "-d", str(root / "data"), "start", "--host", "127.0.0.1", "--port", str(port),
           "--default-bucket", bucket]
    proc = _spawn(cmd, log_path, _clean_env(), cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready("gcp-storage-emulator", proc, log_path,
                    lambda: http_get(f"{url}/storage/v1/b/{bucket}")[0] == 200, timeout)
        yield Endpoint(url, proc.pid, log_path)
    finally:
        _stop(proc, "gcp-storage-emulator")


def gcsfs_filesystem(endpoint: str):
    """A gcsfs filesystem talking to the emulator at `endpoint` anonymously.

    Sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false first: otherwise gcsfs 2026.x probes the storage-control
    gRPC API per bucket, which the emulator lacks (60 s timeouts per call, RAY_NOTES section 2). The
    variable is read when gcsfs is imported; setting it here also covers fsspec's `gs://` lookups and child
    processes started later.
    """
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    # The core class directly: `gcsfs.GCSFileSystem` is already the extended class if some earlier
    # import in this process saw the variable unset.
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(project="test", token="anon", endpoint_url=str(endpoint))
