"""`shortcut-ray`: one command with a subcommand per job in jobs/ (each also runs as `python -m jobs.NAME`,
which is what `ray job submit -- python -m jobs.NAME ...` uses).

    shortcut-ray --help                       # subcommands, presets, every config field with default and doc
    shortcut-ray train --preset digits        # = python -m jobs.train --preset digits
    shortcut-ray sweep --preset digits --num-samples 8
    shortcut-ray sample runs/RUN/checkpoint_0001500 --steps 1,4,128 --out samples/

The config reference is derived from shortcut_ray/config.py: the dataclass fields, their defaults,
and the string literal under each field (its docstring), read once with ast.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
import typing

JOBS = {  # subcommand -> (module, one line)
    "train": ("jobs.train", "train a shortcut model on Ray (local or a cluster); resumes a run by name"),
    "sweep": ("jobs.sweep", "Ray Tune search (ASHA) over config fields; every trial is a Ray Train run"),
    "sample": ("jobs.sample", "images from a checkpoint at any step count and guidance scale"),
    "evaluate": ("jobs.evaluate", "FID / pixel Frechet distance of a checkpoint at several step counts"),
    "prepare-data": ("jobs.prepare_data", "write a dataset (images or VAE latents) as Parquet shards"),
    "fid-stats": ("jobs.fid_stats", "reference FID statistics of a dataset"),
}


def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} from the string literal after each field in config.py."""
    from . import config

    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(config)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        body = node.body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    doc = " ".join(nxt.value.value.split())
                fields[stmt.target.id] = doc
    return docs


def config_reference(width: int = 100) -> str:
    """Presets and every `--set section.key=VALUE` field with its type, default and docstring."""
    from .config import Config
    from .presets import PRESETS

    docs = field_docs()
    lines = ["presets (--preset NAME):"]
    for name, fn in sorted(PRESETS.items()):
        doc = " ".join((fn.__doc__ or "").split())
        lines.append(f"  {name:24s} {doc}")
    lines += ["", "config fields (--set section.key=VALUE; defaults are the dataclass defaults, presets change some):"]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines.append(f"  [{section.name}] {' '.join((cls.__doc__ or '').split())}")
        default = cls()
        sec_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = getattr(sec_hints[f.name], "__name__", str(sec_hints[f.name]).replace("typing.", ""))
            head = f"    {section.name}.{f.name} ({typ}, default {getattr(default, f.name)!r})"
            doc = docs.get(cls.__name__, {}).get(f.name, "")
            lines.append(head)
            if doc:
                lines += textwrap.wrap(doc, width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def _usage() -> str:
    cmds = "\n".join(f"  {name:14s} {what}" for name, (_, what) in JOBS.items())
    return (f"usage: shortcut-ray COMMAND [ARGS ...]   (`shortcut-ray COMMAND --help` for a command's options)\n\n"
            f"commands:\n{cmds}\n\n{config_reference()}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[0].replace("_", "-")
    if name not in JOBS:
        print(f"shortcut-ray: unknown command {argv[0]!r}; one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[name][0])
    sys.argv = [f"shortcut-ray {name}", *argv[1:]]  # argparse's prog name in usage lines
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
