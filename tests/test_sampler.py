"""Any-step sampler (ALGORITHM §4, pitfalls 1, 2, 20) and the oracle-velocity checks of §9.1."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from shortcut_ray.config import ObjectiveConfig
from shortcut_ray.objectives import Networks, build_objective
from shortcut_ray.sampler import fixed_noise, k_for_steps, sample, step_schedule


def test_levels_for_power_of_two_steps():  # pitfall 2
    assert k_for_steps(1) == 0 and k_for_steps(128) == 7
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        sched = step_schedule(n)
        assert sched == [(i / n, int(math.log2(n))) for i in range(n)]


def test_non_power_of_two_budget_rule():
    assert step_schedule(3) == [(0.0, 1), (0.5, 2), (0.75, 2)]  # d = 1/2, 1/4, 1/4
    assert [k for _, k in step_schedule(5)] == [2, 2, 2, 3, 3]
    for n in range(1, 129):
        sched = step_schedule(n)
        assert len(sched) == n
        assert sum(2.0 ** -k for _, k in sched) == 1.0
        assert all(0 <= k <= 7 for _, k in sched)
        ks = [k for _, k in sched]
        assert ks == sorted(ks)  # big steps first


@pytest.mark.parametrize("bad", [0, -1, 129, 256, 2.5, True])
def test_invalid_step_counts_raise(bad):  # pitfall 20
    with pytest.raises(ValueError):
        step_schedule(bad)
    with pytest.raises(ValueError):
        sample(lambda x, t, k, y: x, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), bad)


def test_sampler_starts_at_noise_and_steps(recorder):  # pitfall 1
    rec = recorder(lambda x, t, k, y: torch.ones_like(x))
    x = sample(rec, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 4)
    assert rec.calls[0]["t"].tolist() == [0.0, 0.0]
    assert [c["t"][0].item() for c in rec.calls] == [0, 0.25, 0.5, 0.75]
    assert all(c["k"][0].item() == 2 for c in rec.calls)
    torch.testing.assert_close(x, torch.ones(2, 1, 2, 2))  # x0 + sum d * 1


def test_cfg_combination(recorder):
    f = lambda x, t, k, y: torch.where(y == 10, 1.0, 3.0).view(-1, 1, 1, 1).expand_as(x).clone()
    y = torch.tensor([0, 1])
    out = sample(f, torch.zeros(2, 1, 1, 1), y, 1, cfg_scale=2.0, null_label=10)
    assert torch.all(out == 1 + 2 * (3 - 1))
    out0 = sample(f, torch.zeros(2, 1, 1, 1), y, 1, cfg_scale=0.0, null_label=10)
    assert torch.all(out0 == 1)
    with pytest.raises(ValueError, match="null_label"):
        sample(f, torch.zeros(2, 1, 1, 1), y, 1, cfg_scale=2.0)


def test_fixed_noise_same_for_every_call():
    assert torch.equal(fixed_noise((3, 1, 4, 4), 42), fixed_noise((3, 1, 4, 4), 42))
    assert not torch.equal(fixed_noise((3, 1, 4, 4), 42), fixed_noise((3, 1, 4, 4), 43))


# -- §9.1 oracle velocity of a Gaussian mixture (8 modes on a circle of radius 2, std 0.1) ---------
ANGLES = torch.arange(8) * 2 * math.pi / 8
MU = torch.stack([2 * torch.cos(ANGLES), 2 * torch.sin(ANGLES)], dim=1).double()  # (8, 2)
SIGMA = 0.1


def oracle(x, t, k, y):
    """Exact marginal velocity E[x1|x_t] - E[x0|x_t] for x_t = (1-t) x0 + t x1 (eps = 0)."""
    xt = x.view(-1, 2).double()
    tt = t.double().view(-1, 1, 1).clamp(max=1 - 1e-6)
    var = (1 - tt) ** 2 + tt ** 2 * SIGMA ** 2  # (B, 1, 1)
    diff = xt[:, None, :] - tt * MU[None]  # (B, 8, 2)
    logw = -(diff ** 2).sum(-1) / (2 * var[..., 0]) - torch.log(var[..., 0])
    w = torch.softmax(logw, dim=1)[..., None]  # (B, 8, 1)
    e_x1 = MU[None] + tt * SIGMA ** 2 * diff / var
    e_x0 = (1 - tt) * diff / var
    return ((w * (e_x1 - e_x0)).sum(1)).float().view_as(x)


def on_mode(x):
    d = torch.cdist(x.view(-1, 2).double(), MU)
    return (d.min(dim=1).values < 3 * SIGMA).float().mean().item()


def test_oracle_one_step_collapses_to_mean():
    noise = fixed_noise((4096, 2, 1, 1), 0)
    y = torch.zeros(4096, dtype=torch.long)
    x1 = sample(oracle, noise, y, 1)
    assert x1.view(-1, 2).norm(dim=1).mean() < 0.05  # x0 + v*(x0, 0) = E[x1] = 0
    assert on_mode(x1) == 0.0


def test_oracle_many_steps_recover_data():
    noise = fixed_noise((4096, 2, 1, 1), 0)
    y = torch.zeros(4096, dtype=torch.long)
    assert on_mode(sample(oracle, noise, y, 128)) > 0.95
    # monotone in N, matching ALGORITHM §9.1's measured 0.00 / 0.05 / 0.78 / 0.98 / 0.99
    fr = [on_mode(sample(oracle, noise, y, n)) for n in (1, 4, 8)]
    assert fr[0] < 0.05 and 0.6 < fr[1] < 0.9 and fr[2] > 0.93


def test_bootstrap_target_from_oracle_equals_two_half_steps():
    o = build_objective(ObjectiveConfig(eps=0.0, clip_bootstrap=1e9), num_classes=1, global_batch=256)
    g = torch.Generator().manual_seed(0)
    x1 = (MU[torch.randint(0, 8, (256,), generator=g)] + SIGMA * torch.randn(256, 2, generator=g).double())
    x1 = x1.float().view(256, 2, 1, 1)
    y = torch.zeros(256, dtype=torch.long)
    d = o.draw(x1, g)
    rows = o.targets(x1, y, d, Networks(online=oracle, ema=oracle))
    nb = o.layout.n_boot
    for i in range(nb):  # explicit Euler half-steps, one row at a time
        k = int(o.layout.k_boot[i])
        dd = 2.0 ** -k
        x, t = rows.x_t[i:i + 1], rows.t[i:i + 1]
        s1 = oracle(x, t, None, None)
        s2 = oracle(x + dd / 2 * s1, t + dd / 2, None, None)
        torch.testing.assert_close(rows.target[i:i + 1], (s1 + s2) / 2)
        assert rows.k[i].item() == k


def test_maths_layer_imports_neither_ray_nor_mlflow():
    code = ("import sys; import shortcut_ray, shortcut_ray.model, shortcut_ray.objectives, shortcut_ray.sampler, "
            "shortcut_ray.ema, shortcut_ray.optim, shortcut_ray.config, shortcut_ray.presets; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
