"""Every objective through TrainState.step_on (networks by role, step/max_steps, pairs), single process."""

from __future__ import annotations

import copy

import pytest
import torch

from shortcut_ray.config import Config, DataConfig, ObjectiveConfig, TrainConfig
from shortcut_ray.model import ShortcutDiT, model_config
from shortcut_ray.objectives import names
from shortcut_ray.teacher import DistillTeacher
from shortcut_ray.train_step import TrainState

C, S, NC, B = 1, 8, 10, 16


def config(train_type: str, max_steps: int = 7) -> Config:
    return Config(model=model_config("DiT-T/2", hidden_size=32, depth=1),
                  objective=ObjectiveConfig(train_type=train_type,
                                            bootstrap_every=2 if train_type == "live_reflow" else 8),
                  data=DataConfig(image_size=S, channels=C, num_classes=NC),
                  train=TrainConfig(global_batch=B if train_type != "shortcut" else 64, max_steps=max_steps,
                                    precision="fp32"))


def teacher_for(cfg: Config, progressive: bool) -> DistillTeacher:
    """A stand-in for teacher.attach: a frozen flow-matching DiT with a non-zero output."""
    torch.manual_seed(3)
    m = ShortcutDiT(cfg.model, S, C, NC, ignore_k=True)
    with torch.no_grad():
        for p in m.final.parameters():
            p.normal_(std=0.05)
    return DistillTeacher(m, copy.deepcopy(m), "test", cfg.train.max_steps, progressive)


def batch(cfg: Config, seed: int, paired: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = cfg.train.global_batch
    x1, y = torch.randn(n, C, S, S, generator=g), torch.randint(0, NC, (n,), generator=g)
    return (x1, y, torch.randn(n, C, S, S, generator=g)) if paired else (x1, y)


@pytest.mark.parametrize("train_type", names())
def test_every_objective_trains(train_type):
    cfg = config(train_type)
    st = TrainState.create(cfg, "cpu")
    if st.objective.needs_teacher:
        st.distill = teacher_for(cfg, st.objective.refreshes_teacher)
    before = [p.detach().clone() for p in st.model.parameters()]
    for i in range(3):
        m = st.step_on(*batch(cfg, i, paired=st.objective.uses_pairs))
        assert torch.isfinite(m["loss"]) and torch.isfinite(m["grad_norm"])
    assert st.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, st.model.parameters()))
    assert st.model.ignore_k == (not st.objective.uses_step_level)


def test_distillation_without_a_teacher_names_the_role():
    cfg = config("consistency_distillation")
    st = TrainState.create(cfg, "cpu")
    with pytest.raises(ValueError, match="teacher_ema"):
        st.step_on(*batch(cfg, 0))
