"""jobs.compare's resume rules and report, without Ray (issue 13): a comparison resumed with other eval.*
settings keeps every trained method and redoes only the evaluation (the previous one moved aside, not
lost); any other change is refused before anything moves; the methods share one reference evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shortcut_ray.compare import _start, mark_done, read_state
from shortcut_ray.compare_report import metrics_of, table
from shortcut_ray.config import ConfigError

PRESET = "compare_digits_tiny"


def _finished(tmp_path, trained=True) -> tuple[str, dict]:
    """A comparison folder whose methods are trained (marked so) and evaluated, with its floor and report."""
    from shortcut_ray.compare import METHODS

    out = str(tmp_path / "cmp")
    base, state = _start(PRESET, [], out, False, ["--preset", PRESET])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for m in METHODS if trained else METHODS[:1]:
        mark_done(out, state, f"train:{m.name}", [str(ckpt)], checkpoint=str(ckpt))
    ev = Path(out) / "eval"
    ev.mkdir()
    for name in ("shortcut", "floor"):
        (ev / f"{name}.json").write_text(json.dumps({"name": name}))
    mark_done(out, state, "eval:shortcut", [str(ev / "shortcut.json")])
    mark_done(out, state, "floor", [str(ev / "floor.json")])
    (Path(out) / "results.md").write_text("the old table")
    mark_done(out, state, "report", [str(Path(out) / "results.md")])
    return out, state


def _trained(state: dict) -> set[str]:
    return {s for s in state["done"] if s.startswith("train:")}


def test_reevaluate_with_other_eval_settings_keeps_training_and_redoes_the_evaluation(tmp_path):
    out, state = _finished(tmp_path)
    seed = state["config"]["eval"]["seed"]
    logs: list[str] = []
    _, new = _start(PRESET, [f"eval.seed={seed + 1}"], out, True, ["--reevaluate"], log=logs.append, reevaluate=True)
    assert set(new["done"]) == _trained(state)  # trained: kept; evaluation, floor, report: to redo
    assert read_state(out) == json.loads(json.dumps(new))  # saved before anything else runs
    [entry] = new["evaluations"]
    assert entry["changed"] == {"seed": [seed, seed + 1]} and entry["command"].endswith("--reevaluate")
    assert entry["moved"] and entry["superseded"].startswith("superseded/")  # relative: the folder can move
    old = Path(out) / entry["superseded"]
    assert (old / "results.md").read_text() == "the old table"  # moved aside, nothing lost
    assert json.loads((old / "eval" / "shortcut.json").read_text()) == {"name": "shortcut"}
    assert not (Path(out) / "eval").exists() and not (Path(out) / "results.md").exists()
    assert f"eval.seed: {seed} -> {seed + 1}" in logs[0] and str(old) in logs[0]
    assert new["config"]["eval"]["seed"] == seed + 1 and new["sets"] == [f"eval.seed={seed + 1}"]
    _, again = _start(PRESET, [f"eval.seed={seed + 1}"], out, True, [], log=logs.append)
    assert again == new and len(logs) == 1  # then --resume with the new settings: nothing moves


def test_a_reevaluate_cut_short_before_the_move_is_finished_by_the_next_start(tmp_path):
    from shortcut_ray import compare_eval

    out, state = _finished(tmp_path)
    seed = state["config"]["eval"]["seed"]
    real = compare_eval.finish_supersede
    compare_eval.finish_supersede = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())  # Ctrl-C there
    try:
        with pytest.raises(KeyboardInterrupt):
            _start(PRESET, [f"eval.seed={seed + 1}"], out, True, [], reevaluate=True)
    finally:
        compare_eval.finish_supersede = real
    cut = read_state(out)  # recorded, not yet moved: the next start (same settings) moves it
    assert cut["evaluations"][0]["moved"] is False and (Path(out) / "results.md").exists()
    _, new = _start(PRESET, [f"eval.seed={seed + 1}"], out, True, [])
    assert new["evaluations"][0]["moved"] and len(new["evaluations"]) == 1
    assert (Path(out) / new["evaluations"][0]["superseded"] / "results.md").read_text() == "the old table"
    assert not (Path(out) / "results.md").exists() and set(new["done"]) == _trained(state)


def test_reevaluate_before_anything_was_evaluated_records_nothing(tmp_path):
    out = str(tmp_path / "cmp")
    _, state = _start(PRESET, [], out, False, [])
    from shortcut_ray.compare import METHODS

    for m in METHODS:
        mark_done(out, state, f"train:{m.name}", [])
    _, new = _start(PRESET, ["eval.seed=3"], out, True, [], reevaluate=True)
    assert "evaluations" not in new and not (Path(out) / "superseded").exists()
    assert new["config"]["eval"]["seed"] == 3


@pytest.mark.parametrize("sets, reevaluate, trained, match", [
    (["train.max_steps=7"], True, True, "train differ"),  # training settings: the methods would differ
    (["optim.lr=0.1", "eval.seed=3"], True, True, "eval, optim differ"),
    (["eval.seed=3"], False, True, "add --reevaluate"),  # e.g. a crash-resume that forgot its --set
    (["eval.seed=3"], True, False, "needs every method trained; shortcut, "),
])
def test_other_settings_without_reevaluate_or_training_are_refused_and_nothing_moves(tmp_path, sets, reevaluate,
                                                                                     trained, match):
    out, state = _finished(tmp_path, trained)
    with pytest.raises(ConfigError, match=match):
        _start(PRESET, sets, out, True, [], reevaluate=reevaluate)
    assert read_state(out) == json.loads(json.dumps(state)) and (Path(out) / "results.md").exists()
    assert not (Path(out) / "superseded").exists()


def test_a_finished_comparison_is_not_continued_without_resume(tmp_path):
    out, state = _finished(tmp_path)
    with pytest.raises(ConfigError, match="pass --resume"):
        _start(PRESET, [], out, False, [])


def test_the_table_shows_fid_first_and_fd_beside_it_when_fid_was_computed():
    row = {"label": "Shortcut models", "kind": "end-to-end", "sampler": {"objective": "Shortcut", "update": "u"},
           "metrics": {"fid/N1": 12.5, "fd_pixel/N1": 3.25}}
    results = {"metric": "fid", "steps": [1], "samples": 8, "eval_seed": 1, "methods": {"shortcut": row},
               "budget": {"max_steps": 4, "global_batch": 2}, "floor": {"fid": 1.0, "fd_pixel": 0.5}}
    assert metrics_of(results) == ["fid", "fd_pixel"]
    fid, fd = (table(results, ["shortcut"], m) for m in metrics_of(results))
    assert fid.startswith("FID at N") and "| **Shortcut models** | end-to-end | 12.500 |" in fid
    assert "| real vs real (floor) | - | 1.000 |" in fid
    assert fd.startswith("FD (pixel space") and "| 3.250 |" in fd and "| 0.500 |" in fd
    assert metrics_of({**results, "metric": "fd_pixel"}) == ["fd_pixel"]


def test_every_method_and_the_floor_share_one_reference_evaluator(tmp_path, monkeypatch):
    """InceptionV3 (here: the pixel statistics) sees the reference once per comparison, not once per method;
    each method is evaluated with its own config and the cached evaluator keeps the comparison's."""
    import torch

    from shortcut_ray import checkpoint
    from shortcut_ray.compare_eval import _REFERENCES, evaluate_method, floor, reference_evaluator
    from shortcut_ray.config import apply_overrides
    from shortcut_ray.evaluation import Evaluator
    from shortcut_ray.presets import get_preset
    from shortcut_ray.train_step import TrainState

    _REFERENCES.clear()
    calls = []
    real = Evaluator.set_reference
    monkeypatch.setattr(Evaluator, "set_reference", lambda self, x: (calls.append(len(x)), real(self, x))[1])
    base = apply_overrides(get_preset(PRESET), ["eval.fid_samples=16", "eval.fid_steps=1,2"])
    st = TrainState.create(apply_overrides(base, ["objective.train_type=flow_matching"]))
    ckpt = str(tmp_path / "checkpoint_0000000")
    checkpoint.save_local_atomic(ckpt, st.model, st.ema, st.optimizer, 0, st.cfg)
    first, strips = evaluate_method(ckpt, base, strip=2)
    second, _ = evaluate_method(ckpt, base, strip=2)
    fl = floor(base)
    assert calls == [16]  # one reference for both evaluations and the floor
    assert first["metrics"] == second["metrics"] and set(first["metrics"]) == {"fd_pixel/N1", "fd_pixel/N2"}
    assert first["sampler"]["objective"] == "FlowMatchingObjective" and strips.shape[:2] == (2, 2)
    assert fl["samples"] == 16 and torch.isfinite(torch.tensor(fl["fd_pixel"]))
    ev = reference_evaluator(base)
    assert ev.cfg is base and ev.num_reference == 16  # the method's config did not leak into the cache
    assert reference_evaluator(apply_overrides(base, ["eval.seed=5"])) is ev  # the noise is not the reference
    assert reference_evaluator(apply_overrides(base, ["eval.fid_samples=8"])) is not ev
