"""Experiment tracking: a small Tracker interface, an MLflow implementation (rank 0) and a null one.

The only module that imports mlflow. Runs are created with a readable name and tags (preset, train
type, model size, dataset) so they are easy to browse and compare; a resumed run keeps logging into
the same MLflow run (its id is stored in every checkpoint's state.json).
"""

from __future__ import annotations

import io
import os
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


def resolve_tracking_uri(cfg: TrackingConfig, cwd: str | None = None) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a local sqlite store (absolute, so Ray workers agree)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(cwd or os.getcwd(), 'mlflow.db'))}"


class MlflowTracker:
    """MLflow through an explicit MlflowClient (no global active-run state inside Ray workers)."""

    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except Exception:  # the store was wiped or moved: start a fresh run, say why in a tag
                tags = {**tags, "resumed_from_missing_run": run_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; a resume re-logs them
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if np.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def create_tracker(cfg: TrackingConfig, rank: int) -> Tracker:
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(cfg), cfg.experiment)


def image_grid(images: np.ndarray, ncol: int) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (rows*H, ncol*W, 3) uint8 with 1-px gutters."""
    x = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    b, c, h, w = x.shape
    nrow = -(-b // ncol)
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return grid


def png_bytes(grid: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()
