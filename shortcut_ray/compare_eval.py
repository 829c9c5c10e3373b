"""The comparison's evaluation (shortcut_ray.compare), identical for every method: each final
checkpoint is loaded on the driver (checkpoint.load_for_inference) and evaluated with evaluation.Evaluator
at the comparison's eval.fid_samples, fixed noise (eval.seed) and N (eval.fid_steps), against one
reference (the first fid_samples images of the dataset in file order), each method with its own sampler
rule (recorded); the real-vs-real floor is the next fid_samples images against the same reference."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time

from .config import Config, ConfigError

OUTPUTS = ("eval", "results.json", "results.md", "fd_vs_steps.png", "strips.png")
"""What the evaluation writes into the comparison's folder (moved aside when it is redone)."""
_REFERENCES: dict[str, object] = {}


def real_images(data_cfg, count: int):
    """The first `count` images of the dataset in file order (no flip), model space, (count, C, H, W)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from .data import decode_batch, resolve_dataset
    from .shards import dataset_info, filesystem, join_uri

    uri = resolve_dataset(data_cfg)
    info = dataset_info(uri)
    fs, root = filesystem(uri)
    chunks, have = [], 0
    for shard in info["shards"]:
        with fs.open(join_uri(root, shard["file"]), "rb") as f:
            table = pq.read_table(f)
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        x = decode_batch(batch, kind=data_cfg.kind, channels=data_cfg.channels, image_size=data_cfg.image_size,
                         random_flip=False, latent_scale=data_cfg.latent_scale,
                         latent_shape=info.get("latent_shape"))["image"]
        chunks.append(x[:count - have])
        have += len(chunks[-1])
        if have >= count:
            return torch.from_numpy(np.concatenate(chunks))
    raise ConfigError(f"the dataset {uri} has {have} images; the comparison needs {count} (eval.fid_samples for "
                      f"the reference plus as many for the real-vs-real floor): lower eval.fid_samples")


def reference_evaluator(cfg: Config):
    """An Evaluator holding the comparison's reference statistics (the first eval.fid_samples dataset
    images; pixel FD, and FID with eval.fid_weights). Built once per data and eval settings in this
    process, so InceptionV3 sees the reference once, not once per method."""
    import torch

    from .evaluation import Evaluator

    e = cfg.eval  # what the reference depends on (not the noise seed, N or sampler settings)
    key = json.dumps([dataclasses.asdict(cfg.data), e.fid_samples, e.fid_weights, e.fid_ref_stats], sort_keys=True)
    if key not in _REFERENCES:
        ev = Evaluator(cfg, torch.device("cpu"))
        ev.set_reference(real_images(cfg.data, cfg.eval.fid_samples))
        _REFERENCES.clear()  # one comparison at a time: keep one network and one reference
        _REFERENCES[key] = ev
    return _REFERENCES[key]


def floor(cfg: Config) -> dict:
    """Real vs real at the comparison's sample count: images n..2n-1 against the reference 0..n-1."""
    from .evaluation import pooled
    from .fid import FeatureStats

    n = cfg.eval.fid_samples
    ev = reference_evaluator(cfg)
    held = real_images(cfg.data, 2 * n)[n:]
    out = {"samples": n, "images": f"dataset images {n}..{2 * n - 1} vs the reference 0..{n - 1} (file order)",
           "fd_pixel": FeatureStats.from_features(pooled(held).numpy()).frechet_distance(ev.ref_pixel)}
    if ev.inception is not None:
        feats = ev.inception(ev._display(held)).double().cpu().numpy()
        out["fid"] = FeatureStats.from_features(feats).frechet_distance(ev.ref_fid)
    return out


def sampler_record(cfg: Config) -> dict:
    """The method's own sampling rule: update, sampler option and the level k of every step per N."""
    from .objectives import for_sampling

    obj = for_sampling(cfg)
    per_n = {}
    for n in cfg.eval.fid_steps:
        ks = [st.k for st in obj.sample_steps(n)]
        per_n[str(n)] = ks if len(ks) <= 8 else f"{len(ks)} steps, k in {sorted(set(ks))}"
    return {"objective": type(obj).__name__, "update": type(obj).sample_update.__qualname__,
            "objective.sampler": cfg.objective.sampler, "cfg_scale": cfg.eval.cfg_scale, "k_per_N": per_n}


def evaluate_method(ckpt: str, base: Config, strip: int) -> tuple[dict, "object"]:
    """Metrics at every N with the comparison's own eval settings, plus a sample strip per N from the
    fixed noise of eval.seed; returns (record, strips (len(N), strip, C, H, W) numpy)."""
    import numpy as np
    import torch

    from .checkpoint import load_for_inference
    from .objectives import for_sampling
    from .sampler import fixed_noise, sample

    model, cfg, meta = load_for_inference(ckpt, "auto")
    cfg = dataclasses.replace(cfg, eval=base.eval)  # identical samples, noise, N and reference for all
    ev = copy.copy(reference_evaluator(base))  # the shared reference, this method's sampler settings
    ev.cfg = cfg
    metrics, report = ev.run(model)
    d = cfg.data
    noise = fixed_noise((strip, d.channels, d.image_size, d.image_size), cfg.eval.seed)
    labels = (torch.arange(strip) % d.num_classes if cfg.objective.class_conditional
              else torch.full((strip,), d.num_classes))
    obj = for_sampling(cfg)
    strips = np.stack([sample(model, noise, labels, n, cfg.eval.cfg_scale, d.num_classes,
                              cfg.objective.denoise_timesteps, objective=obj).clamp(-1, 1).numpy()
                       for n in cfg.eval.fid_steps])
    record = {"checkpoint": ckpt, "step": meta["step"], "weights": meta["weights"], "mlflow_run_id":
              meta.get("mlflow_run_id"), "metrics": metrics, "report": report, "sampler": sampler_record(cfg)}
    return record, strips


def log_child(tracking_uri: str, record: dict) -> None:
    """The comparison's metrics into the method's own MLflow run, at its final step."""
    from .tracking import log_metrics_to_run

    if record.get("mlflow_run_id"):
        log_metrics_to_run(tracking_uri, record["mlflow_run_id"],
                           {f"compare/{k}": v for k, v in record["metrics"].items()}, record["step"])


def evaluate_into(base: Config, method, ckpt: str, out: str, strip: int, **extra) -> list[str]:
    """evaluate_method -> <out>/eval/<method>.json/.npy (+ the method's MLflow run); records the stage."""
    import numpy as np

    record, strips = evaluate_method(ckpt, base, strip)
    record.update(method=method.name, kind=method.kind, label=method.label, **extra)
    files = [os.path.join(out, "eval", f"{method.name}.json"), os.path.join(out, "eval", f"{method.name}.npy")]
    os.makedirs(os.path.dirname(files[0]), exist_ok=True)
    with open(files[0], "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    np.save(files[1], strips)
    if base.tracking.enabled:
        log_child(base.tracking.tracking_uri, record)
    return files


def supersede(out: str, state: dict, new_config: dict, command: str, write_state, log=print) -> None:
    """Other eval.* settings on --reevaluate (e.g. eval.fid_weights added, to add FID): the trained methods
    are kept; the evaluation stages are dropped from `state` and the previous evaluation's files move to
    <out>/superseded/<time>/, so every method, the floor and the report are evaluated again. The new
    state is saved before any file moves (finish_supersede completes a move cut short)."""
    old_eval, new_eval = state["config"]["eval"], new_config["eval"]
    changed = {k: [old_eval.get(k), new_eval.get(k)] for k in sorted(set(old_eval) | set(new_eval))
               if old_eval.get(k) != new_eval.get(k)}
    stages = [s for s in state["done"] if s.startswith("eval:") or s in ("floor", "report")]
    state["config"] = new_config
    if not stages and not any(os.path.exists(os.path.join(out, name)) for name in OUTPUTS):
        write_state(out, state)  # nothing was evaluated yet: nothing to redo or keep
        return
    stamp, i = time.strftime("%Y%m%d-%H%M%S", time.gmtime()), 1
    dest = os.path.join("superseded", stamp)
    while os.path.exists(os.path.join(out, dest)):  # two changes within a second
        i += 1
        dest = os.path.join("superseded", f"{stamp}-{i}")
    for stage in stages:
        del state["done"][stage]
    state.setdefault("evaluations", []).append({"changed": changed, "superseded": dest, "command": command,
                                                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                "moved": False})
    write_state(out, state)
    finish_supersede(out, state, write_state)
    log("[compare] eval settings changed (" + ", ".join(f"eval.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        + f"): the trained methods are kept and evaluated again; the previous evaluation is in "
          f"{os.path.join(out, dest)}")


def finish_supersede(out: str, state: dict, write_state=None) -> None:
    """Move the previous evaluation's files into the superseded folder recorded last, if not yet done."""
    rec = (state.get("evaluations") or [{}])[-1]
    if rec.get("moved", True):
        return
    dest = os.path.join(out, rec["superseded"])
    os.makedirs(dest, exist_ok=True)
    for name in OUTPUTS:
        if os.path.exists(os.path.join(out, name)) and not os.path.exists(os.path.join(dest, name)):
            shutil.move(os.path.join(out, name), os.path.join(dest, name))
    rec["moved"] = True
    if write_state:
        write_state(out, state)
