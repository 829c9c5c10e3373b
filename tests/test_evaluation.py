"""In-training evaluation (pixel-space FD proxy, FID plumbing) and the sample/checkpoint jobs, without Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from shortcut_ray import checkpoint
from shortcut_ray.config import apply_overrides
from shortcut_ray.evaluation import Evaluator
from shortcut_ray.presets import get_preset
from shortcut_ray.train_step import TrainState


def _cfg(**extra):
    sets = ["eval.fid_samples=600", "eval.fid_steps=1,4", "train.num_workers=1", *[f"{k}={v}" for k, v in extra.items()]]
    return apply_overrides(get_preset("debug_cpu"), sets)


def test_fd_pixel_separates_matching_from_shifted_samples():
    cfg = _cfg()
    ev = Evaluator(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ev.set_reference(torch.randn(600, 1, 16, 16, generator=g) * 0.5 + 0.2)
    # a "model" whose 1-step sample is exactly the noise scaled like the data; N=4 adds a shift
    good = lambda x, t, k, y: -0.5 * x + 0.2 if k[0] == 0 else torch.full_like(x, 0.0)
    metrics, report = ev.run(good, batch_size=128)
    # N=1 maps noise onto the data distribution; N=4 keeps pure noise, far from it (finite-sample bias
    # keeps FD(N1) above 0: 256-d features from 600 samples)
    assert metrics["fd_pixel/N1"] * 5 < metrics["fd_pixel/N4"], metrics
    assert report["samples"] == 600 and report["weights"] == "online" and set(report["per_N"]) == {"1", "4"}


def test_fid_path_is_zero_on_the_reference_and_the_analytic_value_when_shifted(tiny_fid_weights):
    cfg = _cfg(**{"eval.fid_weights": str(tiny_fid_weights), "eval.fid_samples": 100, "eval.fid_steps": "1"})
    ev = Evaluator(cfg, torch.device("cpu"))
    # The Evaluator's own fixed noise (rank 0), so a model can reproduce the reference exactly.
    noise = torch.randn((100, 1, 16, 16), generator=torch.Generator().manual_seed(cfg.eval.seed * 7_919))
    ev.set_reference(0.1 * noise)
    same, report = ev.run(lambda x, t, k, y: -0.9 * x, batch_size=100)  # N=1: x0 + v = 0.1 x0
    shift = 0.3  # every pixel +0.3: covariances unchanged, means move by the features of a constant image
    shifted, _ = ev.run(lambda x, t, k, y: -0.9 * x + shift, batch_size=100)
    assert report["inception"].startswith("tiny.pt") and set(same) == {"fd_pixel/N1", "fid/N1"}
    assert abs(same["fid/N1"]) < 1e-2 and abs(same["fd_pixel/N1"]) < 1e-2, same  # FD(X, X) = 0
    ones = torch.ones(1, 1, 16, 16)
    delta = (ev.inception(shift * ones) - ev.inception(0 * ones)).double()
    assert shifted["fid/N1"] == pytest.approx(float(delta.pow(2).sum()), rel=1e-3)  # ||mu1 - mu2||^2
    assert shifted["fd_pixel/N1"] == pytest.approx(256 * shift ** 2, rel=1e-3)  # 16x16 pooled pixels, +0.3 each


def test_checkpoint_dir_names_round_trip():
    assert checkpoint.dir_name(20) == "checkpoint_0000020" and checkpoint.step_of("checkpoint_0000020") == 20
    assert checkpoint.step_of("checkpoint_manager_snapshot.json") is None and checkpoint.step_of("x_1") is None


def test_sample_job_from_a_checkpoint(tmp_path):
    from jobs.sample import main

    cfg = _cfg()
    st = TrainState.create(cfg)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    st.step_on(x, y)
    ck = checkpoint.save_local_atomic(str(tmp_path / "checkpoint_0000001"), st.model, st.ema, st.optimizer,
                                      st.step, cfg)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic: no temp dir left
    assert json.load(open(os.path.join(ck, "state.json")))["step"] == 1
    out = tmp_path / "samples"
    assert main([ck, "--steps", "1,3,128", "--n", "9", "--out", str(out), "--weights", "ema"]) == 0
    assert sorted(os.listdir(out)) == ["N001.png", "N003.png", "N128.png"]
    model, _, meta = checkpoint.load_for_inference(ck, "ema")
    for a, b in zip(model.parameters(), st.ema.parameters()):
        assert torch.equal(a, b)
    from PIL import Image

    assert np.asarray(Image.open(out / "N001.png")).shape[-1] == 3
