"""Every objective through TrainState.step_on (networks by role, step/max_steps, teacher refresh), single process."""

from __future__ import annotations

import copy

import pytest
import torch

from shortcut_ray.config import Config, DataConfig, ObjectiveConfig, TrainConfig
from shortcut_ray.model import ShortcutDiT, model_config
from shortcut_ray.objectives import names
from shortcut_ray.train_step import TrainState

C, S, NC, B = 1, 8, 10, 16


def config(train_type: str, max_steps: int = 7, **objective) -> Config:
    return Config(model=model_config("DiT-T/2", hidden_size=32, depth=1),
                  objective=ObjectiveConfig(train_type=train_type,
                                            bootstrap_every=2 if train_type == "live_reflow" else 8, **objective),
                  data=DataConfig(image_size=S, channels=C, num_classes=NC),
                  train=TrainConfig(global_batch=B if train_type != "shortcut" else 64, max_steps=max_steps,
                                    precision="fp32"))


def teacher_for(cfg: Config, seed: int = 3) -> ShortcutDiT:
    torch.manual_seed(seed)
    m = ShortcutDiT(cfg.model, S, C, NC, ignore_k=True)
    with torch.no_grad():
        for p in m.final.parameters():
            p.normal_(std=0.05)  # a non-zero "pretrained" output
    return m


def batch(cfg: Config, seed: int, paired: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = cfg.train.global_batch
    return torch.randn(n, 2 * C if paired else C, S, S, generator=g), torch.randint(0, NC, (n,), generator=g)


@pytest.mark.parametrize("train_type", names())
def test_every_objective_trains(train_type):
    cfg = config(train_type)
    kw = {}
    if train_type in ("consistency_distillation", "progressive"):
        t = teacher_for(cfg)
        kw = dict(teacher=t, teacher_ema=copy.deepcopy(t))
    st = TrainState.create(cfg, "cpu", **kw)
    before = [p.detach().clone() for p in st.model.parameters()]
    for i in range(3):
        m = st.step_on(*batch(cfg, i, paired=train_type == "reflow"))
        assert torch.isfinite(m["loss"]) and torch.isfinite(m["grad_norm"])
    assert st.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, st.model.parameters()))
    assert st.model.ignore_k == (not st.objective.uses_step_level)


def test_progressive_refreshes_the_teacher_at_each_stage_switch():
    cfg = config("progressive", max_steps=14)  # 7 stages of 2 steps
    t = teacher_for(cfg)
    st = TrainState.create(cfg, "cpu", teacher=t, teacher_ema=copy.deepcopy(t))
    original = [p.detach().clone() for p in st.teacher_ema.parameters()]
    st.step_on(*batch(cfg, 0))
    st.step_on(*batch(cfg, 1))  # steps 0, 1: stage 0, the original teacher
    assert all(torch.equal(a, b) for a, b in zip(original, st.teacher_ema.parameters()))
    student, student_ema = ([p.detach().clone() for p in m.parameters()] for m in (st.model, st.ema))
    st.step_on(*batch(cfg, 2))  # step 2: stage 1 starts, the teacher is the student as it was before this step
    assert all(torch.equal(a, b) for a, b in zip(student, st.teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(student_ema, st.teacher_ema.parameters()))
    assert not any(p.requires_grad for p in st.teacher_ema.parameters())


def test_distillation_without_teacher_or_with_a_wrong_one():
    cfg = config("consistency_distillation")
    st = TrainState.create(cfg, "cpu")
    with pytest.raises(ValueError, match="teacher_ema"):
        st.step_on(*batch(cfg, 0))
    wrong = ShortcutDiT(model_config("DiT-T/2", hidden_size=64, depth=1), S, C, NC, ignore_k=True)
    with pytest.raises(ValueError, match="do not match the student"):
        TrainState.create(cfg, "cpu", teacher=wrong, teacher_ema=wrong)
