"""The 2-D toy of ALGORITHM §9.2 (bench/toy2d.py) at a tiny budget: both objectives trained for real."""

from __future__ import annotations

import math

import pytest
import torch

from bench import toy2d

METRICS = {"on_mode", "sw1", "mode_balance", "mean_abs"}


def test_data_and_model_shapes():
    x = toy2d.make_data(512, torch.Generator().manual_seed(0))
    assert x.shape == (512, 2, 1, 1)
    r = x.view(512, 2).norm(dim=1)
    assert (r - 2.0).abs().max() < 1.0  # on the radius-2 circle, std 0.1
    m = toy2d.MLPVelocity(width=32)
    t, k, y = torch.rand(512), torch.randint(0, 8, (512,)), torch.ones(512, dtype=torch.long)
    out = m(x, t, k, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer
    # ignore_k: k is replaced by zeros, so the output does not depend on k
    torch.nn.init.normal_(m.out[1].weight)
    m.ignore_k = True
    assert torch.equal(m(x, t, k, y), m(x, t, torch.zeros_like(k), y))
    m.ignore_k = False
    assert not torch.equal(m(x, t, k, y), m(x, t, torch.zeros_like(k), y))


def test_metrics_on_data_and_noise():
    ref = toy2d._points(toy2d.make_data(4096, torch.Generator().manual_seed(1)))
    data = toy2d._points(toy2d.make_data(4096, torch.Generator().manual_seed(2)))
    good = toy2d.point_metrics(data, ref)
    assert good["on_mode"] > 0.97 and good["sw1"] < 0.05 and good["mode_balance"] > 0.8
    assert abs(good["mean_abs"] - 2.0) < 0.05
    collapsed = toy2d.point_metrics(torch.zeros(4096, 2), ref)
    assert collapsed["on_mode"] == 0.0 and collapsed["mode_balance"] == 0.0 and collapsed["mean_abs"] == 0.0
    assert collapsed["sw1"] > 1.0


@pytest.fixture(scope="module")
def trained():
    """Both objectives at a tiny budget (300 steps of 256 points, ~10 s each on one thread), one noise batch."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from more; OpenMP spin-waits hurt on a busy CPU
    try:
        noise = torch.randn(1024, 2, 1, 1, generator=torch.Generator().manual_seed(5))
        out = {}
        for train_type in ("shortcut", "flow_matching"):
            model, hist = toy2d.train(train_type, steps=300, ema_decay=0.9, seed=0, batch=256, width=64)
            out[train_type] = model, hist, toy2d.evaluate(model, noise=noise, step_counts=(1, 128))
        out["untrained"] = toy2d.evaluate(toy2d.MLPVelocity(width=64), noise=noise, step_counts=(128,))
        return out
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("train_type", ["shortcut", "flow_matching"])
def test_short_training_run(trained, train_type):
    model, hist, ev = trained[train_type]
    loss = hist["loss"]
    assert len(loss) == 300 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-40:]) / 40 < 0.9 * sum(loss[:40]) / 40
    if train_type == "shortcut":
        assert len(hist["loss_bootstrap"]) == 300 and all(math.isfinite(v) for v in hist["loss_bootstrap"])
    else:
        assert "loss_bootstrap" not in hist
        assert model.ignore_k
    assert set(ev["per_n"]) == {"1", "128"} and ev["samples"][128].shape == (1024, 2)
    for m in ev["per_n"].values():
        assert set(m) == METRICS and all(math.isfinite(v) for v in m.values())
    untrained = trained["untrained"]["per_n"]["128"]
    assert ev["per_n"]["128"]["on_mode"] > untrained["on_mode"] + 0.05
    assert ev["per_n"]["128"]["sw1"] < untrained["sw1"]
    assert math.isfinite(ev["same_noise_gap"]) and math.isfinite(ev["self_consistency_residual"])


def test_one_step_samples_separate_the_objectives(trained):
    """ALGORITHM §9.2 in miniature: at N = 1 flow matching collapses onto the data mean (|x| ~ 0) while the
    shortcut model lands on the circle of modes; at N = 128 both are close to the data. A broken bootstrap
    target (e.g. one that degenerates to the flow target, or a wrong step level) fails the N = 1 checks."""
    sc, fm = trained["shortcut"][2], trained["flow_matching"][2]
    assert fm["per_n"]["1"]["mean_abs"] < 0.5 and sc["per_n"]["1"]["mean_abs"] > 1.5, (sc["per_n"], fm["per_n"])
    assert sc["per_n"]["1"]["sw1"] * 3 < fm["per_n"]["1"]["sw1"]
    assert sc["same_noise_gap"] * 2 < fm["same_noise_gap"]  # N=1 and N=128 agree sample by sample
    for ev in (sc, fm):
        assert ev["per_n"]["128"]["sw1"] < 0.3
