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


def _finished(tmp_path) -> tuple[str, dict]:
    """A comparison folder whose one method is trained and evaluated, with its floor and report."""
    out = str(tmp_path / "cmp")
    base, state = _start(PRESET, [], out, False, ["--preset", PRESET])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    mark_done(out, state, "train:shortcut", [str(ckpt)], checkpoint=str(ckpt))
    ev = Path(out) / "eval"
    ev.mkdir()
    for name in ("shortcut", "floor"):
        (ev / f"{name}.json").write_text(json.dumps({"name": name}))
    mark_done(out, state, "eval:shortcut", [str(ev / "shortcut.json")])
    mark_done(out, state, "floor", [str(ev / "floor.json")])
    (Path(out) / "results.md").write_text("the old table")
    mark_done(out, state, "report", [str(Path(out) / "results.md")])
    return out, state


def test_other_eval_settings_on_resume_keep_training_and_redo_the_evaluation(tmp_path):
    out, state = _finished(tmp_path)
    seed = state["config"]["eval"]["seed"]
    logs: list[str] = []
    _, new = _start(PRESET, [f"eval.seed={seed + 1}"], out, True, ["--resume"], log=logs.append)
    assert set(new["done"]) == {"train:shortcut"}  # trained: kept; evaluation, floor, report: to redo
    assert read_state(out) == json.loads(json.dumps(new))  # saved before anything else runs
    [entry] = new["evaluations"]
    assert entry["changed"] == {"seed": [seed, seed + 1]} and entry["command"].endswith("--resume")
    old = Path(entry["superseded"])
    assert old.parent == Path(out) / "superseded"  # moved aside, nothing lost
    assert (old / "results.md").read_text() == "the old table"
    assert json.loads((old / "eval" / "shortcut.json").read_text()) == {"name": "shortcut"}
    assert not (Path(out) / "eval").exists() and not (Path(out) / "results.md").exists()
    assert f"eval.seed: {seed} -> {seed + 1}" in logs[0] and str(old) in logs[0]
    assert new["config"]["eval"]["seed"] == seed + 1 and new["sets"] == [f"eval.seed={seed + 1}"]
    _, again = _start(PRESET, [f"eval.seed={seed + 1}"], out, True, ["--resume"], log=logs.append)
    assert again == new and len(logs) == 1  # the same settings again: nothing moves


@pytest.mark.parametrize("sets, resume, match", [
    (["train.max_steps=7"], True, "train differ"),  # training settings: the methods would differ
    (["optim.lr=0.1", "eval.seed=3"], True, "eval, optim differ"),
    (["eval.seed=3"], False, "pass --resume"),  # without --resume nothing is continued or redone
])
def test_other_training_settings_or_no_resume_are_refused_and_nothing_moves(tmp_path, sets, resume, match):
    out, state = _finished(tmp_path)
    with pytest.raises(ConfigError, match=match):
        _start(PRESET, sets, out, resume, [])
    assert read_state(out) == json.loads(json.dumps(state)) and (Path(out) / "results.md").exists()
    assert not (Path(out) / "superseded").exists()


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


def test_every_method_and_the_floor_share_one_reference_evaluator():
    from shortcut_ray.compare_eval import reference_evaluator
    from shortcut_ray.config import apply_overrides
    from shortcut_ray.presets import get_preset

    cfg = apply_overrides(get_preset(PRESET), ["eval.fid_samples=16"])
    ev = reference_evaluator(cfg)
    assert reference_evaluator(cfg) is ev and ev.num_reference == 16  # the reference is computed once
    assert reference_evaluator(apply_overrides(cfg, ["eval.seed=5"])) is not ev  # other settings: its own
