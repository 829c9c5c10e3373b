"""Shared test fixtures: small CPU tensors and fake velocity models with known outputs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


class Recorder:
    """Wraps a velocity function f(x, t, k, y) and records every call's arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict] = []

    def __call__(self, x, t, k, y):
        self.calls.append(dict(x=x.clone(), t=t.clone(), k=k.clone(), y=y.clone()))
        return self.fn(x, t, k, y)


@pytest.fixture
def recorder():
    return Recorder


class TinyFidNet(torch.nn.Module):
    """Stands in for InceptionV3 in FID tests: (B, 3, 299, 299) -> (B, 2048), linear in the image."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 32).flatten(1)[:, :2048]


@pytest.fixture
def tiny_fid_weights(tmp_path):
    """A TorchScript TinyFidNet file, usable as eval.fid_weights."""
    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyFidNet()).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_comparison(tmp_path_factory):
    """`jobs.compare --preset compare_digits_tiny --tune --parallel`, run once per session on its own local
    Ray (shut down afterwards): test_compare checks the protocol's outputs, test_methods samples every
    method's final checkpoint through the jobs. Half a CPU per worker: two runs at a time on 2 CPUs."""
    import ray

    from jobs.compare import main

    root = tmp_path_factory.mktemp("compare")
    out = root / "cmp"
    argv = ["--preset", "compare_digits_tiny", "--output", str(out),
            "--set", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "--set", "train.cpus_per_worker=0.5"]
    cwd = os.getcwd()
    os.chdir(root)  # MLflow's default artifact root (./mlruns) lands beside the comparison
    try:
        rc = main(argv + ["--tune", "--parallel"])
    finally:
        ray.shutdown()
        os.chdir(cwd)
    return {"rc": rc, "root": root, "out": out, "argv": argv, "tracking": f"sqlite:///{root / 'mlflow.db'}"}
