"""The comparison's outputs (shortcut_ray.compare): results.json, results.md (the paper's table
layout), fd_vs_steps.png (FD/FID vs N, log2 axis, the real-vs-real floor dashed) and strips.png (a
sample strip per method at each N, all from the same noise)."""

from __future__ import annotations

import json
import os

import numpy as np


def _load(out: str, name: str):
    with open(os.path.join(out, "eval", f"{name}.json")) as f:
        return json.load(f)


def collect(out: str, state: dict, methods) -> dict:
    cfg = state["config"]
    steps = [int(n) for n in cfg["eval"]["fid_steps"]]
    metric = "fid" if cfg["eval"]["fid_weights"] else "fd_pixel"
    results = {"name": state["name"], "preset": state["preset"], "sets": state["sets"], "metric": metric,
               "steps": steps, "samples": cfg["eval"]["fid_samples"], "eval_seed": cfg["eval"]["seed"],
               "budget": {"max_steps": cfg["train"]["max_steps"], "global_batch": cfg["train"]["global_batch"],
                          "model": cfg["model"], "lr": cfg["optim"]["lr"], "ema_decay": cfg["ema"]["decay"]},
               "protocol": state["protocol"], "parent_run_id": state.get("parent_run_id"),
               "floor": _load(out, "floor"), "methods": {},
               "evaluations": state.get("evaluations", []),  # evaluations redone with other eval settings
               "commands": {"compare": state["command"],
                            **{k.split(":", 1)[-1]: v["command"] for k, v in state["done"].items() if "command" in v}}}
    for m in methods:
        results["methods"][m.name] = _load(out, m.name)
    tuned = state["done"].get("tune:shortcut_tuned")
    if tuned:
        results["tuned"] = {k: tuned[k] for k in ("won", "metric", "trials", "sweep")}
    return results


def metrics_of(results: dict) -> list[str]:
    """The table's metrics, headline first: FID and FD when FID was computed, else FD."""
    return ["fid", "fd_pixel"] if results["metric"] == "fid" else ["fd_pixel"]


def table(results: dict, order, metric: str = "") -> str:
    order = [k for k in order if k in results["methods"]]  # the tuned row only with --tune
    metric, steps = metric or results["metric"], results["steps"]
    name = "FID" if metric == "fid" else "FD (pixel space, 16x16 pooled)"
    lines = [f"{name} at N sampling steps, {results['samples']} samples from the same noise (eval.seed "
             f"{results['eval_seed']}); equal budget: {results['budget']['max_steps']} steps of batch "
             f"{results['budget']['global_batch']} per method. Lower is better.", "",
             "| method | type | " + " | ".join(f"N={n}" for n in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for key in order:
        r = results["methods"][key]
        vals = [r["metrics"].get(f"{metric}/N{n}") for n in steps]
        label = f"**{r['label']}**" if key == "shortcut" else r["label"]
        lines.append(f"| {label} | {r['kind']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    fl = results["floor"].get(metric)
    lines.append("| real vs real (floor) | - | " + " | ".join(f"{fl:.3f}" for _ in steps) + " |")
    lines += ["", "Samplers: " + "; ".join(f"{k}: {r['sampler']['objective']} ({r['sampler']['update']}"
                                           + (f", objective.sampler={r['sampler']['objective.sampler']}"
                                              if k.startswith("consistency") else "") + ")"
                                           for k, r in results["methods"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, order, path: str) -> None:
    """One panel per metric (FID, then FD, when FID was computed): metric vs N, the floor dashed."""
    order = [k for k in order if k in results["methods"]]  # the tuned row only with --tune
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, metrics = results["steps"], metrics_of(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 3, 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key in order:
            r = results["methods"][key]
            ax.plot(steps, [r["metrics"].get(f"{metric}/N{n}", np.nan) for n in steps], marker="o",
                    lw=2.5 if key == "shortcut" else 1.2, label=r["label"])
        ax.axhline(results["floor"][metric], ls="--", color="k", label="real vs real (floor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_xlabel("sampling steps N")
        ax.set_ylabel("FID" if metric == "fid" else "FD (pixel space)")
        ax.set_title(f"{results['preset']}: {results['samples']} samples, {results['budget']['max_steps']} steps each")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # one legend, beside the panels
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def strips(out: str, results: dict, order, path: str) -> None:
    """Rows: methods; columns: N; each cell: the method's samples from the same noise at that N."""
    order = [k for k in order if k in results["methods"]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    fig, axes = plt.subplots(len(order), len(steps), figsize=(1.6 * len(steps) + 1.5, 0.6 * len(order) + 0.6),
                             squeeze=False)
    for i, key in enumerate(order):
        arr = np.load(os.path.join(out, "eval", f"{key}.npy"))  # (len(N), S, C, H, W) in [-1, 1]
        for j, n in enumerate(steps):
            row = np.concatenate(list(arr[j].transpose(0, 2, 3, 1)), axis=1)  # (H, S*W, C)
            img = (row + 1) / 2
            ax = axes[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"N={n}", fontsize=8)
            if j == 0:
                ax.set_ylabel(results["methods"][key]["label"], fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: str, state: dict, methods, order) -> tuple[dict, list[str]]:
    results = collect(out, state, methods)
    files = [os.path.join(out, f) for f in ("results.json", "results.md", "fd_vs_steps.png", "strips.png")]
    with open(files[0], "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    with open(files[1], "w") as f:
        f.write(f"# {results['name']}\n\n" + "\n".join(table(results, order, m) for m in metrics_of(results))
                + f"\nCommand: `{results['commands']['compare']}`\n"
                + "".join(f"\nEvaluated again ({', '.join('eval.' + k for k in e['changed'])} changed): "
                          f"`{e['command']}`\n" for e in results["evaluations"]))
    plot(results, order, files[2])
    strips(out, results, order, files[3])
    return results, files
