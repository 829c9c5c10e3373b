"""Experiment tracking: a small Tracker interface, an MLflow implementation (rank 0) and a null one.

The only module that imports mlflow. Runs are created with a readable name and tags (preset, train
type, model size, dataset) so they are easy to browse and compare; a resumed run keeps logging into
the same MLflow run (its id is stored in every checkpoint's state.json).
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from typing import Protocol

import numpy as np

from .config import TrackingConfig


class Tracker(Protocol):
    run_id: str | None

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str | None: ...
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...
    def log_dataset(self, uri: str, manifest: dict, name: str) -> None: ...
    def start_system_metrics(self) -> None: ...
    def log_generator(self, weights: str, config: str, cfg, registered_name: str) -> str: ...


class NullTracker:
    """Used on ranks other than 0 and when tracking is disabled."""

    run_id = None

    def start(self, run_name, tags, run_id=None):
        return None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_image(self, image, artifact_file):
        pass

    def log_dict(self, data, artifact_file):
        pass

    def set_tags(self, tags):
        pass

    def end(self, status="FINISHED"):
        pass

    def log_dataset(self, uri, manifest, name):
        pass

    def start_system_metrics(self):
        pass

    def log_generator(self, weights, config, cfg, registered_name):
        return ""


def resolve_tracking_uri(cfg: TrackingConfig, cwd: str | None = None) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a local sqlite store (absolute, so Ray workers agree)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(cwd or os.getcwd(), 'mlflow.db'))}"


# MLflow 3's UI shows an experiment without this tag in its GenAI view ("Evaluation runs"); screenshot check
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
def artifact_root(tracking_uri: str) -> str | None:
    """Durable artifact folder for a local sqlite store: `mlartifacts` beside the database file (what
    `mlflow server` uses by default). None: the store or server decides."""
    if tracking_uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(tracking_uri.removeprefix("sqlite:///")), "mlartifacts")
    return None


def is_temporary(location: str) -> bool:
    """An artifact location inside a Ray session's temporary directory (gone with Ray's temp files)."""
    return bool(re.search(r"/ray/session_[^/]+/", location or ""))


def _quiet_mlflow() -> None:
    """MLflow's INFO lines off (after its import, which sets its logger to INFO)."""
    import logging

    import mlflow  # noqa: F401 - configures the "mlflow" logger, which is then turned down

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def ensure_experiment(cfg: TrackingConfig, log=print) -> str:
    """Create the experiment on the driver, with a durable artifact location for a local store (created
    inside a Ray worker, its artifacts went to the worker's temporary working directory); report an
    existing experiment whose artifacts go to a temporary directory. Returns its id."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # "Creating initial MLflow database tables..." when a new local store is made
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        root = artifact_root(cfg.tracking_uri)
        where = os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.experiment)) if root else None
        return client.create_experiment(cfg.experiment, artifact_location=where)
    if is_temporary(exp.artifact_location):
        log(f"[shortcut-ray] warning: MLflow experiment {cfg.experiment!r} stores its artifacts in a temporary "
            f"directory ({exp.artifact_location}) that disappears with Ray's temp files; use a new experiment "
            f"(--set tracking.experiment=NAME), which gets a durable folder beside the store")
    return exp.experiment_id


def _warn(message: str) -> None:
    sys.stderr.write(f"[shortcut-ray] warning: {message}\n")
    sys.stderr.flush()


class MlflowTracker:
    """MLflow through an explicit MlflowClient (no global active-run state inside Ray workers).

    Trouble with the server after the start never stops training: a failed call warns (once per
    outage), metrics are kept (up to MAX_PENDING) and sent with the next call that succeeds, images
    and dicts of the outage are dropped. During an outage the server is tried again at most every
    retry_after_s, so a dead server stalls a step for one HTTP timeout at most that often; HTTP
    retries are capped (MLflow's default retries a dead server for ~4 minutes per call)."""

    MAX_PENDING = 100_000
    retry_after_s = 60.0

    def __init__(self, tracking_uri: str, experiment: str):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = ensure_experiment(TrackingConfig(tracking_uri=tracking_uri, experiment=experiment),
                                               log=_warn)
        exp = self.client.get_experiment(self.experiment_id)
        if EXPERIMENT_KIND[0] not in exp.tags:  # the UI opens it in its "Model training" view
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self.run_id: str | None = None
        self._pending: list = []
        self._failing = False
        self._failed_at = 0.0
        self._logged_through = -1
        self._held: dict[str, int] = {}  # metric key -> last step MLflow holds (looked up for redone steps)

    def _try(self, what: str, fn, *args) -> bool:
        import time

        if self._failing and time.monotonic() - self._failed_at < self.retry_after_s:
            return False  # in an outage: do not stall training on every call
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking trouble must not stop training
            if not self._failing:
                _warn(f"MLflow {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      f"training continues, metrics are kept and sent when {self.tracking_uri} answers again")
            self._failing, self._failed_at = True, time.monotonic()
            return False
        if self._failing:
            _warn(f"MLflow at {self.tracking_uri} answers again")
        self._failing = False
        return True

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self._skip_through_logged_steps()
                return run_id
            except Exception:  # the store was wiped or moved: start a fresh run, say why in a tag
                tags = {**tags, "resumed_from_missing_run": run_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def _skip_through_logged_steps(self) -> None:
        """A resumed run redoes the steps after its last checkpoint: metrics of steps MLflow already holds
        are not logged twice (the redo draws the same noise, ALGORITHM §3); a tag says which were skipped."""
        hist = self.client.get_metric_history(self.run_id, "train/loss")
        self._logged_through = max((m.step for m in hist), default=-1)
        if self._logged_through >= 0:
            self.client.set_tag(self.run_id, "metrics.not_relogged_through_step", str(self._logged_through))

    def _already_logged(self, key: str, step: int) -> bool:
        """True when MLflow already holds `key` at `step` or later: only those are skipped, so metrics new
        to the run (an evaluation of the final checkpoint at its step) are still logged."""
        if key not in self._held:
            try:
                self._held[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            except Exception:  # noqa: BLE001 - tracking trouble must not stop training; log it then
                return False
        return step <= self._held[key]

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; a resume re-logs them
        for i in range(0, len(items), 100):
            self._try("log_params", lambda chunk: self.client.log_batch(self.run_id, params=chunk), items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        if step <= self._logged_through:  # a redone step after a restore (see _skip_through_logged_steps)
            metrics = {k: v for k, v in metrics.items() if not self._already_logged(k, step)}
        self._pending += [Metric(k, float(v), ts, step) for k, v in metrics.items() if np.isfinite(float(v))]
        self._pending = self._pending[-self.MAX_PENDING:]
        while self._pending:
            if not self._try("log_metrics", lambda chunk: self.client.log_batch(self.run_id, metrics=chunk),
                             self._pending[:500]):
                return
            del self._pending[:500]

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._try("log_image", lambda: self.client.log_image(self.run_id, image, artifact_file=artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._try("log_dict", lambda: self.client.log_dict(self.run_id, data, artifact_file))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            if not self._try("set_tag", self.client.set_tag, self.run_id, k, str(v)):
                return

    def end(self, status: str = "FINISHED") -> None:
        if getattr(self, "_system_monitor", None) is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        if self.run_id:
            self.log_metrics({}, 0)  # last chance for metrics kept during an outage
            self._try("set_terminated", lambda: self.client.set_terminated(self.run_id, status=status))


    # -- issue 14: dataset input, system metrics, the generator as a registered pyfunc model -------------
    def log_dataset(self, uri: str, manifest: dict, name: str) -> None:
        """The training data as a run input (source URI, manifest digest, counts) in the run's Datasets."""
        log_dataset_input(self.client, self.run_id, uri, manifest, name)

    def start_system_metrics(self) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU when
        nvidia-ml-py is installed), sampled every 10 s from this node in a background thread."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri, resume_logging=True)
        self._system_monitor.start()

    def register_model(self, model_uri: str, name: str) -> str:
        """Register an already logged model (a sweep's best trial); returns models:/NAME/VERSION."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        version = mlflow.register_model(model_uri, name)
        return f"models:/{name}/{version.version}"

    def log_generator(self, weights: str, config: str, cfg, registered_name: str) -> str:
        """Log the generator as a pyfunc model of this run (and register it); returns its model URI."""
        return log_generator_model(self.tracking_uri, self.run_id, weights, config, cfg, registered_name)


def log_dataset_input(client, run_id: str, uri: str, manifest: dict, name: str) -> None:
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    profile = {k: manifest.get(k) for k in ("rows", "num_rows", "kind", "image_size", "channels", "num_classes",
                                            "skipped", "source") if manifest.get(k) is not None}
    profile["shards"] = len(manifest.get("shards", []))
    schema = {"image": manifest.get("kind", "pixels"), "label": "int64"}
    ds = Dataset(name=name, digest=digest, source_type="local" if "://" not in uri else uri.split("://")[0],
                 source=json.dumps({"uri": uri}), schema=json.dumps(schema), profile=json.dumps(profile, default=str))
    inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])]
    for attempt in range(DATASET_RETRIES + 1):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as e:  # noqa: BLE001 - MlflowException (RestException over HTTP)
            # Runs that start together (a sweep's trials, compare --parallel) log the same dataset: the
            # server's check-then-insert races and all but one fail on the unique row; the retry then
            # finds the row and links it.
            if attempt == DATASET_RETRIES or not any(m in str(e) for m in ("UNIQUE constraint", "IntegrityError")):
                raise
            time.sleep(0.2 * (attempt + 1))


DATASET_RETRIES = 3


# The pyfunc model is "models from code": MLflow stores this file, not a pickled class, and runs it on
# load; the network is rebuilt from config.json and the weights read from generator.safetensors.
PYFUNC_CODE = """\
import mlflow

from shortcut_ray.tracking import pyfunc_model

mlflow.models.set_model(pyfunc_model())
"""


def pyfunc_model():
    """The PythonModel MLflow loads (defined here so that importing tracking.py does not import mlflow)."""
    import mlflow.pyfunc

    from .generator import Generator

    class ShortcutGenerator(mlflow.pyfunc.PythonModel):
        """Input: a table with label, steps, cfg_scale, seed (one image per row); output: (B, H, W, C) uint8."""

        def load_context(self, context):
            self.generator = Generator.from_files(context.artifacts["weights"], context.artifacts["config"])

        def predict(self, context, model_input, params=None):
            return self.generator.predict_frame(model_input)

    return ShortcutGenerator()


def log_generator_model(tracking_uri: str, run_id: str, weights: str, config: str, cfg, registered_name: str) -> str:
    """Log (and register, when registered_name) the pyfunc generator of run `run_id`; returns a model URI."""
    import contextlib
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    d = cfg.data
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "label"), ColSpec("long", "steps", required=False),
                       ColSpec("double", "cfg_scale", required=False), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, d.image_size, d.image_size, 3 if d.kind == "latents"
                                                        else d.channels))]))
    example = pd.DataFrame({"label": [0, 1], "steps": [1, 4], "cfg_scale": [1.0, 1.0], "seed": [0, 0]})
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="shortcut-pyfunc-") as tmp:
        code = os.path.join(tmp, "shortcut_ray_generator.py")
        with open(code, "w") as f:
            f.write(PYFUNC_CODE)
        import torch

        # MLflow prints "Successfully registered model ..." and download bars to stderr; the caller says
        # what was logged in one line. Exceptions still propagate.
        with mlflow.start_run(run_id=run_id), contextlib.redirect_stderr(io.StringIO()):
            info = mlflow.pyfunc.log_model(
                name="generator", python_model=code, artifacts={"weights": weights, "config": config},
                signature=signature, input_example=example, registered_model_name=registered_name or None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "pandas",
                                  "shortcut-ray"])
        MlflowClientFor(tracking_uri).update_run(run_id, status="RUNNING")  # start_run's exit marked it FINISHED
    if registered_name and info.registered_model_version:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return info.model_uri


def MlflowClientFor(tracking_uri: str):  # noqa: N802 - reads like the class it returns
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def log_metrics_to_run(tracking_uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Metrics into an existing run from outside it (jobs.compare writes each method's numbers to its run)."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    MlflowClientFor(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def close_interrupted(cfg: TrackingConfig, ray_run_name: str, status: str = "KILLED", reason: str = "") -> int:
    """Driver side: end the RUNNING MLflow runs of `ray_run_name` (its workers were killed with the
    driver and could not) with `status`; returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], f"tags.ray_run_name = '{ray_run_name}' and "
                                                   f"attributes.status = 'RUNNING'")
    for r in runs:
        if reason:
            client.set_tag(r.info.run_id, "failure_reason", reason)
        client.set_terminated(r.info.run_id, status=status)
    return len(runs)


def create_tracker(cfg: TrackingConfig, rank: int) -> Tracker:
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(cfg), cfg.experiment)
