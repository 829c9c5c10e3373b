"""Keep Ray's console chatter out of the user's way; the end-of-run summary.

A first run printed 12,484 lines, 3,565 of them Ray Data progress bars redrawn into the log (issue 14).
What stays on: everything the project says (worker lines reach the driver through Ray's log forwarding,
so `log_to_driver` stays True), warnings and errors. What goes:
- Ray Data's progress bars and its per-epoch "Starting execution / Execution plan" lines
  (DataContext flags; `train.progress_bars=true` or `--progress` turns the bars back on);
- Ray Train's INFO lines (worker group started, every checkpoint "Reporting training result ...")
  via `RunConfig(logging_config=LoggingConfig("WARNING"))` (see `train_logging_config`);
- Ray's own INFO at `ray.init` and the token-auth notice of a fresh local cluster;
- Ray Data's INFO console logs and its "Progress bars disabled" warning, DeprecationWarnings and MLflow's INFO lines in the processes of a
  *local* cluster (environment variables inherited by the processes `ray.init` starts). A cluster joined
  through RAY_ADDRESS keeps its own settings (set them in its runtime_env).
"""

from __future__ import annotations

import logging
import os
import tempfile

from .progress import quality_table

_DATA_LOGGING_YAML = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
  ray.data._internal.progress: {level: DEBUG, handlers: [file], propagate: false}
"""


def quiet_environment(progress_bars: bool = False) -> dict[str, str]:
    """Environment for the processes of a local Ray cluster (set before `ray.init` starts it)."""
    env = {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning", "MLFLOW_LOGGING_LEVEL": "WARNING"}
    if not progress_bars:
        path = os.path.join(tempfile.gettempdir(), "shortcut-ray-data-logging.yaml")
        if not os.path.exists(path) or open(path).read() != _DATA_LOGGING_YAML:  # (an older version's file)
            from .storage import atomic_write

            atomic_write(path, _DATA_LOGGING_YAML.encode())
        env["RAY_DATA_LOGGING_CONFIG"] = path  # Ray Data's INFO lines go to its log file only
    return env


def configure_data_context(progress_bars: bool = False) -> None:
    """Ray Data's console output; a Dataset copies the current DataContext when it is created, so call
    this before building datasets (the SplitCoordinator that runs them inherits the flags)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars
    ctx.use_ray_tqdm = progress_bars
    ctx.print_on_execution_start = progress_bars


def init_ray_quietly(num_cpus: int | None = None, progress_bars: bool = False, address: str | None = None) -> None:
    """`ray.init` without the INFO chatter; a local cluster's processes get `quiet_environment`."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # "token auth is enabled" notice
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    for k, v in quiet_environment(progress_bars).items():
        os.environ.setdefault(k, v)
    # A dashboard on a free port, named to Train's PlacementGroupCleaner; otherwise it scans the machine
    # for Ray instances and prints a traceback when another Ray runs there (as tune.init_local_ray does).
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING, include_dashboard=True,
             dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_logging_config():
    """Ray Train's console level: warnings and errors only (its INFO lines repeat every checkpoint)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def summary_lines(run_name: str, checkpoint: str | None, metrics: dict, tracking_uri: str,
                  model: str = "") -> list[str]:
    """The end-of-run summary the driver prints: checkpoint, quality table, registered model, how to browse."""
    out = [f"run {run_name} finished at step {metrics.get('step', '?')}",
           f"  checkpoint: {checkpoint or '(none)'}"]
    table = quality_table({k: v for k, v in metrics.items() if k.startswith("eval/")})
    if table:
        out.append("  sample quality, Frechet distance to the data at N sampling steps (lower is better):")
        out += ["    " + row for row in table]
    if model:
        out.append(f"  model: {model}  (mlflow.pyfunc.load_model('{model}'))")
    out.append(f"  browse: mlflow ui --backend-store-uri {tracking_uri}   # then open http://127.0.0.1:5000")
    if checkpoint:
        out.append(f"  sample: python -m jobs.sample {checkpoint} --steps 1,2,4,128 --out samples/")
    return out
