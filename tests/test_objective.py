"""Shortcut and flow-matching objectives against ALGORITHM §2 and pitfalls 1, 2, 8-17, 21."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shortcut_ray.config import ObjectiveConfig
from shortcut_ray.objectives import (FlowMatchingObjective, Networks, ShortcutObjective, bootstrap_levels,
                                     build_objective, flow_velocity, interpolate)

EPS = 1e-5
C, H = 2, 4  # tiny "images" (B, 2, 4, 4)


def obj(batch=64, world=1, rank=0, **kw) -> ShortcutObjective:
    return build_objective(ObjectiveConfig(**kw), num_classes=10, global_batch=batch, rank=rank, world=world)


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, H, generator=g), torch.randint(0, 10, (n,), generator=g)


def draws_for(o, x1, seed=1):
    return o.draw(x1, torch.Generator().manual_seed(seed))


def const(value):
    return lambda x, t, k, y: torch.full_like(x, value)


# -- pitfall 1 and 17: conventions ------------------------------------------------------------------
def test_interpolation_and_flow_target_exact():
    x0, x1 = torch.randn(3, C, H, H), torch.randn(3, C, H, H)
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(3), EPS), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(3), EPS), x1 + EPS * x0)
    t = torch.tensor([0.25, 0.5, 0.9])
    expected = (1 - (1 - EPS) * t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
    torch.testing.assert_close(interpolate(x0, x1, t, EPS), expected, rtol=0, atol=0)
    torch.testing.assert_close(flow_velocity(x0, x1, EPS), x1 - (1 - EPS) * x0, rtol=0, atol=0)


# -- pitfall 9: layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("b,expected", [(256, {0: 8, **{k: 4 for k in range(1, 7)}}),
                                        (64, {0: 2, **{k: 1 for k in range(1, 7)}})])
def test_level_histogram(b, expected):
    levels, n_cfg = bootstrap_levels(b // 8, 7, 0)
    assert dict(Counter(levels.tolist())) == expected
    assert n_cfg == b // 8 // 7
    assert levels[: (b // 8 // 7)].eq(6).all()  # the CFG prefix is the k = 6 rows


def test_dt_bias_layout():
    levels, n_cfg = bootstrap_levels(32, 7, 1)
    assert dict(Counter(levels.tolist())) == {6: 2, 5: 2, 4: 2, 3: 2, 2: 2, 1: 8, 0: 14} and n_cfg == 2


@pytest.mark.parametrize("world", [2, 4, 8])
def test_global_histogram_unchanged_across_ranks(world):
    single = obj(256).layout.k_boot
    per_rank = [obj(256, world=world, rank=r).layout for r in range(world)]
    union = torch.cat([lay.k_boot for lay in per_rank])
    assert Counter(union.tolist()) == Counter(single.tolist())
    assert all(lay.n_boot == 32 // world and lay.local_batch == 256 // world for lay in per_rank)
    # CFG rows: the global first n_cfg rows, dealt round-robin
    cfg_rows = sum(obj(256, world=world, rank=r, bootstrap_cfg=True).layout.n_cfg for r in range(world))
    assert cfg_rows == 4


# -- pitfall 8: bootstrap t on the grid of d ------------------------------------------------------
def test_bootstrap_t_on_grid():
    o = obj(256 * 8)  # B_b = 256 rows per draw
    x1, _ = batch(256 * 8)
    k = o.layout.k_boot.float()
    for seed in range(40):  # > 10k bootstrap t draws
        t = draws_for(o, x1, seed).t_boot
        scaled = t * 2 ** k
        assert torch.equal(scaled, scaled.round())
        assert torch.all(t <= 1 - 2 ** -k)
        assert torch.all(t[k == 0] == 0)
    flow_t = draws_for(o, x1).t_flow
    assert torch.equal(flow_t * 128, (flow_t * 128).round()) and flow_t.max() < 1


# -- pitfall 10: half-steps -------------------------------------------------------------------------
def test_linear_fake_model_closed_form():
    a, bb, c = 0.3, -0.7, 0.05
    fake = lambda x, t, k, y: a * x + bb * t.view(-1, 1, 1, 1) + c * k.float().view(-1, 1, 1, 1)
    o = obj(64, clip_bootstrap=1e9)
    x1, y = batch()
    d = draws_for(o, x1)
    rows = o.targets(x1, y, d, Networks(online=const(0.0), ema=fake))
    nb = o.layout.n_boot
    k = o.layout.k_boot.float().view(-1, 1, 1, 1)
    dd = 2 ** -k
    t = d.t_boot.view(-1, 1, 1, 1)
    x_t = interpolate(d.x0_boot, x1[d.perm][:nb], d.t_boot, EPS)
    s1 = a * x_t + bb * t + c * (k + 1)  # queried at level k+1
    x_mid = x_t + dd / 2 * s1
    s2 = a * x_mid + bb * (t + dd / 2) + c * (k + 1)  # second query at t + d/2
    torch.testing.assert_close(rows.target[:nb], (s1 + s2) / 2)
    torch.testing.assert_close(rows.x_t[:nb], x_t)


def test_constant_velocity_target_is_the_constant(recorder):
    o = obj(64)
    x1, y = batch()
    teacher = recorder(const(0.25))
    rows = o.targets(x1, y, draws_for(o, x1), Networks(online=const(0.0), ema=teacher))
    assert torch.all(rows.target[: o.layout.n_boot] == 0.25)
    # both teacher calls at level k + 1 (pitfall 2), the second at t + d/2
    k = o.layout.k_boot
    assert len(teacher.calls) == 2
    for call in teacher.calls:
        assert torch.equal(call["k"], k + 1)
    torch.testing.assert_close(teacher.calls[1]["t"], teacher.calls[0]["t"] + 2.0 ** -k.float() / 2)


# -- pitfall 11: clipping -----------------------------------------------------------------------------
def test_clipping_bootstrap_only(recorder):
    o = obj(64)
    x1, y = batch()
    teacher = recorder(const(100.0))
    d = draws_for(o, x1)
    rows = o.targets(x1, y, d, Networks(online=const(0.0), ema=teacher))
    nb = o.layout.n_boot
    assert torch.all(rows.target[:nb] == 4.0)
    x_mid, x_t = teacher.calls[1]["x"], teacher.calls[0]["x"]
    half = (2.0 ** -o.layout.k_boot.float() / 2).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_mid, torch.clamp(x_t + half * 100.0, -4, 4))
    big = o.layout.k_boot <= 2  # d/2 * 100 >= 12.5: every element of these rows hits the clip
    assert torch.all(x_mid[big] == 4.0)
    flow = flow_velocity(d.x0_flow, x1[d.perm][nb:], EPS)
    torch.testing.assert_close(rows.target[nb:], flow)  # flow rows untouched, unclipped
    assert rows.target[nb:].abs().max() > 0  # and not all zeros


# -- pitfall 12: EMA teacher ------------------------------------------------------------------------
def test_targets_come_from_teacher_not_online(recorder):
    o = obj(64)
    x1, y = batch()
    online, teacher = recorder(const(1.0)), recorder(const(-1.0))
    rows = o.targets(x1, y, draws_for(o, x1), Networks(online=online, ema=teacher))
    assert len(online.calls) == 0 and len(teacher.calls) == 2
    assert torch.all(rows.target[: o.layout.n_boot] == -1.0)


# -- pitfall 13: no gradient through targets -------------------------------------------------------
def test_no_gradient_through_targets():
    torch.manual_seed(0)
    lin = torch.nn.Conv2d(C, C, 1)
    f = lambda x, t, k, y: lin(x)
    o = obj(64)
    x1, y = batch()
    d = draws_for(o, x1)
    rows = o.targets(x1, y, d, Networks(online=f, ema=f))  # teacher = online (bootstrap_ema=0 style)
    assert not rows.target.requires_grad
    out = o.loss_on(f, rows)
    g1 = torch.autograd.grad(out.loss, list(lin.parameters()))
    rows_detached = o.targets(x1, y, d, Networks(online=f, ema=f))
    pred = f(rows_detached.x_t, None, None, None)
    manual = (pred - rows_detached.target.detach()).pow(2).flatten(1).mean(1).mean()
    g2 = torch.autograd.grad(manual, list(lin.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# -- pitfall 14: label dropout only on flow rows; null id ----------------------------------------
def test_label_dropout_flow_rows_only(recorder):
    o = obj(64, class_dropout_prob=1.0, bootstrap_cfg=False)
    x1, y = batch()
    teacher = recorder(lambda x, t, k, yy: yy.float().view(-1, 1, 1, 1).expand_as(x).clone())
    d = draws_for(o, x1)
    rows = o.targets(x1, y, d, Networks(online=const(0.0), ema=teacher))
    nb = o.layout.n_boot
    for call in teacher.calls:
        assert not torch.any(call["y"] == 10)
        assert torch.equal(call["y"], y[d.perm][:nb])
    assert torch.all(rows.y[nb:] == 10) and torch.equal(rows.y[:nb], y[d.perm][:nb])
    o2 = obj(64, class_dropout_prob=0.0)
    rows2 = o2.targets(x1, y, draws_for(o2, x1), Networks(online=const(0.0), ema=const(0.0)))
    assert not torch.any(rows2.y == 10)


def test_unconditional_all_null():
    o = obj(64, class_conditional=False, class_dropout_prob=0.0)
    x1, y = batch()
    rows = o.targets(x1, y, draws_for(o, x1), Networks(online=const(0.0), ema=const(0.0)))
    assert torch.all(rows.y == 10)


# -- pitfall 15: bootstrap CFG --------------------------------------------------------------------
def test_bootstrap_cfg_only_first_rows():
    w = 1.5
    o = obj(256, bootstrap_cfg=True, cfg_scale=w, clip_bootstrap=1e9)
    x1, y = batch(256)
    # output 2 for real labels, 1 for the null label: guided = 1 + w (2 - 1) = 2.5
    fake = lambda x, t, k, yy: torch.where(yy == 10, 1.0, 2.0).view(-1, 1, 1, 1).expand_as(x).clone()
    rows = o.targets(x1, y, draws_for(o, x1), Networks(online=const(0.0), ema=fake))
    n_cfg, nb = o.layout.n_cfg, o.layout.n_boot
    assert n_cfg == 4
    assert torch.all(rows.target[:n_cfg] == 1 + w * (2 - 1))
    assert torch.all(rows.target[n_cfg:nb] == 2.0)
    assert torch.all(o.layout.k_boot[:n_cfg] == 6)


# -- pitfall 16: loss reduction -------------------------------------------------------------------
def test_loss_is_mean_of_row_mses():
    o = obj(64)
    x1, y = batch()
    online = lambda x, t, k, yy: x * 0.5 + k.float().view(-1, 1, 1, 1) * 0.01
    rows = o.targets(x1, y, draws_for(o, x1), Networks(online=online, ema=const(0.3)))
    out = o.loss_on(online, rows)
    per_row = torch.stack([((online(rows.x_t[i:i + 1], rows.t[i:i + 1], rows.k[i:i + 1], rows.y[i:i + 1])
                            - rows.target[i:i + 1]) ** 2).mean() for i in range(64)])
    torch.testing.assert_close(out.loss, per_row.mean())
    torch.testing.assert_close(out.metrics["loss_bootstrap"], per_row[:8].mean())
    torch.testing.assert_close(out.metrics["loss_flow"], per_row[8:].mean())
    assert out.metrics["bootstrap_ratio"].item() == pytest.approx(1 / 8)
    assert o.layout.n_boot == 8 and rows.n_boot == 8
    assert torch.all(rows.k[8:] == 7)  # flow rows at the base level (pitfall 2)


# -- pitfall 21: per-step permutation -------------------------------------------------------------
def test_bootstrap_rows_vary_across_steps():
    o = obj(64)
    x1, _ = batch()
    firsts = {tuple(draws_for(o, x1, seed).perm[:8].tolist()) for seed in range(5)}
    assert len(firsts) == 5


def test_draws_are_the_only_randomness():
    o = obj(64)
    x1, y = batch()
    d = draws_for(o, x1, 7)
    f = lambda x, t, k, yy: torch.sin(x) + t.view(-1, 1, 1, 1)
    torch.manual_seed(123)
    a = o.targets(x1, y, d, Networks(online=f, ema=f))
    torch.manual_seed(456)
    b = o.targets(x1, y, d, Networks(online=f, ema=f))
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)


def test_flow_matching_objective_has_no_bootstrap_rows():
    o = build_objective(ObjectiveConfig(train_type="flow_matching"), 10, 64)
    assert isinstance(o, FlowMatchingObjective) and not o.uses_step_level and o.layout.n_boot == 0
    x1, y = batch()
    out = o.loss(Networks(const(0.0), const(0.0)), x1, y, torch.Generator().manual_seed(0))
    assert "loss_bootstrap" not in out.metrics and torch.isfinite(out.loss)


def test_wrong_local_batch_is_clear():
    o = obj(64, world=2)
    with pytest.raises(ValueError, match="local batch of 32"):
        o.draw(torch.randn(64, C, H, H), torch.Generator())


def test_per_level_metrics_average_to_global_means_across_ranks():
    """Every rank reports the same metric keys; their mean over ranks is the global per-level loss."""
    x1, y = batch(256)
    online = lambda x, t, k, yy: 0.1 * x + 0.01 * k.float().view(-1, 1, 1, 1)
    single = obj(256)
    d1 = draws_for(single, x1)
    rows1 = single.targets(x1, y, d1, Networks(online, const(0.2)))
    ref = single.loss_on(online, rows1).metrics
    world = 4
    outs = [obj(256, world=world, rank=r) for r in range(world)]
    keys = None
    per_rank = []
    for r, o in enumerate(outs):
        rows = o.targets(x1[r::world][: 64], y[r::world][: 64], draws_for(o, x1[:64], seed=r), Networks(online, const(0.2)))
        m = o.loss_on(online, rows).metrics
        keys = keys or set(m)
        assert set(m) == keys  # identical keys, so an all-reduce over a stacked vector lines up
        per_rank.append(m)
    assert {f"loss_bootstrap_k{k}" for k in range(7)} <= keys
    for k in range(7):  # compare with the per-row losses of each rank, pooled by level by hand
        pooled = []
        for r, o in enumerate(outs):
            rows = o.targets(x1[r::world][: 64], y[r::world][: 64], draws_for(o, x1[:64], seed=r),
                             Networks(online, const(0.2)))
            pred = online(rows.x_t, rows.t, rows.k, rows.y)
            per_row = (pred - rows.target).pow(2).flatten(1).mean(1)[: o.layout.n_boot]
            pooled.append(per_row[o.layout.k_boot == k])
        mean_over_ranks = sum(m[f"loss_bootstrap_k{k}"] for m in per_rank) / world
        torch.testing.assert_close(mean_over_ranks, torch.cat(pooled).mean())
    assert set(ref) == keys
