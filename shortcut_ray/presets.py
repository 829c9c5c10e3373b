"""Named runs: functions returning a full Config, each `override(parent, {dotted key: value})` of the
defaults or of another preset (the same override path as `--set`, sweeps and trials).

`get_preset("digits")`; `python -m jobs.train --preset digits --set train.max_steps=500`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .config import Config, override
from .model import model_config

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return override(PRESETS[name](), {"preset": name})


def _model(size: str) -> dict:
    """The model.* keys of a named DiT size, for `override`."""
    return {f"model.{k}": v for k, v in dataclasses.asdict(model_config(size)).items()}


@preset
def digits() -> Config:
    """The embedded default: scikit-learn's 1,797 digits at 16x16, a small DiT (h128, depth 4, patch 4),
    1,500 steps on one worker with 2 torch threads (under 3 minutes of training on 2 quiet CPU cores),
    then the Frechet distance at N = 1, 2, 4, 8, 128, sample grids, diagnostics and the generator in the
    MLflow Model Registry."""
    n_eval = (1, 2, 4, 8, 128)
    return override(Config(), {
        # patch 4: 16 tokens instead of 64, ~4x fewer FLOPs per image than DiT-M/2; the images are 8x8
        # digits upsampled to 16x16, so a 4x4 patch still sees 2x2 source pixels (README, issue 14)
        **_model("DiT-M/2"), "model.patch_size": 4,
        # 2 bootstrap rows per level and step (bootstrap_every=4, not 8): the self-consistency signal
        # reaches the 1- and 2-step levels within the short budget
        "objective.bootstrap_every": 4,
        "data.source": "digits", "data.image_size": 16, "data.channels": 1, "data.num_classes": 10,
        "data.random_flip": False, "optim.lr": 1e-3, "ema.decay": 0.99,
        # one worker, 1 CPU reserved (the other for Ray Data's first epoch), 2 threads once the epochs come
        # from memory (data.cache_mb): 627 img/s against 300 for 2 FSDP2 workers of 1 thread (README)
        "train.global_batch": 64, "train.max_steps": 1500, "train.num_workers": 1, "train.cpus_per_worker": 1,
        "train.torch_threads": 2, "train.log_every": 100,
        "train.sample_every": 1500, "train.checkpoint_every": 500, "train.eval_every": 1500,
        "eval.grid_size": 8, "eval.sample_steps": n_eval, "eval.fid_steps": n_eval, "eval.fid_samples": 400,
        "eval.diagnostic_t_bins": 16})


@preset
def debug_cpu() -> Config:
    """Tiny and fast: for tests and for checking that the system runs end to end (seconds)."""
    return override(digits(), {
        **_model("DiT-T/2"), "objective.bootstrap_every": 8, "train.max_steps": 20, "train.log_every": 5,
        # 2 FSDP2 workers, as the tests expect (digits itself trains faster on one)
        "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.torch_threads": 0,
        "train.sample_every": 10, "train.checkpoint_every": 10, "train.eval_every": 0, "eval.grid_size": 4,
        "eval.sample_steps": (1, 2, 4, 128)})


@preset
def digits_flow_matching() -> Config:
    """The flow-matching baseline on the embedded default (same budget as `digits`)."""
    return override(digits(), {"objective.train_type": "flow_matching"})


@preset
def fashion_mnist_dit_s() -> Config:
    """Fashion-MNIST at 32x32 pixels (28x28 padded), DiT-S/2, about 20 minutes on one H100."""
    return override(Config(), {
        **_model("DiT-S/2"),
        "data.source": "fashion_mnist", "data.uri": "/usr/share/datasets/fashion-mnist", "data.image_size": 32,
        "data.channels": 1, "data.num_classes": 10, "data.random_flip": False, "ema.decay": 0.999,
        "train.global_batch": 256, "train.max_steps": 30000, "train.num_workers": 1, "train.use_gpu": True,
        "train.cpus_per_worker": 4, "train.log_every": 100, "train.sample_every": 5000,
        "train.checkpoint_every": 5000, "train.eval_every": 10000,
        "eval.fid_steps": (1, 2, 4, 8, 128), "eval.fid_samples": 10000})


def _latent_256(num_classes: int, bucket_prefix: str, **updates) -> Config:
    """ALGORITHM §3.3 common part: SD-VAE latents of 256 px images (32x32x4), DiT-B/2, 8 GPU workers."""
    return override(Config(), {
        **_model("DiT-B/2"),
        "data.source": "parquet", "data.uri": f"gs://YOUR_BUCKET/{bucket_prefix}", "data.image_size": 32,
        "data.channels": 4, "data.num_classes": num_classes, "data.kind": "latents",
        "train.num_workers": 8, "train.use_gpu": True, "train.cpus_per_worker": 8, "train.log_every": 1000,
        "train.sample_every": 20_000, "train.checkpoint_every": 20_000, "train.eval_every": 20_000,
        "eval.fid_steps": (1, 4, 32, 128), "eval.fid_samples": 4096, **updates})


@preset
def celebahq256_dit_b() -> Config:
    """ALGORITHM §3.3: unconditional CelebA-HQ 256 on SD-VAE latents, DiT-B/2, batch 64, 410k steps."""
    return _latent_256(1, "celebahq256-latents", **{
        "objective.class_conditional": False, "objective.class_dropout_prob": 1.0,
        "train.global_batch": 64, "train.max_steps": 410_000, "eval.cfg_scale": 0.0})


@preset
def imagenet256_dit_b() -> Config:
    """ALGORITHM §3.3: class-conditional ImageNet 256 latents, DiT-B/2, batch 256, bootstrap CFG 1.5."""
    return _latent_256(1000, "imagenet256-latents", **{
        "objective.bootstrap_cfg": True, "objective.cfg_scale": 1.5, "objective.class_dropout_prob": 0.1,
        "train.global_batch": 256, "train.max_steps": 810_000})


@preset
def imagenet256_dit_xl() -> Config:
    """The DiT-XL/2 scaling run of ALGORITHM §3.3."""
    return override(imagenet256_dit_b(), _model("DiT-XL/2"))


# -- The paper's baselines (ALGORITHM §6): every method on each base run ---------------------------
# `<base>_<method>` for base in digits, fashion_mnist_dit_s and the paper's DiT-B recipes (§3.3: the
# comparison table is DiT-B on CelebA-HQ 256 and ImageNet 256, same budget as shortcut), e.g.
# `digits_consistency`, `fashion_mnist_dit_s_progressive`, `imagenet256_dit_b_reflow`.
# Distillation presets leave objective.teacher_checkpoint empty (set it to a checkpoint of
# `<base>_flow_matching`; teacher.check_teacher says so). Reflow presets point data.uri at where the
# README's `jobs.generate_pairs --output` puts the pairs of that base's flow-matching teacher.

METHOD_BASES: dict[str, Callable[[], Config]] = {
    "digits": digits, "fashion_mnist_dit_s": fashion_mnist_dit_s,
    "celebahq256_dit_b": celebahq256_dit_b, "imagenet256_dit_b": imagenet256_dit_b,
}
BASELINE_METHODS = ("flow_matching", "consistency", "consistency_distillation", "progressive", "live_reflow",
                    "reflow", "diffusion")
PAIRS_URI = {"digits": "data/digits-pairs", "fashion_mnist_dit_s": "data/fashion-mnist-pairs",
             "celebahq256_dit_b": "gs://YOUR_BUCKET/pairs/celebahq256-fm",
             "imagenet256_dit_b": "gs://YOUR_BUCKET/pairs/imagenet256-fm"}
"""Default data.uri of the reflow presets (the paired dataset written by jobs.generate_pairs)."""


def method_preset(base: str, method: str) -> Config:
    """`base` with objective.train_type=`method`; everything else (model, data, budget, EMA, CFG) is the
    base's, as §6 trains every baseline with shortcut's settings. Reflow reads the paired dataset."""
    sets = {"objective.train_type": method}
    if method == "reflow":  # §6.6: flow matching on the stored coupling; a flip would break the pairs
        sets.update({"data.source": "parquet", "data.uri": PAIRS_URI[base], "data.random_flip": False})
    return override(METHOD_BASES[base](), sets)


def _register_method_presets() -> None:
    for base in METHOD_BASES:
        for method in BASELINE_METHODS:
            name = f"{base}_{method}"
            if name in PRESETS:  # digits_flow_matching is defined above
                continue

            def fn(base=base, method=method) -> Config:
                return method_preset(base, method)

            fn.__name__ = fn.__qualname__ = name
            fn.__doc__ = f"{base} trained with objective.train_type={method} (ALGORITHM §6)."
            preset(fn)


_register_method_presets()
@preset
def compare_digits_tiny() -> Config:
    """The comparison (jobs.compare) in seconds per method: DiT-T on digits, 4 steps each, 64 eval samples."""
    return override(debug_cpu(), {
        "train.max_steps": 4, "train.log_every": 2, "train.sample_every": 0, "train.checkpoint_every": 4,
        "train.eval_every": 0, "train.num_workers": 1, "train.cpus_per_worker": 1,
        "eval.fid_steps": (1, 2, 4, 8, 128), "eval.fid_samples": 64, "eval.sample_steps": (1, 128),
        "eval.grid_size": 2})


@preset
def fashion_mnist_16px() -> Config:
    """The committed comparison's scale on 2 CPU cores: Fashion-MNIST at 16x16, the CPU DiT of
    bench/quality.py (hidden 128, depth 4, 4 heads, patch 4: 16 tokens), batch 64, 1000 steps per
    method, EMA 0.99 (evaluated with the EMA weights), FD/FID at N = 1, 2, 4, 8, 128 with 500 samples."""
    return override(Config(), {
        **_model("DiT-M/2"), "model.patch_size": 4,
        "data.source": "fashion_mnist", "data.uri": "/work/shared/data/fashion-mnist", "data.image_size": 16,
        "data.channels": 1, "data.num_classes": 10, "data.random_flip": False,
        "optim.lr": 5e-4, "ema.decay": 0.99, "ema.eval_with_ema": True,
        "train.global_batch": 64, "train.max_steps": 1000, "train.num_workers": 1, "train.cpus_per_worker": 1,
        "train.log_every": 50, "train.sample_every": 0, "train.checkpoint_every": 250, "train.eval_every": 0,
        "eval.fid_steps": (1, 2, 4, 8, 128), "eval.fid_samples": 500, "eval.sample_steps": (1, 4, 128),
        "eval.grid_size": 4})
