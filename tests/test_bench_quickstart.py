"""bench/quickstart.py reads a run's phases from what the run prints: these lines come from the real
formatter (`progress.Progress.line`), so a change of the progress line's format fails here, not in a
20-minute benchmark."""

import pytest

from bench.quickstart import Phases, parse_arm, parse_metrics
from shortcut_ray.progress import Progress


def test_phases_from_the_real_progress_lines():
    p = Progress(total=1500, start_step=0, start_time=0.0)
    ph = Phases(t0=100.0)
    ph.feed("(TrainController pid=1) some Ray line", 110.0)
    for i, step in enumerate((100, 200, 1500)):
        p.update(step, now=10.0 * (i + 1))
        ph.feed("(RayTrainWorker pid=7) [shortcut-ray] " + p.line(step, loss=0.25, images_per_s=400.0, now=10.0 * (i + 1)),
                130.0 + 60.0 * i)
    ph.feed("(RayTrainWorker pid=7) [shortcut-ray] eval step 1500: eval/fd_pixel/N1 8.85, eval/fd_pixel/N128 2.92", 260.0)
    s = ph.summary(wall=200.0)  # ends at 300
    assert s["startup_s"] == pytest.approx(30.0)
    assert s["training_s"] == pytest.approx(120.0)
    assert s["tail_s"] == pytest.approx(50.0)
    assert (s["steps"], s["max_steps"]) == (1500, 1500)
    assert s["metrics"] == {"eval/fd_pixel/N1": 8.85, "eval/fd_pixel/N128": 2.92}


def test_a_run_without_progress_lines_reports_only_its_wall_time():
    assert Phases(t0=0.0).summary(wall=12.0) == {"wall_s": 12.0}


def test_arms_and_metrics_parse():
    assert parse_arm("t1=train.torch_threads=1,train.log_every=50") == ("t1", ["train.torch_threads=1", "train.log_every=50"])
    assert parse_arm("plain=") == ("plain", [])
    with pytest.raises(SystemExit, match="NAME=KEY=VALUE"):
        parse_arm("train.torch_threads")
    assert parse_metrics("eval/fid/N1 140.88, eval/fd_pixel/N1 6.36") == {"eval/fid/N1": 140.88, "eval/fd_pixel/N1": 6.36}
