"""The README's first quickstart command, timed whole, under different settings (an A/B of presets).

Each run is `python -m jobs.train --preset PRESET [--set ...]` in a fresh temporary folder (its own
`runs/`, `mlflow.db` and local Ray cluster), exactly what a new user runs, timed from launch to exit. The
arms run interleaved (--sequence) so that drift of a shared machine falls on both. From the lines the run
prints (read as they come) it also takes the phases: start-up (launch to the first progress line, which the worker prints
after its first `train.log_every` steps), training (first to last progress line), and the tail (last
progress line to exit: the final sample grids and checkpoint, the end-of-run evaluation, model logging
and shutdown), and the Frechet distances that the run prints at the end. A run that fails, prints no
progress line or stops short of its last step stops the benchmark; the result file is rewritten after
every run, so the runs before it are kept.

    python -m bench.quickstart --arm threads2=train.torch_threads=2 --arm threads1=train.torch_threads=1 \\
        --sequence threads2,threads1,threads2,threads1 --out quickstart_threads_cpu

An arm is NAME=KEY=VALUE[,KEY=VALUE...] (NAME= alone: the preset as it is; a value may hold commas,
`eval.fid_steps=1,2,4`). Writes bench/results/OUT.json. RAY_ADDRESS and MLFLOW_TRACKING_URI are not
passed on: every run starts its own local Ray cluster and MLflow store, as on a fresh machine.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import add_out_arg, median, write_result
from shortcut_ray.progress import PREFIX

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(re.escape(PREFIX) + r"step\s+(\d+)/(\d+) ")  # progress.Progress.line
EVAL_LINE = re.compile(re.escape(PREFIX) + r"eval step \d+: (.*)$")  # progress.eval_line
ARM_SETTING = re.compile(r",(?=[\w.]+=)")  # a comma that starts the next KEY=


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, sets = text.partition("=")
    if not name or not sep:
        raise SystemExit(f"--arm {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...] (or NAME= for the preset as is)")
    return name, [s for s in ARM_SETTING.split(sets) if s]


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
            self.metrics = parse_metrics(m.group(1))

    def summary(self, wall: float) -> dict:
        if self.first_step is None:
            return {"wall_s": wall}
        return {"wall_s": wall, "startup_s": self.first_step, "training_s": self.last_step - self.first_step,
                "tail_s": wall - self.last_step, "steps": self.steps, "max_steps": self.max_steps,
                "metrics": self.metrics}


def run_once(preset: str, sets: list[str], keep: Path | None, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "jobs.train", "--preset", preset] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="quickstart-") as cwd:
        t0 = time.perf_counter()
        phases = Phases(t0)
        log = []
        with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, start_new_session=True) as proc:
            timer = threading.Timer(timeout_s, stop, (proc,))
            timer.start()
            try:
                for line in proc.stdout:
                    phases.feed(line, time.perf_counter())
                    log.append(line)
            finally:
                timer.cancel()
        wall = time.perf_counter() - t0
        if keep is not None:
            keep.write_text("".join(log))
    out = phases.summary(wall)
    out.update(returncode=proc.returncode, lines_printed=len(log))
    check_run(out, " ".join(cmd), log, timeout_s)
    return out


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """--timeout: SIGTERM, which jobs.train ends like Ctrl-C (Ray shut down, the MLflow run KILLED); after
    grace_s (or at once when it ended sooner) SIGKILL to its process group: the driver and the Ray
    processes still in it (Ray's workers leave it and end when their raylet is gone)."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_run(run: dict, cmd: str, log: list[str], timeout_s: float) -> None:
    """Refuse a run that would time something else than the whole quickstart: one that failed, was
    killed at --timeout, printed no progress line, or stopped before its last step."""
    if run["wall_s"] >= timeout_s:
        why = f"was stopped at --timeout {timeout_s:.0f} s"
    elif run["returncode"] != 0:
        why = f"failed with exit code {run['returncode']}"
    elif "steps" not in run:
        why = f"printed no progress line ('{PREFIX}step ...'): is its output still forwarded?"
    elif run["steps"] != run["max_steps"]:
        why = f"stopped at step {run['steps']} of {run['max_steps']}"
    else:
        return
    raise SystemExit(f"{cmd} {why}; its last lines:\n" + "".join(log[-20:]))


def parse_arms(texts: list[str]) -> dict[str, list[str]]:
    arms = {}
    for text in texts:
        name, sets = parse_arm(text)
        if name in arms:
            raise SystemExit(f"--arm {name!r} is given twice")
        arms[name] = sets
    return arms


def summarise(preset: str, order: list[str], arms: dict[str, list[str]], runs: list[dict]) -> dict:
    per_arm = {}
    for name in arms:
        mine = [r for r in runs if r["arm"] == name]
        per_arm[name] = {"sets": arms[name], "runs": len(mine)}
        for key in ("wall_s", "startup_s", "training_s", "tail_s"):
            vals = [r[key] for r in mine if key in r]
            if vals:
                per_arm[name][f"median_{key}"] = median(vals)
    payload = {"preset": preset, "sequence": order, "arms": per_arm, "runs": runs}
    if len(arms) == 2:
        a, b = list(arms)
        if "median_wall_s" in per_arm[a] and "median_wall_s" in per_arm[b]:
            payload[f"ratio_wall_{b}_over_{a}"] = per_arm[b]["median_wall_s"] / per_arm[a]["median_wall_s"]
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--arm", action="append", required=True, help="NAME=KEY=VALUE[,KEY=VALUE...] (repeatable)")
    p.add_argument("--sequence", default=None, help="comma-separated arm names in run order (default: each arm once)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed (default 3600)")
    p.add_argument("--keep-logs", default=None, help="folder to keep each run's printed output in")
    add_out_arg(p, "quickstart_cpu")
    args = p.parse_args(argv)

    arms = parse_arms(args.arm)
    order = args.sequence.split(",") if args.sequence else list(arms)
    unknown = [a for a in order if a not in arms]
    if unknown:
        raise SystemExit(f"--sequence names {unknown}, not among the arms {sorted(arms)}")
    logs = Path(args.keep_logs) if args.keep_logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, name in enumerate(order):
        r = run_once(args.preset, arms[name], logs / f"{i:02d}_{name}.log" if logs else None, args.timeout)
        r["arm"] = name
        runs.append(r)
        print(f"run {i + 1}/{len(order)} {name}: wall {r['wall_s']:.1f} s, training {r['training_s']:.1f} s,"
              f" tail {r['tail_s']:.1f} s", flush=True)
        write_result(args.out or "quickstart_cpu", summarise(args.preset, order, arms, runs), torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
