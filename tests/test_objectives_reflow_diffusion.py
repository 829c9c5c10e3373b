"""Live reflow, paired flow matching and diffusion (ALGORITHM §6.1, §6.5, §6.6); the registry; guided velocity."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from shortcut_ray.config import Config, ConfigError, ObjectiveConfig, TrainConfig
from shortcut_ray.objectives import Draws, Networks, build_objective, guided_velocity, names, objective_class
from shortcut_ray.objectives.reflow import PairDraws
from shortcut_ray.sampler import fixed_noise, sample

C, H, NULL = 2, 4, 10


def obj(train_type, batch=64, **kw):
    return build_objective(ObjectiveConfig(train_type=train_type, **kw), num_classes=NULL, global_batch=batch)


def data(n=64, seed=0, channels=C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, H, H, generator=g), torch.randint(0, NULL, (n,), generator=g)


def rowv(x):
    return x.view(-1, 1, 1, 1)


def never(x, t, k, y):
    raise AssertionError("this network must not be called")


def label_fake(cond, uncond):
    return lambda x, t, k, y: torch.where(rowv(y) == NULL, uncond, cond).expand_as(x).clone()


# -- registry and config --------------------------------------------------------------------------
def test_registry_is_the_config_vocabulary():
    assert names() == ("shortcut", "flow_matching", "consistency", "consistency_distillation", "progressive",
                       "live_reflow", "reflow", "diffusion")
    for name in names():
        assert ObjectiveConfig(train_type=name).train_type == name
    for alias, name in (("naive", "flow_matching"), ("livereflow", "live_reflow"),
                        ("consistency-distillation", "consistency_distillation")):
        assert ObjectiveConfig(train_type=alias).train_type == name
    with pytest.raises(ConfigError, match="live_reflow"):
        ObjectiveConfig(train_type="rectified")
    with pytest.raises(ConfigError, match="sampler"):
        ObjectiveConfig(sampler="heun")


def test_conditioning_and_sampler_properties():
    uses_k = {n for n in names() if objective_class(n).uses_step_level}
    assert uses_k == {"shortcut", "live_reflow"}  # all others are built with ignore_dt (§1.1, §6)
    assert {n for n in names() if objective_class(n).needs_teacher} == {"consistency_distillation", "progressive"}
    assert obj("diffusion").sampler == "ddim" and obj("consistency", sampler="multistep").sampler == "multistep"


def test_config_validates_live_reflow_rows():
    with pytest.raises(ConfigError, match="reflow rows"):
        Config(objective=ObjectiveConfig(train_type="live_reflow"), train=TrainConfig(global_batch=24, num_workers=4))
    Config(objective=ObjectiveConfig(train_type="live_reflow"), train=TrainConfig(global_batch=32, num_workers=4))


def test_config_and_registry_import_neither_torch_nor_models():
    code = ("import sys; import shortcut_ray.config as c, shortcut_ray.objectives as o; "
            "c.ObjectiveConfig(train_type='naive'); o.names(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('shortcut_ray.objectives.b')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_objectives_import_neither_ray_nor_mlflow():
    code = ("import sys, importlib; from shortcut_ray.objectives import registry; "
            "[registry.objective_class(n) for n in registry.names()]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_does_not_import_the_objectives():
    code = ("import sys; import shortcut_ray.model; "
            "assert not [m for m in sys.modules if m.startswith('shortcut_ray.objectives')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- guided velocity: one helper for sampler and targets ----------------------------------------------
def test_guided_velocity_rows_weights_and_calls(recorder):
    x, t, k = torch.zeros(4, 1, 1, 1), torch.zeros(4), torch.zeros(4, dtype=torch.long)
    y = torch.tensor([0, 1, 2, 3])
    f = recorder(label_fake(3.0, 1.0))
    out = guided_velocity(f, x, t, k, y, 2.0, NULL, n_guided=2)
    assert out.flatten().tolist() == [1 + 2 * (3 - 1)] * 2 + [3.0] * 2
    (call,) = f.calls
    assert call["x"].shape[0] == 6 and call["y"].tolist() == [0, 1, 2, 3, NULL, NULL]
    f.calls.clear()
    assert guided_velocity(f, x, t, k, y, 1.0, NULL).flatten().tolist() == [3.0] * 4  # w = 1: one B-row call
    assert guided_velocity(f, x, t, k, y, 0.0, NULL).flatten().tolist() == [1.0] * 4  # w = 0: null only
    assert [c["x"].shape[0] for c in f.calls] == [4, 4] and f.calls[1]["y"].eq(NULL).all()
    with pytest.raises(ValueError, match="null label"):
        guided_velocity(f, x, t, k, y, 1.5, None)


# -- live reflow (§6.5) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 4])
def test_live_reflow_layout(world):
    per_rank = [build_objective(ObjectiveConfig(train_type="live_reflow"), NULL, 64, r, world).layout
                for r in range(world)]
    assert sum(lay.n_boot for lay in per_rank) == 64 // 8  # B_b over the GLOBAL batch
    assert all(lay.n_boot == 8 // world and torch.all(lay.k_boot == 0) for lay in per_rank)


def test_live_reflow_rows_closed_form(recorder):
    eps = 0.1  # large, so that a stray (1 - eps) factor in the target would show
    o = obj("live_reflow", eps=eps, class_dropout_prob=1.0, cfg_scale=1.0)
    x1, y = data()
    nb = o.layout.n_boot
    d = o.draw(x1, torch.Generator().manual_seed(0))
    online = recorder(lambda x, t, k, yy: 0.5 * x + rowv(t) + 0.1 * rowv(yy.float()))
    rows = o.targets(x1, y, d, Networks(online=online, ema=never))
    y_r = y[d.perm][:nb]
    x = d.x0_boot.clone()
    for i in range(8):  # 8 Euler steps of 1/8 from z at the flow level
        x = x + (0.5 * x + i / 8 + 0.1 * rowv(y_r.float())) / 8
    t = d.t_boot
    torch.testing.assert_close(rows.x_t[:nb], (1 - (1 - eps) * rowv(t)) * d.x0_boot + rowv(t) * x)
    torch.testing.assert_close(rows.target[:nb], x - d.x0_boot)  # x_hat - z, no (1 - eps)
    assert not torch.allclose(rows.target[:nb], x - (1 - eps) * d.x0_boot)
    assert torch.all(rows.k[:nb] == 0) and torch.all(rows.k[nb:] == 7)
    assert torch.equal(rows.y[:nb], y_r) and torch.all(rows.y[nb:] == NULL)  # reflow rows: undropped labels
    assert [c["t"][0].item() for c in online.calls] == [i / 8 for i in range(8)]
    assert all(torch.all(c["k"] == 7) and torch.equal(c["y"], y_r) for c in online.calls)
    assert torch.equal(rows.t[:nb] * 128, (rows.t[:nb] * 128).round()) and rows.t.max() < 1
    flow = x1[d.perm][nb:] - (1 - eps) * d.x0_flow  # flow rows exactly as §2.6
    torch.testing.assert_close(rows.target[nb:], flow)


@pytest.mark.parametrize("w", [1.5, 0.0])
def test_live_reflow_rollout_guidance(recorder, w):
    o = obj("live_reflow", cfg_scale=w, class_dropout_prob=0.0)
    x1, y = data()
    nb = o.layout.n_boot
    online = recorder(label_fake(2.0, 1.0))
    d = o.draw(x1, torch.Generator().manual_seed(1))
    d = Draws(d.perm, torch.zeros_like(d.x0_boot), d.t_boot, d.x0_flow, d.t_flow, d.drop)  # injected z = 0
    rows = o.targets(x1, y, d, Networks(online=online))
    v = 1 + w * (2 - 1)
    torch.testing.assert_close(rows.target[:nb], torch.full_like(rows.target[:nb], v))  # x_hat = 8 * v / 8
    for call in online.calls:
        if w == 0.0:
            assert call["x"].shape[0] == nb and torch.all(call["y"] == NULL)
        else:
            assert call["x"].shape[0] == 2 * nb and torch.all(call["y"][nb:] == NULL)
    assert o.extra_forwards_per_row == 8 * nb * (2 if w == 1.5 else 1) / 64
    out = o.loss_on(lambda x, t, k, yy: torch.zeros_like(x), rows)
    assert "loss_reflow" in out.metrics and "loss_reflow_k0" not in out.metrics


def test_live_reflow_unconditional_rollout_is_one_null_call(recorder):
    o = obj("live_reflow", cfg_scale=1.5, class_conditional=False)
    x1, y = data()
    online = recorder(label_fake(2.0, 1.0))
    rows = o.targets(x1, y, o.draw(x1, torch.Generator()), Networks(online=online))
    nb = o.layout.n_boot
    assert all(c["x"].shape[0] == nb and torch.all(c["y"] == NULL) for c in online.calls)
    assert torch.all(rows.y == NULL) and o.extra_forwards_per_row == 8 * nb / 64


def test_live_reflow_sampling_levels(recorder):
    o = obj("live_reflow")
    for n in (1, 2, 4, 8, 16, 32, 64):
        steps = o.sample_steps(n)
        assert [s.k for s in steps] == [0] * n and [s.t for s in steps] == [i / n for i in range(n)]
    assert [s.k for s in o.sample_steps(128)] == [7] * 128
    assert [(s.d, s.k) for s in o.sample_steps(3)] == [(0.5, 0), (0.25, 0), (0.25, 0)]
    f = recorder(lambda x, t, k, y: torch.ones_like(x))
    out = sample(f, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 4, objective=o)
    assert all(torch.all(c["k"] == 0) for c in f.calls) and torch.allclose(out, torch.ones_like(out))
    shortcut = obj("shortcut")
    assert [s.k for s in shortcut.sample_steps(4)] == [2] * 4


# -- paired data (§6.1 / two-stage reflow §6.6) -------------------------------------------------------
def test_paired_flow_matching_uses_the_stored_coupling():
    eps = 1e-5
    o = obj("reflow", class_dropout_prob=0.5)
    assert o.uses_pairs and not obj("flow_matching").uses_pairs
    x1, y = data()
    x0 = torch.randn_like(x1)
    d = o.draw(x1, torch.Generator().manual_seed(0))
    assert isinstance(d, PairDraws) and d.drop.any() and not d.drop.all()
    rows = o.targets(x1, y, d, Networks(online=never), x0=x0)
    torch.testing.assert_close(rows.x_t, (1 - (1 - eps) * rowv(d.t)) * x0 + rowv(d.t) * x1)
    torch.testing.assert_close(rows.target, x1 - (1 - eps) * x0)
    assert torch.equal(rows.y, torch.where(d.drop, NULL, y)) and torch.all(rows.k == 7)
    assert torch.equal(d.t * 128, (d.t * 128).round())
    zero = lambda x, t, k, yy: torch.zeros_like(x)  # noqa: E731
    out = o.loss(Networks(online=zero), x1, y, torch.Generator().manual_seed(0), x0=x0)
    torch.testing.assert_close(out.loss, (x1 - (1 - eps) * x0).pow(2).mean())
    with pytest.raises(ValueError, match="needs x0"):
        o.loss(Networks(online=zero), x1, y, torch.Generator())
    with pytest.raises(ValueError, match="does not train on stored"):
        obj("flow_matching").loss(Networks(online=zero), x1, y, torch.Generator(), x0=x0)


# -- diffusion (§6.6) ----------------------------------------------------------------------------------
def test_ddpm_schedule():
    o = obj("diffusion")
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(o.schedule.alpha_bar().numpy(), ab, rtol=1e-12)
    assert o.schedule.alpha_bar()[0].item() == pytest.approx(1 - 1e-4)
    assert 3e-5 < ab[-1] < 5e-5  # the last step is almost pure noise
    assert o.schedule.sample_taus(1) == [999] and o.schedule.sample_taus(4) == [999, 749, 499, 249]
    assert o.schedule.sample_taus(1000) == list(range(999, -1, -1))  # N = T visits every timestep
    taus = o.schedule.sample_taus(128)
    assert taus[0] == 999 and taus[-1] == 999 - (127 * 1000) // 128 and len(set(taus)) == 128
    with pytest.raises(ValueError, match="num_steps"):
        o.schedule.sample_taus(1001)


def test_diffusion_rows_closed_form():
    o = obj("diffusion", class_dropout_prob=0.5)
    x1, y = data()
    d = o.draw(x1, torch.Generator().manual_seed(0))
    rows = o.targets(x1, y, d, Networks(online=never))
    ab = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()[d.tau]
    torch.testing.assert_close(rows.x_t, rowv(ab.sqrt()) * x1 + rowv((1 - ab).sqrt()) * d.eps)
    torch.testing.assert_close(rows.target, d.eps)  # epsilon prediction
    torch.testing.assert_close(rows.t, (999 - d.tau).float() / 1000)  # t in [0, 1), 0 = noisiest
    assert rows.t.min() >= 0 and rows.t.max() < 1
    assert torch.equal(rows.y, torch.where(d.drop, NULL, y))


def test_one_ddim_step_formula(recorder):
    o = obj("diffusion")
    ab = o.schedule.alpha_bar()
    steps = o.sample_steps(4)
    assert [s.t for s in steps] == [0.0, 0.25, 0.5, 0.75] and steps[-1].t + steps[-1].d == pytest.approx(1.0)
    x, s = torch.randn(3, C, H, H), torch.randn(3, C, H, H)
    a, a_next = ab[749].item(), ab[499].item()
    x1_hat = (x - (1 - a) ** 0.5 * s) / a ** 0.5
    torch.testing.assert_close(o.sample_update(x, s, steps[1], None), a_next ** 0.5 * x1_hat + (1 - a_next) ** 0.5 * s)
    last = o.sample_update(x, s, steps[-1], None)  # to clean data: alpha_bar' = 1, returns x1_hat
    torch.testing.assert_close(last, (x - (1 - ab[249].item()) ** 0.5 * s) / ab[249].item() ** 0.5)


@pytest.mark.parametrize("n", [1, 4, 128, 1000])
def test_ddim_with_the_exact_epsilon_recovers_the_data(recorder, n):
    """A point mass at x_star: eps_hat = (x - sqrt(ab) x_star) / sqrt(1 - ab) is exact, and deterministic
    DDIM lands on x_star at every N (N = 1000 is every DDPM timestep)."""
    o = obj("diffusion")
    x_star = torch.randn(1, C, H, H).double()

    def oracle(x, t, k, y):
        ab = o.alpha_bar_at(t[0].item())
        return (x.double() - ab ** 0.5 * x_star) / (1 - ab) ** 0.5

    f = recorder(oracle)
    out = sample(f, fixed_noise((2, C, H, H), 0).double(), torch.zeros(2, dtype=torch.long), n, objective=o)
    torch.testing.assert_close(out.double(), x_star.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)
    assert [c["t"][0].item() for c in f.calls[:2]] == pytest.approx([s.t for s in o.sample_steps(n)[:2]])
    assert f.calls[0]["t"][0].item() == 0.0  # the first call is at the noisiest step (pitfall 1)


def test_ddim_clips_pixel_estimates_and_rederives_epsilon():
    """Pixels (data_range 1): x1_hat is clipped to [-1, 1] and eps re-derived from it; latents are not
    clipped. At the noisiest step an eps error of 0.05 would otherwise put x1_hat near +-8."""
    from shortcut_ray.config import DataConfig
    from shortcut_ray.objectives import data_range_of, for_sampling

    assert data_range_of(DataConfig(kind="pixels")) == 1.0 and data_range_of(DataConfig(kind="latents")) is None
    cfg = Config(objective=ObjectiveConfig(train_type="diffusion"))
    assert for_sampling(cfg).data_range == 1.0  # the default data is pixels
    pix = build_objective(ObjectiveConfig(train_type="diffusion"), NULL, 64, data_range=1.0)
    lat = obj("diffusion")
    ab = pix.schedule.alpha_bar()
    x, s = torch.randn(3, C, H, H), torch.randn(3, C, H, H)
    step = pix.sample_steps(4)[1]  # tau 749 -> 499
    a, a_next = ab[749].item(), ab[499].item()
    x1 = ((x - (1 - a) ** 0.5 * s) / a ** 0.5).clamp(-1, 1)
    eps = (x - a ** 0.5 * x1) / (1 - a) ** 0.5
    torch.testing.assert_close(pix.sample_update(x, s, step, None), a_next ** 0.5 * x1 + (1 - a_next) ** 0.5 * eps)
    assert not torch.allclose(lat.sample_update(x, s, step, None), pix.sample_update(x, s, step, None))
    last = pix.sample_steps(4)[-1]  # to clean data: the clipped estimate itself
    assert pix.sample_update(x * 50, s, last, None).abs().max() <= 1.0
    assert lat.sample_update(x * 50, s, last, None).abs().max() > 1.0
    # an in-range estimate is untouched: the exact-epsilon recovery holds with the clip on
    x_star = torch.rand(1, C, H, H).double() * 1.8 - 0.9

    def oracle(x, t, k, y):
        abt = pix.alpha_bar_at(t[0].item())
        return (x.double() - abt ** 0.5 * x_star) / (1 - abt) ** 0.5

    out = sample(oracle, fixed_noise((2, C, H, H), 0).double(), torch.zeros(2, dtype=torch.long), 4, objective=pix)
    torch.testing.assert_close(out.double(), x_star.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)
