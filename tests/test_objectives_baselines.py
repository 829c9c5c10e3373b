"""Consistency training / distillation and progressive distillation against ALGORITHM §6.2-6.4, pitfalls 22-23.

Every target is compared element-wise with the formula of §6 evaluated by hand on injected draws, with
fake networks by role that record their calls.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from shortcut_ray.config import ObjectiveConfig
from shortcut_ray.objectives import Networks, build_objective
from shortcut_ray.objectives.consistency import LevelDraws, curriculum_level
from shortcut_ray.sampler import fixed_noise, sample

EPS = 1e-5
C, H, B, NULL = 2, 4, 16, 10


def obj(train_type, batch=B, **kw):
    return build_objective(ObjectiveConfig(train_type=train_type, **kw), num_classes=NULL, global_batch=batch)


def batch(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, H, generator=g), torch.randint(0, NULL, (n,), generator=g)


def rowv(x):
    return x.view(-1, 1, 1, 1)


def interp(x0, x1, t, eps=EPS):
    return (1 - (1 - eps) * rowv(t)) * x0 + rowv(t) * x1


def linear(a, b, c):
    """f(x, t, k, y) = a x + b t + c k: a closed form for every target."""
    return lambda x, t, k, y: a * x + b * rowv(t) + c * rowv(k.float())


def label_fake(cond, uncond):
    """Returns `uncond` on rows with the null label and `cond` elsewhere."""
    return lambda x, t, k, y: torch.where(rowv(y) == NULL, uncond, cond).expand_as(x).clone()


def never(x, t, k, y):
    raise AssertionError("this network must not be called")


def draws_at(level, x0, j):
    return LevelDraws(x0, j.float() / 2 ** level, level)


# -- curricula (pitfall 22) ------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps", [700, 1000, 7, 9])
def test_ct_curriculum_is_the_official_formula_clamped(max_steps):
    for step in range(max_steps + 1):
        official = math.floor(Fraction(step) / (Fraction(max_steps) / 7))  # floor(step / (max_steps / 7))
        assert curriculum_level(step, max_steps, 7) == min(official, 6)
    o = obj("consistency")
    assert o.level(0, 700) == 0 and o.level(99, 700) == 0 and o.level(100, 700) == 1
    assert o.level(699, 700) == 6 and o.level(700, 700) == 6  # the formula's 7 at step == max is clamped


def test_pd_stages_run_fine_to_coarse_and_refresh_at_switches():
    o = obj("progressive")
    assert [o.level(s, 700) for s in (0, 99, 100, 199, 600, 699, 700)] == [6, 6, 5, 5, 0, 0, 0]
    for max_steps in (700, 1000, 9):
        for step in range(max_steps + 1):
            stage = min(6, math.floor(Fraction(step) / (Fraction(max_steps) / 7)))
            assert o.level(step, max_steps) == 6 - stage
    from shortcut_ray.teacher import pd_stage  # the teacher refresh uses the same stage formula

    assert all(pd_stage(s, m) == o.stage(s, m) for m in (700, 1000, 9) for s in range(-1, m + 1))
    assert o.refreshes_teacher and not obj("consistency_distillation").refreshes_teacher


@pytest.mark.parametrize("train_type", ["consistency", "progressive"])
def test_level_draws_on_the_grid_of_the_stage(train_type):
    o = obj(train_type, batch=512)
    x1, _ = batch(512)
    for step in range(0, 700, 50):
        d = o.draw(x1, torch.Generator().manual_seed(step), step, 700)
        k = o.level(step, 700)
        assert d.k == k and d.x0.shape == x1.shape
        scaled = d.t * 2 ** k
        assert torch.equal(scaled, scaled.round()) and d.t.max() <= 1 - 2.0 ** -k
        assert len(set(scaled.tolist())) == min(2 ** k, 512) or k >= 6  # every grid point is reachable
        if k == 0:
            assert torch.all(d.t == 0)


def test_cd_draws_use_the_finest_grid():
    o = obj("consistency_distillation", batch=256)
    d = o.draw(batch(256)[0], torch.Generator().manual_seed(0), 5, 10)
    assert d.k == 7 and torch.equal(d.t * 128, (d.t * 128).round()) and d.t.max() <= 127 / 128


# -- consistency training (§6.2) ---------------------------------------------------------------------
def test_ct_target_closed_form_and_calls(recorder):
    a, b, c = 0.3, -0.7, 0.05
    o = obj("consistency", class_dropout_prob=1.0)
    x1, y = batch()
    k = 3
    x0, j = torch.randn(B, C, H, H), torch.randint(0, 8, (B,))
    draws = draws_at(k, x0, j)
    ema = recorder(linear(a, b, c))
    rows = o.targets(x1, y, draws, Networks(online=never, ema=ema), step=300, max_steps=700)
    t = j.float() / 8
    t2 = t + 1 / 8
    x_t, x_t2 = interp(x0, x1, t), interp(x0, x1, t2)  # the same x0 and x1: one straight path
    f = a * x_t2 + b * rowv(t2) + c * k  # the EMA at level k itself (not k+1)
    expected = (x_t2 + rowv(1 - t2) * f - x_t) / rowv(1 - t)
    torch.testing.assert_close(rows.target, expected)
    torch.testing.assert_close(rows.x_t, x_t)
    assert torch.equal(rows.t, t) and torch.all(rows.k == k)
    assert len(ema.calls) == 1
    call = ema.calls[0]
    torch.testing.assert_close(call["x"], x_t2)
    assert torch.equal(call["t"], t2) and torch.all(call["k"] == k)
    assert torch.equal(call["y"], y) and torch.equal(rows.y, y)  # no label dropout even at p = 1
    assert not rows.target.requires_grad


def test_ct_boundary_rows_ignore_the_network():  # pitfall 23: at t2 = 1, F is the identity
    o = obj("consistency")
    x1, y = batch()
    k = 2
    x0, j = torch.randn(B, C, H, H), torch.arange(B) % 4
    rows = o.targets(x1, y, draws_at(k, x0, j), Networks(online=never, ema=lambda x, t, kk, yy: 1e3 + x))
    t = j.float() / 4
    edge = j == 3  # t2 = 3/4 + 1/4 = 1
    x_t2 = interp(x0, x1, torch.ones(B))
    expected = (x_t2 - interp(x0, x1, t)) / rowv(1 - t)
    torch.testing.assert_close(rows.target[edge], expected[edge])
    assert rows.target[~edge].abs().min() > 10  # the other rows do see f = 1e3 + x


def test_ct_first_stage_is_flow_matching_at_t0():
    o = obj("consistency")
    x1, y = batch()
    d = o.draw(x1, torch.Generator().manual_seed(0), step=0, max_steps=700)
    rows = o.targets(x1, y, d, Networks(online=never, ema=linear(1.0, 2.0, 3.0)))
    assert d.k == 0 and torch.all(rows.t == 0)
    torch.testing.assert_close(rows.target, x1 - (1 - EPS) * d.x0)


def test_ct_uses_online_without_bootstrap_ema_and_nulls_unconditional(recorder):
    o = obj("consistency", bootstrap_ema=False, class_conditional=False)
    x1, y = batch()
    online = recorder(linear(0.1, 0.0, 0.0))
    rows = o.targets(x1, y, o.draw(x1, torch.Generator(), 400, 700), Networks(online=online, ema=never))
    assert len(online.calls) == 1 and torch.all(online.calls[0]["y"] == NULL) and torch.all(rows.y == NULL)


def test_consistency_samplers(recorder):
    c = 0.7
    f = recorder(lambda x, t, k, y: torch.full_like(x, c))
    noise, y = fixed_noise((3, C, H, H), 1), torch.zeros(3, dtype=torch.long)
    euler = obj("consistency")
    assert euler.sampler == "euler"
    torch.testing.assert_close(sample(f, noise, y, 4, objective=euler), sample(f, noise, y, 4))
    multi = obj("consistency", sampler="multistep")
    assert multi.sampler == "multistep"
    out = sample(f, noise, y, 2, objective=multi, renoise_seed=5)
    z0 = fixed_noise((3, C, H, H), 5 * 100_003 + 0)  # the re-noise of step 0, fixed by the seed
    x = 0.5 * (noise + 1.0 * c) + 0.5 * z0  # x1_hat = x + (1 - 0) c, re-noised to t = 1/2
    torch.testing.assert_close(out, x + 0.5 * c)  # last step: x1_hat = x + (1 - 1/2) c, no re-noise
    torch.testing.assert_close(sample(f, noise, y, 2, objective=multi, renoise_seed=5), out)
    assert not torch.allclose(sample(f, noise, y, 2, objective=multi, renoise_seed=6), out)
    torch.testing.assert_close(sample(f, noise, y, 1, objective=multi), noise + c)  # one step = Euler


# -- consistency distillation (§6.3) -----------------------------------------------------------------
def test_cd_target_closed_form_and_roles(recorder):
    o = obj("consistency_distillation", class_dropout_prob=1.0)
    x1, y = batch()
    x0, j = torch.randn(B, C, H, H), torch.randint(0, 128, (B,))
    j[0] = 127  # a boundary row
    teacher_ema, student_ema = recorder(linear(0.5, 1.0, 0.0)), recorder(linear(-0.2, 0.3, 0.0))
    nets = Networks(online=never, ema=student_ema, teacher=never, teacher_ema=teacher_ema)
    rows = o.targets(x1, y, draws_at(7, x0, j), nets)
    t = j.float() / 128
    t2 = t + 1 / 128
    x_t = interp(x0, x1, t)
    v1 = 0.5 * x_t + rowv(t)
    x_t2 = torch.clamp(x_t + v1 / 128, -4, 4)
    f = -0.2 * x_t2 + 0.3 * rowv(t2)
    torch.testing.assert_close(rows.target, (x_t2 + rowv(1 - t2) * f - x_t) / rowv(1 - t))
    torch.testing.assert_close(rows.target[0], (x_t2[0] - x_t[0]) * 128)  # t2 = 1: the teacher step alone
    (tc,), (sc,) = teacher_ema.calls, student_ema.calls
    torch.testing.assert_close(tc["x"], x_t)
    assert torch.equal(tc["t"], t) and torch.all(tc["k"] == 7) and torch.all(sc["k"] == 7)
    torch.testing.assert_close(sc["x"], x_t2)
    assert torch.equal(sc["t"], t2)
    assert torch.equal(tc["y"], y) and torch.equal(sc["y"], y) and torch.equal(rows.y, y)  # no dropout


def test_cd_clips_the_teacher_step_not_the_target(recorder):
    o = obj("consistency_distillation")
    x1, y = batch()
    student = recorder(lambda x, t, k, yy: torch.full_like(x, 100.0))
    nets = Networks(online=never, ema=student, teacher_ema=lambda x, t, k, yy: torch.full_like(x, 1e4))
    rows = o.targets(x1, y, draws_at(7, torch.randn(B, C, H, H), torch.zeros(B, dtype=torch.long)), nets)
    assert torch.all(student.calls[0]["x"] == 4.0)  # x_t + 1e4 / 128 clipped to 4
    assert rows.target.abs().max() > 50  # the target itself is not clipped


def test_distillation_without_a_teacher_is_a_clear_error():
    x1, y = batch()
    for name in ("consistency_distillation", "progressive"):
        o = obj(name)
        assert o.needs_teacher
        with pytest.raises(ValueError, match="teacher"):
            o.loss(Networks(online=never, ema=never), x1, y, torch.Generator())


# -- progressive distillation (§6.4) -------------------------------------------------------------------
def test_pd_target_closed_form_and_calls(recorder):
    a, b, c = 0.3, -0.7, 0.05
    o = obj("progressive", class_dropout_prob=1.0)
    x1, y = batch()
    k = 2
    x0, j = torch.randn(B, C, H, H), torch.randint(0, 4, (B,))
    teacher_ema = recorder(linear(a, b, c))
    nets = Networks(online=never, ema=never, teacher=never, teacher_ema=teacher_ema)
    rows = o.targets(x1, y, draws_at(k, x0, j), nets, step=450, max_steps=700)
    t, d = j.float() / 4, 0.25
    x_t = interp(x0, x1, t)
    s1 = a * x_t + b * rowv(t) + c * (k + 1)
    x_mid = torch.clamp(x_t + d / 2 * s1, -4, 4)
    s2 = a * x_mid + b * rowv(t + d / 2) + c * (k + 1)
    torch.testing.assert_close(rows.target, (s1 + s2) / 2)
    assert torch.all(rows.k == k) and torch.equal(rows.y, y)  # student at k, labels never dropped
    assert len(teacher_ema.calls) == 2
    assert all(torch.all(call["k"] == k + 1) for call in teacher_ema.calls)  # teacher at k+1
    assert torch.equal(teacher_ema.calls[1]["t"], t + d / 2)


def test_pd_clips_x_mid_only_and_picks_the_teacher_by_bootstrap_ema(recorder):
    x1, y = batch()
    draws = draws_at(0, torch.randn(B, C, H, H), torch.zeros(B, dtype=torch.long))
    teacher = recorder(lambda x, t, k, yy: torch.full_like(x, 100.0))
    o = obj("progressive", bootstrap_ema=False)
    rows = o.targets(x1, y, draws, Networks(online=never, ema=never, teacher=teacher, teacher_ema=never))
    assert torch.all(teacher.calls[1]["x"] == 4.0)  # x' = clip(x_t + 100 / 2)
    assert torch.all(rows.target == 100.0)  # no final clip


@pytest.mark.parametrize("bootstrap_cfg", [True, False])
def test_pd_cfg_only_in_the_first_stage(recorder, bootstrap_cfg):
    w = 1.5
    o = obj("progressive", bootstrap_cfg=bootstrap_cfg, cfg_scale=w)
    x1, y = batch()
    for step, k, guided in ((0, 6, bootstrap_cfg), (100, 5, False), (699, 0, False)):
        teacher = recorder(label_fake(2.0, 1.0))
        draws = o.draw(x1, torch.Generator().manual_seed(step), step, 700)
        assert draws.k == k
        rows = o.targets(x1, y, draws, Networks(online=never, teacher_ema=teacher), step, 700)
        expected = 1 + w * (2 - 1) if guided else 2.0
        assert torch.allclose(rows.target, torch.full_like(rows.target, expected))
        for call in teacher.calls:
            if guided:  # one call of 2B rows: [x; x] with labels [y; null]
                assert call["x"].shape[0] == 2 * B and torch.equal(call["y"], torch.cat([y, torch.full_like(y, NULL)]))
            else:
                assert call["x"].shape[0] == B and torch.equal(call["y"], y)


# -- FLOP accounting -----------------------------------------------------------------------------------
def test_extra_forwards_per_row():
    assert obj("shortcut", batch=64).extra_forwards_per_row == 2 * 8 / 64
    assert obj("shortcut", batch=256, bootstrap_cfg=True).extra_forwards_per_row == 2 * (32 + 4) / 256
    assert obj("flow_matching").extra_forwards_per_row == 0
    assert obj("consistency").extra_forwards_per_row == 1
    assert obj("consistency_distillation").extra_forwards_per_row == 2
    assert obj("progressive").extra_forwards_per_row == 2
    assert obj("progressive", bootstrap_cfg=True).extra_forwards_per_row == 2 + 2 / 7
