"""jobs.compare end to end on digits at a tiny budget (issue 13): every method of ALGORITHM §6.7 trains
through Ray Train, is evaluated identically, and lands in the table, the JSON, the plot and the strips;
a --resume after completion redoes nothing. Slow: eight short Ray Train runs and a two-trial sweep, two at a
time (--parallel, half a CPU per worker: 2 x 0.5 reserved + 1 CPU for Ray Data on the 2-CPU machine); the
run is conftest's session fixture `tiny_comparison`, whose checkpoints test_methods samples too."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_tiny_comparison_runs_every_method_and_resumes_as_a_no_op(tiny_comparison):
    import ray

    from jobs.compare import main
    from shortcut_ray.compare import METHODS

    out, argv = tiny_comparison["out"], tiny_comparison["argv"]
    assert tiny_comparison["rc"] == 0
    try:
        results = json.loads((out / "results.json").read_text())
        assert set(results["methods"]) == {m.name for m in METHODS} | {"shortcut_tuned"}
        tuned = results["tuned"]  # a 2-point grid at the same budget, selected on the in-loop metric
        assert tuned["metric"] == "eval/fd_pixel/N1" and len(tuned["trials"]) == 2
        assert tuned["won"]["objective.bootstrap_every"] in (4, 8)
        best = min(tuned["trials"], key=lambda t: t["eval/fd_pixel/N1"])
        assert best["params"]["objective.bootstrap_every"] == tuned["won"]["objective.bootstrap_every"]
        assert results["methods"]["shortcut_tuned"]["tuned"]["won"] == tuned["won"]
        assert f"bootstrap_every={tuned['won']['objective.bootstrap_every']}" in results["methods"]["shortcut_tuned"]["label"]
        for name, r in results["methods"].items():
            for n in (1, 2, 4, 8, 128):
                assert math.isfinite(r["metrics"][f"fd_pixel/N{n}"]), (name, n)
            assert r["report"]["samples"] == 64 and r["sampler"]["k_per_N"]
        assert results["floor"]["samples"] == 64 and math.isfinite(results["floor"]["fd_pixel"])
        assert "--count" in results["commands"]["pairs"] and "jobs.train" in results["commands"]["reflow"]
        done = json.loads((out / "state.json").read_text())["done"]  # --parallel: the runs from scratch overlapped
        spans = sorted((done[f"train:{m.name}"]["started"], done[f"train:{m.name}"]["at"])
                       for m in METHODS if not (m.teacher or m.pairs))
        assert len(spans) == 5 and any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
        table = (out / "results.md").read_text()
        assert "| real vs real (floor) |" in table and "Progressive distillation | 2-stage" in table
        assert "| Shortcut models, tuned (bootstrap_every=" in table
        for f in ("fd_vs_steps.png", "strips.png"):
            assert (out / f).stat().st_size > 1000
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        assert main(argv + ["--resume", "--tune"]) == 0  # all done: nothing is trained, evaluated or rewritten
        after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        assert after == before
    finally:
        ray.shutdown()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_comparison["tracking"])
    parent = client.get_run(results["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"results.md", "results.json", "fd_vs_steps.png", "strips.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(METHODS)


def test_reevaluate_with_fid_weights_adds_fid_to_every_method_without_training(tiny_comparison, tmp_path,
                                                                           tiny_fid_weights):
    """The committed table gained FID this way: the trained comparison re-evaluated with eval.fid_weights set.
    Run on a copy of the comparison (its Ray Train runs stay where they are, named by state.json)."""
    import shutil

    import ray

    from jobs.compare import main
    from shortcut_ray.compare import METHODS

    src = tiny_comparison["out"]
    out = tmp_path / "cmp"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("runs"))
    runs = {p: p.stat().st_mtime_ns for p in (src / "runs").rglob("*") if p.is_file()}
    old = json.loads((out / "results.json").read_text())
    argv = [*tiny_comparison["argv"][:2], "--output", str(out), *tiny_comparison["argv"][4:], "--resume"]
    assert "--output" not in argv[4:] and "--resume" in argv
    try:
        with pytest.raises(SystemExit) as refused:  # a resume takes the --set it was started with
            main(argv + ["--set", f"eval.fid_weights={tiny_fid_weights}"])
        assert refused.value.code == 2
        # N = 1 and 128 only: each FID is a 2048-d sqrtm (~2 s here); all five N took 122 s in CI
        assert main(argv + ["--set", f"eval.fid_weights={tiny_fid_weights}", "--set", "eval.fid_steps=1,128",
                            "--reevaluate"]) == 0
    finally:
        ray.shutdown()
    assert {p: p.stat().st_mtime_ns for p in (src / "runs").rglob("*") if p.is_file()} == runs  # nothing trained
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "fid" and set(results["methods"]) == set(old["methods"])
    for name, r in results["methods"].items():
        assert sorted(r["metrics"]) == ["fd_pixel/N1", "fd_pixel/N128", "fid/N1", "fid/N128"], name
        for n in (1, 128):
            assert math.isfinite(r["metrics"][f"fid/N{n}"]), (name, n)
            # the same checkpoints, noise and reference: the pixel FD is unchanged
            assert r["metrics"][f"fd_pixel/N{n}"] == pytest.approx(old["methods"][name]["metrics"][f"fd_pixel/N{n}"],
                                                                    rel=1e-4), (name, n)
        assert r["report"]["inception"].startswith("tiny.pt")
    assert math.isfinite(results["floor"]["fid"]) and len(results["methods"]) == len(METHODS) + 1
    [redo] = results["evaluations"]
    assert list(redo["changed"]) == ["fid_steps", "fid_weights"] and results["steps"] == [1, 128]
    assert json.loads((out / redo["superseded"] / "results.json").read_text()) == old
    table = (out / "results.md").read_text()
    assert table.count("| real vs real (floor) |") == 2 and "FID at N" in table and "Evaluated again" in table
