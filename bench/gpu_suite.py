"""One GPU check of the hot path, for a bare machine with only PyTorch (no Ray, MLflow or internet).

    bash bench/gpu_suite.sh                 # on the GPU box: < 8 minutes, results in $OUT or bench/results
    bash bench/gpu_suite.sh --dry-run       # anywhere (CPU): every stage shrunk, plumbing only

Stages run one after another, each in its own Python process with its own time cap (a crash or a slow
compile loses that stage only), and the merged results are rewritten to `gpu_suite[_dryrun].json`
after every stage, so whatever finished is on disk when the budget or the machine runs out:

  env            device, versions, datasheet peak, a measured bf16 matmul ceiling
  train_eager    DiT-B/2 and DiT-XL/2 at the 256px-latent shape (32x32x4), shortcut and flow matching:
                 median step time, images/s, TFLOP/s, MFU (bootstrap forwards counted), peak memory,
                 and the shortcut / flow step-time ratio (goal <= 1.12; theory 1.083 at 1/8 bootstrap)
  sampling       1-step vs 128-step sampling throughput (goal: 1-step >= 100x the 128-step one)
  fsdp2          the FSDP2 mixed-precision path Ray Train runs, in a one-rank NCCL group
  compiled_b/xl  DiT-B/2, then DiT-XL/2, again with train.compile=on (whole forward, batch buckets);
                 last, as their compile time is the least predictable
Extra stages, not in the default list (ask with --stages NAME,...):
  compile_ratio  compiled / eager step time of DiT-M/2 on 16x16x1, steps interleaved ABAB; meant for
                 a quiet CPU (python -m bench.gpu_suite --device cpu --stages compile_ratio)
  data_wait      the data-wait share of the step loop through the real Ray Data path (Parquet latent
                 shards of random values, 32x32x4, DiT-B/2 batch 256; bench/data_throughput.py). Needs
                 Ray, which the GPU box lacks: carry `python -m bench.trim_ray_wheel` output (35.7 MiB for
                 ray 2.60.0 cp312) and jsonschema's wheels in .whl/; gpu_suite.sh installs them
Within a stage every finished point is saved too: a stage cut off by its cap keeps what it finished.

Ray and MLflow are blocked in every stage process (sys.modules entries set to None; Ray is allowed in
data_wait only), so a stray import fails here exactly as it would on the bare machine. The dry run uses tiny models, two timed
steps, CPU, gloo, and the aot_eager compile backend; its JSON is a plumbing check, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_NEEDS_RAY = "--stage" in sys.argv and sys.argv[sys.argv.index("--stage") + 1:][:1] == ["data_wait"]
for _blocked in ("mlflow",) if _NEEDS_RAY else ("ray", "mlflow"):  # the GPU box has neither: fail here as there
    sys.modules.setdefault(_blocked, None)

import torch  # noqa: E402

from bench.gpu_stages import ROOT, write_json  # noqa: E402

STAGES = {  # name -> (time cap s on GPU, what it does); the whole suite also has a budget (--budget-s)
    "env": (45, "device, versions, matmul ceiling"),
    "train_eager": (110, "DiT-B/2, DiT-XL/2 x shortcut, flow matching, eager"),
    "sampling": (60, "1-step vs 128-step sampling"),
    "fsdp2": (60, "FSDP2 path, one-rank NCCL group"),
    "compiled_b": (120, "DiT-B/2 x shortcut, flow matching, compiled (includes compile time)"),
    "compiled_xl": (170, "DiT-XL/2 x shortcut, flow matching, compiled (includes compile time)"),
}
EXTRA_STAGES = {  # not in the default GPU run
    "compile_ratio": (900, "compiled / eager step time of a small model, interleaved (for a quiet CPU)"),
    "data_wait": (150, "data-wait share through the real Ray Data path, DiT-B/2 on 32x32x4 latent shards "
                       "(needs Ray: the trimmed wheel of bench/trim_ray_wheel.py in .whl/)"),
}


# -- driver ------------------------------------------------------------------------------------------

def drive(args) -> int:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / ("gpu_suite_dryrun.json" if args.dry_run else "gpu_suite.json")
    summary = {"kind": "CPU DRY RUN: shrunk stages, plumbing check, NOT a measurement" if args.dry_run
               else "measurement", "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "budget_s": args.budget_s, "stages": {}}
    t_start = time.monotonic()
    failures = 0
    for name in args.stages.split(","):
        cap, what = {**STAGES, **EXTRA_STAGES}[name]
        left = args.budget_s - (time.monotonic() - t_start)
        if left < 20:
            summary["stages"][name] = {"status": "skipped", "reason": f"budget spent ({args.budget_s} s)"}
            write_json(summary_path, summary)
            continue
        timeout = min(cap * (3 if args.dry_run else 1), left)
        print(f"[gpu_suite] {name}: {what} (cap {timeout:.0f} s)", flush=True)
        tmp = out_dir / f".{name}.json"
        cmd = [sys.executable, "-m", "bench.gpu_suite", "--stage", name, "--stage-out", str(tmp), "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--dry-run"] if args.dry_run else [])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=sys.stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            err = proc.stderr[-3000:]
            ok = proc.returncode == 0 and tmp.exists()
            entry = {"status": "ok" if ok else f"failed (rc {proc.returncode})"}
            if ok:
                entry["result"] = json.loads(tmp.read_text())
            else:
                entry["stderr_tail"] = err
                sys.stderr.write(err)
        except subprocess.TimeoutExpired as e:
            entry = {"status": f"timed out after {timeout:.0f} s",
                     "stderr_tail": (e.stderr or "")[-3000:] if isinstance(e.stderr, str) else ""}
            if tmp.exists():
                entry["partial_result"] = json.loads(tmp.read_text())
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        failures += entry["status"] != "ok"
        _annotate_measured_mfu(summary, entry)
        tmp.unlink(missing_ok=True)
        summary["stages"][name] = entry
        summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_json(summary_path, summary)  # every stage is on disk before the next starts
        print(f"[gpu_suite] {name}: {entry['status']} in {entry['wall_s']} s -> {summary_path}", flush=True)
    return 1 if failures else 0


def _annotate_measured_mfu(summary: dict, entry: dict) -> None:
    """TFLOP/s of each training point over the bf16 matmul rate measured in the env stage."""
    ceiling = summary["stages"].get("env", {}).get("result", {}).get("matmul", {}).get("tflops")
    for res in (entry.get("result"), entry.get("partial_result")):
        for point in (res or {}).get("points", []) if ceiling else []:
            point["mfu_vs_measured_matmul"] = point["tflops"] / ceiling


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("SHRINK") == "1",
                   help="shrink every stage (tiny models, CPU, 2 steps); also SHRINK=1")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--budget-s", type=float, default=None,
                   help="whole suite, seconds (GPU default 450, under the 8 minutes asked; dry run 1200)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per point (compile happens here)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    args.budget_s = args.budget_s or (1200.0 if args.dry_run else 450.0)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.warmup = args.warmup or (1 if args.dry_run else 3)
    if args.stage:
        from bench import gpu_stages

        gpu_stages.PARTIAL.append(Path(args.stage_out))
        if args.dry_run:
            torch.set_num_threads(min(2, torch.get_num_threads()))
        result = gpu_stages.run_stage(args.stage, args)
        Path(args.stage_out).write_text(json.dumps(result, default=str))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; use --dry-run for the CPU plumbing check")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
