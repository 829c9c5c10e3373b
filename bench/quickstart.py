"""The README's first quickstart command, timed whole, under different settings (an A/B of presets).

Each run is `python -m jobs.train --preset PRESET [--set ...]` in a fresh temporary folder (its own
`runs/`, `mlflow.db` and local Ray cluster), exactly what a new user runs, timed from launch to exit. The
arms run interleaved (--sequence) so that drift of a shared machine falls on both. From the lines the run
prints (read as they come) it also takes the phases: start-up (launch to the first progress line),
training (first to last progress line), and the tail (last progress line to exit: the end-of-run
evaluation, model logging and shutdown), and the Frechet distances that the run prints at the end.

    python -m bench.quickstart --arm threads2=train.torch_threads=2 --arm threads1=train.torch_threads=1 \\
        --sequence threads2,threads1,threads2,threads1 --out quickstart_threads_cpu

An arm is NAME=KEY=VALUE[,KEY=VALUE...] (NAME= alone: the preset as it is). Writes bench/results/OUT.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_out_arg, write_result

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"\[shortcut-ray\] step\s+(\d+)/(\d+) .*elapsed (\S+)")
EVAL_LINE = re.compile(r"\[shortcut-ray\] eval step (\d+): (.*)$")


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, sets = text.partition("=")
    if not name or not sep:
        raise SystemExit(f"--arm {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...] (or NAME= for the preset as is)")
    return name, [s for s in sets.split(",") if s]


def parse_metrics(text: str) -> dict[str, float]:
    """'eval/fd_pixel/N1 8.85, eval/fd_pixel/N2 6.52' -> {'eval/fd_pixel/N1': 8.85, ...}"""
    out = {}
    for item in text.split(","):
        key, _, value = item.strip().rpartition(" ")
        if key:
            out[key] = float(value)
    return out


class Phases:
    """Timestamps of the lines that mark a run's phases, fed one printed line at a time."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.first_step = self.last_step = None
        self.steps = self.max_steps = 0
        self.metrics: dict[str, float] = {}

    def feed(self, line: str, now: float) -> None:
        m = STEP_LINE.search(line)
        if m:
            self.first_step = self.first_step if self.first_step is not None else now - self.t0
            self.last_step = now - self.t0
            self.steps, self.max_steps = int(m.group(1)), int(m.group(2))
            return
        m = EVAL_LINE.search(line)
        if m:
            self.metrics = parse_metrics(m.group(2))

    def summary(self, wall: float) -> dict:
        if self.first_step is None:
            return {"wall_s": wall}
        return {"wall_s": wall, "startup_s": self.first_step, "training_s": self.last_step - self.first_step,
                "tail_s": wall - self.last_step, "steps": self.steps, "max_steps": self.max_steps,
                "metrics": self.metrics}


def run_once(preset: str, sets: list[str], keep: Path | None) -> dict:
    cmd = [sys.executable, "-m", "jobs.train", "--preset", preset] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="quickstart-") as cwd:
        t0 = time.perf_counter()
        phases = Phases(t0)
        log = []
        with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:
            for line in proc.stdout:
                phases.feed(line, time.perf_counter())
                log.append(line)
        wall = time.perf_counter() - t0
        if keep is not None:
            keep.write_text("".join(log))
    out = phases.summary(wall)
    out.update(returncode=proc.returncode, lines_printed=len(log))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; its last lines:\n"
                         + "".join(log[-20:]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--arm", action="append", required=True, help="NAME=KEY=VALUE[,KEY=VALUE...] (repeatable)")
    p.add_argument("--sequence", default=None, help="comma-separated arm names in run order (default: each arm once)")
    p.add_argument("--keep-logs", default=None, help="folder to keep each run's printed output in")
    add_out_arg(p, "quickstart_cpu")
    args = p.parse_args(argv)

    arms = dict(parse_arm(a) for a in args.arm)
    order = args.sequence.split(",") if args.sequence else list(arms)
    unknown = [a for a in order if a not in arms]
    if unknown:
        raise SystemExit(f"--sequence names {unknown}, not among the arms {sorted(arms)}")
    logs = Path(args.keep_logs) if args.keep_logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, name in enumerate(order):
        r = run_once(args.preset, arms[name], logs / f"{i:02d}_{name}.log" if logs else None)
        r["arm"] = name
        runs.append(r)
        print(f"run {i + 1}/{len(order)} {name}: wall {r['wall_s']:.1f} s, training {r.get('training_s', 0):.1f} s,"
              f" tail {r.get('tail_s', 0):.1f} s", flush=True)
    per_arm = {}
    for name in arms:
        mine = [r for r in runs if r["arm"] == name]
        per_arm[name] = {"sets": arms[name], "runs": len(mine)}
        for key in ("wall_s", "startup_s", "training_s", "tail_s"):
            vals = [r[key] for r in mine if key in r]
            if vals:
                per_arm[name][f"median_{key}"] = statistics.median(vals)
    payload = {"preset": args.preset, "sequence": order, "arms": per_arm, "runs": runs}
    if len(arms) == 2:
        a, b = list(arms)
        if "median_wall_s" in per_arm[a] and "median_wall_s" in per_arm[b]:
            payload[f"ratio_wall_{b}_over_{a}"] = per_arm[b]["median_wall_s"] / per_arm[a]["median_wall_s"]
    write_result(args.out or "quickstart_cpu", payload, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
