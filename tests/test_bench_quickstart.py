"""bench/quickstart.py reads a run's phases from what the run prints: the lines here are built by the
real formatters (`progress.PREFIX`, `Progress.line`, `progress.eval_line`, which the worker prints),
so a change of either line's format fails here, not in a 20-minute benchmark."""

import pytest

from bench.quickstart import Phases, check_run, parse_arm, parse_arms, parse_metrics, summarise
from shortcut_ray.progress import PREFIX, Progress, eval_line


def test_phases_from_the_real_progress_lines():
    p = Progress(total=1500, start_step=0, start_time=0.0)
    ph = Phases(t0=100.0)
    ph.feed("(TrainController pid=1) some Ray line", 110.0)
    for i, step in enumerate((100, 200, 1500)):
        p.update(step, now=10.0 * (i + 1))
        ph.feed("(RayTrainWorker pid=7) " + PREFIX + p.line(step, loss=0.25, images_per_s=400.0, now=10.0 * (i + 1)),
                130.0 + 60.0 * i)
    metrics = {"eval/fd_pixel/N1": 8.854, "eval/fd_pixel/N128": 2.92}
    ph.feed("(RayTrainWorker pid=7) " + PREFIX + eval_line(1500, metrics), 260.0)
    s = ph.summary(wall=200.0)  # ends at 300
    assert s["startup_s"] == pytest.approx(30.0)
    assert s["training_s"] == pytest.approx(120.0)
    assert s["tail_s"] == pytest.approx(50.0)
    assert (s["steps"], s["max_steps"]) == (1500, 1500)
    assert s["metrics"] == {"eval/fd_pixel/N1": 8.85, "eval/fd_pixel/N128": 2.92}  # as printed: 2 decimals


def test_a_run_without_progress_lines_reports_only_its_wall_time():
    assert Phases(t0=0.0).summary(wall=12.0) == {"wall_s": 12.0}


def test_arms_and_metrics_parse():
    assert parse_arm("t1=train.torch_threads=1,train.log_every=50") == ("t1", ["train.torch_threads=1", "train.log_every=50"])
    assert parse_arm("e=eval.fid_steps=1,2,4,train.log_every=50") == ("e", ["eval.fid_steps=1,2,4", "train.log_every=50"])
    assert parse_arm("plain=") == ("plain", [])
    with pytest.raises(SystemExit, match="NAME=KEY=VALUE"):
        parse_arm("train.torch_threads")
    with pytest.raises(SystemExit, match="given twice"):
        parse_arms(["a=train.torch_threads=1", "a=train.torch_threads=2"])
    assert parse_metrics("eval/fid/N1 140.88, eval/fd_pixel/N1 6.36") == {"eval/fid/N1": 140.88, "eval/fd_pixel/N1": 6.36}


@pytest.mark.parametrize("run, why", [
    ({"returncode": 1, "wall_s": 5.0}, "failed with exit code 1"),
    ({"returncode": -9, "wall_s": 61.0}, "stopped at --timeout 60"),
    ({"returncode": 0, "wall_s": 61.0, "steps": 1500, "max_steps": 1500}, "stopped at --timeout 60"),
    ({"returncode": 0, "wall_s": 5.0}, "printed no progress line"),
    ({"returncode": 0, "wall_s": 5.0, "steps": 1400, "max_steps": 1500}, "stopped at step 1400 of 1500"),
])
def test_a_run_that_is_not_a_whole_quickstart_stops_the_benchmark(run, why):
    with pytest.raises(SystemExit, match=why) as e:
        check_run(run, "python -m jobs.train", ["first\n", "last line\n"], timeout_s=60.0)
    assert "last line" in str(e.value)
    check_run({"returncode": 0, "wall_s": 5.0, "steps": 1500, "max_steps": 1500}, "cmd", [], 60.0)


def test_medians_per_arm_and_the_ratio():
    runs = [{"arm": "a", "wall_s": w, "training_s": w - 10} for w in (10.0, 30.0, 20.0)]
    runs += [{"arm": "b", "wall_s": w, "training_s": w - 10} for w in (40.0, 44.0)]
    out = summarise("digits", ["a", "b", "a", "b", "a"], {"a": [], "b": ["train.torch_threads=1"]}, runs)
    assert out["arms"]["a"] == {"sets": [], "runs": 3, "median_wall_s": 20.0, "median_training_s": 10.0}
    assert out["arms"]["b"]["median_wall_s"] == 42.0
    assert out["ratio_wall_b_over_a"] == pytest.approx(2.1)
