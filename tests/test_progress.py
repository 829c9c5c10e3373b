"""The console's progress line and summary (shortcut_ray/progress.py, console.summary_lines): ETA maths."""

import math

import pytest

from shortcut_ray.console import summary_lines
from shortcut_ray.progress import Progress, format_duration, quality_table


def test_format_duration():
    assert format_duration(7.4) == "0:07"
    assert format_duration(245) == "4:05"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(float("nan")) == "?" and format_duration(-1) == "?" and format_duration(math.inf) == "?"


def test_eta_is_remaining_steps_over_rate():
    p = Progress(total=1000, start_time=0.0)
    assert p.eta() is None  # nothing measured yet
    p.update(100, now=50.0)  # 2 steps/s
    assert p.rate == pytest.approx(2.0)
    assert p.eta() == pytest.approx(900 / 2.0)
    assert p.eta(1000) == 0.0


def test_eta_smooths_one_slow_interval():
    p = Progress(total=1000, start_time=0.0, smoothing=0.3)
    p.update(100, now=50.0)  # 2 steps/s
    p.update(200, now=150.0)  # 1 step/s (a checkpoint, say)
    assert p.rate == pytest.approx(0.3 * 1.0 + 0.7 * 2.0)
    assert p.eta() == pytest.approx(800 / 1.7)


def test_resume_counts_only_new_steps():
    p = Progress(total=1000, start_step=600, start_time=10.0)
    p.update(700, now=60.0)  # 100 steps in 50 s, not 700
    assert p.rate == pytest.approx(2.0)
    assert p.elapsed(now=60.0) == pytest.approx(50.0)
    line = p.line(700, loss=0.25, images_per_s=128.0, now=60.0)
    assert line.startswith("step  700/1000 ( 70%)") and "loss 0.2500" in line and "128.0 img/s" in line
    assert "elapsed 0:50" in line and "ETA 2:30" in line


def test_progress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        Progress(total=0)
    with pytest.raises(ValueError, match="smoothing"):
        Progress(total=10, smoothing=0)


def test_quality_table_and_summary():
    metrics = {"eval/fd_pixel/N1": 40.0, "eval/fd_pixel/N128": 12.5, "eval/fid/N1": 80.0, "step": 600}
    rows = quality_table(metrics)
    assert rows[0].split() == ["N", "fd_pixel", "fid"]
    assert rows[1].split() == ["1", "40.00", "80.00"] and rows[2].split() == ["128", "12.50", "-"]
    text = "\n".join(summary_lines("r", "/runs/r/checkpoint_0000600", metrics, "sqlite:////x/mlflow.db", "models:/m/1"))
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in text and "/runs/r/checkpoint_0000600" in text
    assert "models:/m/1" in text and "40.00" in text
