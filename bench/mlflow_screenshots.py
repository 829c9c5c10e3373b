r"""What a user sees in the MLflow UI: start `mlflow ui` on 127.0.0.1 over a tracking store, open pages of
a run in headless Chromium (Debian's `chromium`), save screenshots. A check by eye, not a CI test.

    apt-get install -y chromium
    python bench/mlflow_screenshots.py --store sqlite:///$PWD/mlflow.db --out bench/results/screenshots
    python bench/mlflow_screenshots.py --store sqlite:///$PWD/mlflow.db --run RUN_ID --artifact samples/step_0001500/all_N.png

Pages: the experiment's run list, the run overview, its model metrics, its artifacts (one artifact
selected), the registered model. The UI is a single-page app: each page gets --virtual-time-budget to
render before the screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: str, port: int, log: str) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([exe, "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                return proc
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"mlflow ui did not start; see {log}")


def screenshot(chrome: str, url: str, path: str, size: str, budget_ms: int) -> None:
    profile = tempfile.mkdtemp(prefix="chrome-profile-")
    try:
        subprocess.run([chrome, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{path}  <-  {url}")


def latest_run(store: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {store}; train first (python -m jobs.train --preset digits)")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"experiment {experiment!r} has no runs")
    return exp.experiment_id, runs[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=f"sqlite:///{os.path.abspath('mlflow.db')}", help="backend store URI")
    p.add_argument("--experiment", default="shortcut-ray")
    p.add_argument("--run", default="", help="run id (default: the experiment's latest run)")
    p.add_argument("--artifact", default="", help="artifact path to open (default: the last all_N.png grid)")
    p.add_argument("--out", default="bench/results/screenshots")
    p.add_argument("--size", default="1600,1000", help="window size W,H")
    p.add_argument("--budget-ms", type=int, default=15000, help="virtual time for the page to render")
    args = p.parse_args(argv)
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chrome:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    exp_id, run = latest_run(args.store, args.experiment)
    run_id = args.run or run.info.run_id
    artifact = args.artifact
    if not artifact:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(args.store)
        steps = sorted(a.path for a in client.list_artifacts(run_id, "samples") if a.is_dir)
        artifact = f"{steps[-1]}/all_N.png" if steps else ""
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    proc = start_ui(args.store, port, os.path.join(args.out, "mlflow_ui.log"))
    base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
    pages = {"runs": f"{base}/runs", "run": f"{base}/runs/{run_id}",
             "metrics": f"{base}/runs/{run_id}/model-metrics",
             "artifact": f"{base}/runs/{run_id}/artifacts/{artifact}" if artifact else f"{base}/runs/{run_id}/artifacts",
             "models": f"http://127.0.0.1:{port}/#/models"}
    try:
        for name, url in pages.items():
            screenshot(chrome, url, os.path.abspath(os.path.join(args.out, f"{name}.png")), args.size, args.budget_ms)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
