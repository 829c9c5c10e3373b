"""Named runs: functions returning a full Config, each derived from another in a few lines.

`get_preset("digits")`; `python -m jobs.train --preset digits --set train.max_steps=500`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .config import Config, DataConfig, EvalConfig, ObjectiveConfig, TrainConfig
from .model import model_config

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name](), preset=name)


def _replace(cfg: Config, **sections) -> Config:
    """Replace fields inside sections: _replace(cfg, train=dict(max_steps=10))."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


@preset
def digits() -> Config:
    """The embedded default: scikit-learn's 1,797 digits at 16x16, a small DiT, minutes on a laptop CPU."""
    return Config(
        model=model_config("DiT-M/2"),
        data=DataConfig(source="digits", image_size=16, channels=1, num_classes=10, random_flip=False),
        optim=dataclasses.replace(Config().optim, lr=5e-4),
        ema=dataclasses.replace(Config().ema, decay=0.99),
        train=TrainConfig(global_batch=64, max_steps=1500, num_workers=2, log_every=25, sample_every=500,
                          checkpoint_every=500),
        eval=EvalConfig(grid_size=8),
    )


@preset
def debug_cpu() -> Config:
    """Tiny and fast: for tests and for checking that the system runs end to end (seconds)."""
    return _replace(digits(), model=dict(**model_config("DiT-T/2").__dict__),
                    train=dict(max_steps=20, log_every=5, sample_every=10, checkpoint_every=10),
                    eval=dict(grid_size=4, sample_steps=(1, 2, 4, 128)))


@preset
def digits_flow_matching() -> Config:
    """The flow-matching baseline on the embedded default (same budget as `digits`)."""
    return _replace(digits(), objective=dict(train_type="flow_matching"))


@preset
def fashion_mnist_dit_s() -> Config:
    """Fashion-MNIST at 32x32 pixels (28x28 padded), DiT-S/2, about 20 minutes on one H100."""
    return Config(
        model=model_config("DiT-S/2"),
        data=DataConfig(source="fashion_mnist", uri="/usr/share/datasets/fashion-mnist", image_size=32,
                        channels=1, num_classes=10, random_flip=False),
        ema=dataclasses.replace(Config().ema, decay=0.999),
        train=TrainConfig(global_batch=256, max_steps=30000, num_workers=1, use_gpu=True, cpus_per_worker=4,
                          log_every=100, sample_every=5000, checkpoint_every=5000, eval_every=10000),
        eval=EvalConfig(fid_steps=(1, 2, 4, 8, 128), fid_samples=10000),
    )


@preset
def celebahq256_dit_b() -> Config:
    """ALGORITHM §3.3: unconditional CelebA-HQ 256 on SD-VAE latents, DiT-B/2, batch 64, 410k steps."""
    return Config(
        model=model_config("DiT-B/2"),
        objective=ObjectiveConfig(class_conditional=False, class_dropout_prob=1.0),
        data=DataConfig(source="parquet", uri="gs://YOUR_BUCKET/celebahq256-latents", image_size=32,
                        channels=4, num_classes=1, kind="latents"),
        train=TrainConfig(global_batch=64, max_steps=410_000, num_workers=8, use_gpu=True, cpus_per_worker=8,
                          log_every=1000, sample_every=20_000, checkpoint_every=20_000, eval_every=20_000),
        eval=EvalConfig(cfg_scale=0.0, fid_steps=(1, 4, 32, 128), fid_samples=4096),
    )


@preset
def imagenet256_dit_b() -> Config:
    """ALGORITHM §3.3: class-conditional ImageNet 256 latents, DiT-B/2, batch 256, bootstrap CFG 1.5."""
    return Config(
        model=model_config("DiT-B/2"),
        objective=ObjectiveConfig(bootstrap_cfg=True, cfg_scale=1.5, class_dropout_prob=0.1),
        data=DataConfig(source="parquet", uri="gs://YOUR_BUCKET/imagenet256-latents", image_size=32,
                        channels=4, num_classes=1000, kind="latents"),
        train=TrainConfig(global_batch=256, max_steps=810_000, num_workers=8, use_gpu=True, cpus_per_worker=8,
                          log_every=1000, sample_every=20_000, checkpoint_every=20_000, eval_every=20_000),
        eval=EvalConfig(fid_steps=(1, 4, 32, 128), fid_samples=4096),
    )


@preset
def imagenet256_dit_xl() -> Config:
    """The DiT-XL/2 scaling run of ALGORITHM §3.3."""
    return _replace(imagenet256_dit_b(), model=dict(**model_config("DiT-XL/2").__dict__))
