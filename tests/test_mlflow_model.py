"""The generator as an MLflow pyfunc model in the Model Registry, the dataset input, the logged figures
(issue 14), against a real local sqlite-backed MLflow store (no server, no Ray)."""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from shortcut_ray import generator
from shortcut_ray.config import TrackingConfig
from shortcut_ray.model import build_model as _build_model
from shortcut_ray.presets import get_preset
from shortcut_ray.tracking import create_tracker


def build_model(cfg):
    return _build_model(cfg, uses_step_level=True)


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts of a sqlite store under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = create_tracker(TrackingConfig(tracking_uri=uri, experiment="test-ux"), rank=0)
    t.start("unit", {"preset": "debug_cpu"})
    yield t
    t.end("FINISHED")


def test_registered_pyfunc_generates_images(tracker, tmp_path):
    import mlflow

    cfg = get_preset("debug_cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a fresh DiT predicts 0 (zero-init output layer): make N matter
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    weights, config = generator.save(model.state_dict(), cfg, str(tmp_path))
    uri = tracker.log_generator(weights, config, cfg, "shortcut-ray-test")
    assert uri == "models:/shortcut-ray-test/1"
    mlflow.set_tracking_uri(tracker.tracking_uri)
    loaded = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"label": [3, 3, 7], "steps": [1, 4, 4], "cfg_scale": [1.0, 1.0, 1.0], "seed": [5, 5, 5]})
    images = loaded.predict(frame)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    direct = generator.Generator(model, cfg).generate([3, 3, 7], [1, 4, 4], [1.0] * 3, [5, 5, 5])
    np.testing.assert_array_equal(images, direct)  # the registry's weights are the trained ones
    assert not np.array_equal(images[0], images[1])  # N=1 vs N=4 from the same noise differ
    # no pickled model class: the model directory holds code, safetensors weights and the config only
    local = mlflow.artifacts.download_artifacts(uri)
    files = {os.path.relpath(os.path.join(r, f), local) for r, _, fs in os.walk(local) for f in fs}
    assert not any(f.endswith((".pkl", ".pickle", ".cloudpickle")) for f in files), files
    assert any(f.endswith("generator.safetensors") for f in files)
    run = mlflow.tracking.MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "RUNNING"  # logging the model does not end the training run


def test_register_a_logged_model_later(tracker, tmp_path):
    """A sweep's trials log without registering; the sweep registers the best one afterwards."""
    import mlflow

    cfg = get_preset("debug_cpu")
    weights, config = generator.save(build_model(cfg).state_dict(), cfg, str(tmp_path))
    logged = tracker.log_generator(weights, config, cfg, "")
    assert logged.startswith("models:/m-")
    assert tracker.register_model(logged, "shortcut-ray-best") == "models:/shortcut-ray-best/1"
    mlflow.set_tracking_uri(tracker.tracking_uri)
    out = mlflow.pyfunc.load_model("models:/shortcut-ray-best/1").predict(pd.DataFrame({"label": [1]}))
    assert out.shape == (1, 16, 16, 1)  # steps, cfg_scale and seed default to 1, eval.cfg_scale, row number


def test_dataset_input_recorded(tracker):
    from mlflow.tracking import MlflowClient

    manifest = {"rows": 1797, "kind": "pixels", "image_size": 16, "channels": 1, "num_classes": 10,
                "shards": [{"file": "a"}, {"file": "b"}]}
    tracker.log_dataset("/data/digits-16", manifest, "digits")
    inputs = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "digits" and "/data/digits-16" in ds.source and '"rows": 1797' in ds.profile
    assert '"shards": 2' in ds.profile and len(ds.digest) == 16


def test_dataset_input_survives_the_race_of_runs_that_start_together(tracker):
    """A sweep's trials log the same dataset at once; the server's check-then-insert lets one win and the
    others fail on the unique row ("UNIQUE constraint failed: datasets..."; seen in CI as a retried
    trial and a fifth MLflow child run). The losers retry and link the row the winner inserted; other
    errors are not retried."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from shortcut_ray.tracking import log_dataset_input

    real = MlflowClient(tracker.tracking_uri)
    other = real.create_run(real.get_run(tracker.run_id).info.experiment_id).info.run_id
    manifest = {"rows": 10, "kind": "pixels", "image_size": 16, "channels": 1, "num_classes": 10}

    class LosesTheRaceOnce:  # the real store; its first call loses the race to `other`, as on the server
        calls = 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                log_dataset_input(real, other, "/data/d", manifest, "d")  # the winner inserts the row
                raise MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: "
                                      "datasets.experiment_id, datasets.name, datasets.digest")
            real.log_inputs(run_id, datasets=datasets)

    client = LosesTheRaceOnce()
    log_dataset_input(client, tracker.run_id, "/data/d", manifest, "d")
    assert client.calls == 2
    mine, theirs = (real.get_run(r).inputs.dataset_inputs for r in (tracker.run_id, other))
    assert [i.dataset.digest for i in mine] == [i.dataset.digest for i in theirs] and len(mine) == 1

    class Down:
        calls = 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            raise MlflowException("connection refused")

    down = Down()
    with pytest.raises(MlflowException, match="connection refused"):
        log_dataset_input(down, tracker.run_id, "/data/d", manifest, "d")
    assert down.calls == 1  # not a race: no retry
