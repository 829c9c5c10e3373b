"""The `shortcut-ray` console script (shortcut_ray/cli.py): subcommands and a --help that documents the config."""

import dataclasses
import json
import subprocess
import sys
import typing

from shortcut_ray import cli
from shortcut_ray.config import Config
from shortcut_ray.presets import PRESETS


def _all_fields():
    hints = typing.get_type_hints(Config)
    return [(s.name, f.name, hints[s.name]) for s in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[s.name])
            for f in dataclasses.fields(hints[s.name])]


def test_help_lists_every_field_with_docstring_and_default_and_every_preset(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for section, name, cls in _all_fields():
        assert f"{section}.{name} (" in out, f"{section}.{name} missing from --help"
        assert f"default {getattr(cls(), name)!r}" in out
    assert all(p in out for p in PRESETS) and all(c in out for c in cli.JOBS)
    # docstrings come from config.py's string literals, e.g. train.eval_every's
    assert "FID during training (needs eval.fid_weights)." in out


def test_field_docs_read_from_source():
    docs = cli.field_docs()
    assert docs["TrainConfig"]["progress_bars"].startswith("Ray Data's progress bars")
    assert docs["OptimConfig"]["lr"] == ""  # a field without a docstring stays empty


def test_subcommand_runs_the_job(capsys):
    assert cli.main(["train", "--preset", "debug_cpu", "--set", "train.max_steps=7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "debug_cpu" and cfg["train"]["max_steps"] == 7


def test_unknown_command_and_job_help():
    assert cli.main(["nope"]) == 2
    out = subprocess.run([sys.executable, "-m", "shortcut_ray.cli", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--preset" in out and "--progress" in out and "train.progress_bars (" in out
