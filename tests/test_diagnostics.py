"""Eval-time diagnostics (ALGORITHM §5) and the figures logged to MLflow: facts with fake models."""

import numpy as np
import torch

from shortcut_ray.config import ObjectiveConfig
from shortcut_ray.diagnostics import loss_heatmap, reconstructions
from shortcut_ray.figures import heatmap, labelled_grid, quality_chart
from shortcut_ray.objectives import build_objective
from shortcut_ray.objectives.base import Networks


def _objective(train_type="shortcut"):
    return build_objective(ObjectiveConfig(train_type=train_type, denoise_timesteps=8, bootstrap_every=2),
                           num_classes=10, global_batch=12)


def test_heatmap_with_a_zero_model():
    """A model that predicts 0: every bootstrap target (two zero half-steps) is 0, so rows k < L are 0;
    the flow row is the mean square of the flow target x1 - (1-eps) x0, the same for every t."""
    obj = _objective()
    zero = lambda x, t, k, y: torch.zeros_like(x)  # noqa: E731
    x1, y = torch.full((6, 1, 4, 4), 0.5), torch.arange(6)
    values, t = loss_heatmap(obj, Networks(online=zero, ema=zero), x1, y, num_levels=3, t_bins=4, seed=1)
    assert values.shape == (4, 4) and t.tolist() == [0, 0.25, 0.5, 0.75]
    assert torch.all(values[:3] == 0)
    assert torch.all((values[3] > 0.5) & (values[3] < 2.5))  # E[(0.5 - x0)^2] = 1.25 up to sampling


def test_heatmap_flow_matching_has_only_the_flow_row():
    obj = _objective("flow_matching")
    zero = lambda x, t, k, y: torch.zeros_like(x)  # noqa: E731
    values, _ = loss_heatmap(obj, Networks(online=zero, ema=zero), torch.zeros(6, 1, 4, 4), torch.arange(6),
                             num_levels=3, t_bins=2)
    assert torch.isnan(values[:3]).all() and torch.isfinite(values[3]).all()


def test_reconstructions_follow_x_t_plus_one_minus_t_times_v():
    """With the ideal one-step model f = (x1 - x_t) / (1 - t) every reconstruction is x1 exactly."""
    obj = _objective()
    x1 = torch.randn(6, 1, 4, 4)
    ideal = lambda x, t, k, y: (x1 - x) / (1 - t).view(-1, 1, 1, 1)  # noqa: E731
    images, labels = reconstructions(obj, ideal, Networks(online=ideal, ema=ideal), x1, torch.arange(6), num_levels=3)
    assert labels[0] == "real x1" and labels[1] == "flow t=0/8" and labels[-1] == "k=2 t=1-1/4"
    assert len(labels) == 1 + 8 + 3 and images.shape == (len(labels) * 6, 1, 4, 4)
    torch.testing.assert_close(images, x1.repeat(len(labels), 1, 1, 1), atol=1e-5, rtol=0)


def test_labelled_grid_upscales_and_labels():
    images = np.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(6, 1, 16, 16)
    grid = labelled_grid(images, 3, ["class 0", "class 1"], min_px=64, title="N=1")
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 3 * 64  # each 16-px image is now 64 px
    left = grid[:, :30]
    assert (left < 128).any()  # the row labels drew dark text in the label column


def test_charts_render():
    chart = quality_chart({"fd_pixel": {1: 40.0, 2: 30.0, 128: 10.0}}, "digits")
    hm = heatmap(np.random.rand(4, 8), np.arange(8) / 8, "loss")
    assert chart.ndim == 3 and chart.shape[0] > 100 and hm.ndim == 3 and hm.shape[1] > 100
