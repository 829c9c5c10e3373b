"""EMA (pitfall 12), optimiser defaults (pitfall 24), config validation and overrides (pitfall 25)."""

from __future__ import annotations

import pytest
import torch

from shortcut_ray.config import Config, ConfigError, EMAConfig, ObjectiveConfig, OptimConfig, TrainConfig, \
    apply_overrides, override
from shortcut_ray.ema import make_ema, update_ema
from shortcut_ray.optim import build_optimizer, lr_at
from shortcut_ray.presets import PRESETS, get_preset


def test_ema_one_step():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    ema = make_ema(m)
    init = [p.detach().clone() for p in m.parameters()]
    opt = build_optimizer(m.parameters(), OptimConfig(lr=0.1))
    m(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    update_ema(ema, m, 0.999)  # after the optimiser step
    for e, p0, p in zip(ema.parameters(), init, m.parameters()):
        torch.testing.assert_close(e, 0.999 * p0 + 0.001 * p.detach())
        assert not e.requires_grad
    assert not ema.training


def test_optimizer_defaults():  # pitfall 24
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(3, 4))
    opt = build_optimizer(m.parameters(), OptimConfig())
    assert len(opt.param_groups) == 1  # weight decay on every parameter, biases and norms included
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.1 and g["lr"] == 1e-4 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8
    assert len(g["params"]) == len(list(m.parameters()))
    cfg = OptimConfig()
    assert cfg.grad_clip <= 0 and cfg.warmup_steps == 0
    assert {lr_at(s, cfg, 1000) for s in (0, 1, 500, 999)} == {1e-4}  # constant, no warm-up
    warm = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_at(0, warm, 100) == pytest.approx(1e-5) and lr_at(99, warm, 100) < 1e-6


def test_every_preset_is_valid_and_roundtrips():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.preset == name
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_small_batch_is_refused_with_advice():
    # B = 32 -> B_b = 4 < 7 levels: the paper's code would silently train only d = 1
    with pytest.raises(ConfigError, match="Raise train.global_batch to at least 56"):
        Config(train=TrainConfig(global_batch=32))
    with pytest.raises(ConfigError, match="split evenly"):
        Config(train=TrainConfig(global_batch=72, num_workers=2))  # B_b = 9 over 2 workers
    with pytest.raises(ConfigError, match="at least 112"):  # dt_bias=1 at B=64: n_cfg = 0, only k in {0, 1}
        Config(objective=ObjectiveConfig(bootstrap_dt_bias=1), train=TrainConfig(global_batch=64))
    Config(objective=ObjectiveConfig(train_type="flow_matching"), train=TrainConfig(global_batch=8))  # fine


def test_overrides_parse_types_and_refuse_unknown_keys():
    cfg = apply_overrides(get_preset("digits"), ["optim.lr=3e-4", "train.max_steps=7", "objective.bootstrap_ema=false",
                                                 "eval.fid_steps=1,4", "ema.eval_with_ema=true"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.objective.bootstrap_ema is False
    assert cfg.eval.fid_steps == (1, 4)
    assert cfg.flat()["ema.eval_with_ema"] is True  # pitfall 25: the weight choice is an explicit, logged param
    with pytest.raises(ConfigError, match="valid keys in optim"):
        apply_overrides(cfg, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
        apply_overrides(cfg, ["ema.decay=1.5"])
    with pytest.raises(ConfigError, match="exceeds objective.denoise_timesteps"):
        apply_overrides(cfg, ["eval.sample_steps=1,256"])


def test_ema_config_default():
    assert EMAConfig().decay == 0.999 and EMAConfig().eval_with_ema is False


def test_override_is_one_path_for_set_presets_and_sweeps():
    base = get_preset("digits")
    typed = override(base, {"optim.lr": 3e-4, "eval.fid_steps": [1, 4], "train.max_steps": 7.0,
                            "ema.eval_with_ema": 1, "preset": "x"})  # JSON/Tune-style values are coerced
    assert typed == apply_overrides(base, ["optim.lr=3e-4", "eval.fid_steps=[1,4]", "train.max_steps=7",
                                           "ema.eval_with_ema=true", "preset=x"])
    assert type(typed.train.max_steps) is int and typed.eval.fid_steps == (1, 4)
    assert override(base, {}) == base
    with pytest.raises(ConfigError, match="whole section"):
        override(base, {"optim": 1})
    with pytest.raises(ConfigError, match="cannot use"):
        override(base, {"train.max_steps": "many"})
    with pytest.raises(ConfigError, match="exceeds objective.denoise_timesteps"):  # invariants checked on the result
        override(base, {"eval.sample_steps": (1, 256)})
    # several keys at once: the intermediate config (global_batch 8 with bootstrap_every 8) is never built
    fm = override(base, {"train.global_batch": 8, "objective.train_type": "flow_matching"})
    assert fm.train.global_batch == 8
