"""Golden numbers: the objectives, the sampler and a short training run, pinned before the objectives refactor.

For fixed draws and fixed seeded weights of a tiny DiT, the shortcut and flow-matching rows (x_t, t, k, y,
target) and metrics, the sampler's outputs at N = 1, 2, 128 (with and without CFG), and five steps of
`TrainState.step_on` are compared with `tests/data/golden.npz`, computed from the code as of commit 28d62cf
(before `shortcut_ray/objectives/`). Any refactor of the objective, sampler or train step must keep these.

The tiny DiT's weights are drawn in `named_parameters()` order from a fixed generator, with the fused
q/k/v projection drawn as the three separate layers it replaced (so the numbers survived the fusion); any
other change of the model's parameter layout changes them. In that case, check the model's own golden
tests first, then regenerate from a commit that computed the old numbers, or with

    GOLDEN_REGEN=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_golden.py

and say in the commit why the numbers moved.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shortcut_ray.config import Config, DataConfig, EMAConfig, ObjectiveConfig, OptimConfig, TrainConfig
from shortcut_ray.model import ShortcutDiT, model_config
from shortcut_ray.sampler import fixed_noise, sample

GOLDEN = Path(__file__).parent / "data" / "golden.npz"
REGEN = os.environ.get("GOLDEN_REGEN") == "1"
C, S, NC, B = 2, 8, 10, 64  # channels, image side, classes, global batch


def _objective_api():
    from shortcut_ray.objectives import Networks, build_objective

    return build_objective, lambda online, target: dict(nets=Networks(online=online, ema=target))


def tiny_dit(seed: int, ignore_k: bool = False) -> ShortcutDiT:
    m = ShortcutDiT(model_config("DiT-T/2", hidden_size=32, depth=1), S, C, NC, ignore_k=ignore_k)
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        return torch.randn(shape, generator=g) * (0.3 if len(shape) > 1 else 0.05)

    state = {}
    for name, p in m.named_parameters():  # drawn in the pre-fusion order: q.w, q.b, k.w, k.b, v.w, v.b
        if name.endswith("qkv.bias"):
            continue  # drawn with qkv.weight
        if name.endswith("qkv.weight"):
            d, base = p.shape[1], name[: -len("qkv.weight")]
            for part in "qkv":
                state[f"{base}{part}.weight"], state[f"{base}{part}.bias"] = draw((d, d)), draw((d,))
        else:
            state[name] = draw(tuple(p.shape))
    m.load_state_dict(state)  # the model's legacy-key hook stacks q/k/v into the fused projection
    return m.eval()


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g), torch.randint(0, NC, (B,), generator=g)


def objective_case(name: str, **kw) -> dict[str, np.ndarray]:
    build, nets = _objective_api()
    o = build(ObjectiveConfig(**kw), num_classes=NC, global_batch=B)
    online, target = tiny_dit(1, ignore_k=not o.uses_step_level), tiny_dit(2, ignore_k=not o.uses_step_level)
    x1, y = data()
    draws = o.draw(x1, torch.Generator().manual_seed(3))
    rows = o.targets(x1, y, draws, **nets(online, target))
    out = {f"{name}/draw/{k}": v for k, v in dataclasses.asdict(draws).items()}
    out.update({f"{name}/rows/{k}": getattr(rows, k) for k in ("x_t", "t", "k", "y", "target")})
    out.update({f"{name}/diag/{k}": v for k, v in rows.diagnostics.items()})
    with torch.no_grad():
        res = o.loss_on(online, rows)
    out.update({f"{name}/metric/{k}": v for k, v in res.metrics.items()})
    return {k: v.detach().numpy() for k, v in out.items()}


def sampler_cases() -> dict[str, np.ndarray]:
    model = tiny_dit(4)
    noise = fixed_noise((6, C, S, S), seed=5)
    y = torch.tensor([0, 1, 2, 3, 9, NC])
    out = {}
    for n in (1, 2, 128):
        for w in (1.0, 0.0, 1.5):
            out[f"sample/N{n}/w{w}"] = sample(model, noise, y, n, w, NC).numpy()
    return out


def training_case(train_type: str) -> dict[str, np.ndarray]:
    from shortcut_ray.train_step import TrainState

    cfg = Config(model=model_config("DiT-T/2", hidden_size=32, depth=1),
                 objective=ObjectiveConfig(train_type=train_type, bootstrap_cfg=True, cfg_scale=1.5),
                 optim=OptimConfig(lr=1e-3), ema=EMAConfig(decay=0.9),
                 data=DataConfig(image_size=S, channels=C, num_classes=NC),
                 train=TrainConfig(global_batch=B, max_steps=5, precision="fp32", num_workers=1))
    st = TrainState.create(cfg, "cpu")
    out: dict[str, list] = {}
    for i in range(5):
        x1, y = data(10 + i)
        for k, v in st.step_on(x1, y).items():
            out.setdefault(k, []).append(float(v))
    res = {f"train/{train_type}/{k}": np.array(v) for k, v in out.items()}
    for name, module in (("model", st.model), ("ema", st.ema)):
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        res[f"train/{train_type}/{name}_sum"] = flat.sum().numpy()
        res[f"train/{train_type}/{name}_abs_sum"] = flat.abs().sum().numpy()
        res[f"train/{train_type}/{name}_first"] = flat[:16].numpy()
    return res


CASES = {
    "shortcut": lambda: objective_case("shortcut"),
    "shortcut_cfg": lambda: objective_case("shortcut_cfg", bootstrap_cfg=True, cfg_scale=1.5),
    "shortcut_uncond": lambda: objective_case("shortcut_uncond", class_conditional=False, bootstrap_dt_bias=1),
    "flow_matching": lambda: objective_case("flow_matching", train_type="flow_matching"),
    "sampler": sampler_cases,
    "train_shortcut": lambda: training_case("shortcut"),
    "train_flow_matching": lambda: training_case("flow_matching"),
}


def _compare(got: dict[str, np.ndarray], golden) -> None:
    for key, value in got.items():
        assert key in golden.files, f"{key} missing from {GOLDEN.name}; regenerate only if the change is intended"
        ref = golden[key]
        assert value.shape == ref.shape and value.dtype == ref.dtype, (key, value.shape, ref.shape)
        if value.dtype.kind in "biu":
            np.testing.assert_array_equal(value, ref, err_msg=key)
        else:
            np.testing.assert_allclose(value, ref, rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.fixture(scope="module")
def golden():
    if REGEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez_compressed(GOLDEN, **{k: v for case in CASES.values() for k, v in case().items()})
    return np.load(GOLDEN)


@pytest.mark.parametrize("case", list(CASES))
def test_golden(case, golden):
    torch.manual_seed(1234)  # the cases must not depend on the global RNG; this makes a leak visible
    got = CASES[case]()
    assert got, case
    _compare(got, golden)
