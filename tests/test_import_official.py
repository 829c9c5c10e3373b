"""Importing the authors' JAX checkpoints: parity with the official DiT, safe unpickling, clear refusals.

Fixtures (tests/data/official, see its README): two tiny checkpoints written by the official train.py
(a shortcut model with 10 classes and an unconditional flow-matching one) and the official DiT's
fp32 outputs on fixed inputs for both weight trees.
"""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from shortcut_ray import official
from shortcut_ray.config import ConfigError

DATA = os.path.join(os.path.dirname(__file__), "data", "official")
FIXTURES = {"shortcut": ("tiny_official_checkpoint.pkl", "tiny_official"),
            "naive": ("tiny_official_checkpoint_naive.pkl", "tiny_official_naive")}
SHA256 = {"shortcut": "200404b7737d564a02f58df7b49235a59eab6b8fdac6b2b9fc5f9fca6187d137",
          "naive": "8cc14040206a3173650109331e425117af908752cd36b74bfd6424edc935d008"}


def _expected(m: str):
    d = np.load(os.path.join(DATA, "expected_outputs.npz"))
    x = torch.from_numpy(d[f"{m}_x"]).permute(0, 3, 1, 2)  # official NHWC -> our NCHW
    inputs = (x, torch.from_numpy(d[f"{m}_t"]), torch.from_numpy(d[f"{m}_k"]), torch.from_numpy(d[f"{m}_y"]).long())
    return inputs, {"params": d[f"{m}_out_params"], "params_ema": d[f"{m}_out_params_ema"]}


def _run(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).permute(0, 2, 3, 1).numpy()  # back to NHWC


def _import(m: str):
    state, info = official.read_checkpoint(os.path.join(DATA, FIXTURES[m][0]))
    cfg = official.import_config(official.infer_shape(state["params"]), FIXTURES[m][1])
    return (*official.build_imported(cfg, state), cfg, info)


@pytest.mark.parametrize("m", ["shortcut", "naive"])
def test_imported_fixtures_reproduce_the_official_outputs(m):
    model, ema, report, cfg, info = _import(m)
    assert info["sha256"] == SHA256[m]
    inputs, want = _expected(m)
    np.testing.assert_allclose(_run(model, inputs), want["params"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(_run(ema, inputs), want["params_ema"], atol=1e-4, rtol=0)
    # the two trees really differ (by up to ~1.9), so online/EMA cannot have been swapped unnoticed
    assert np.abs(want["params"] - want["params_ema"]).max() > 0.5
    assert report["tensors_per_tree"] == 43 and report["official_step"] == 4
    assert report["ignored"] == ["Embed_0/embedding (256, 1)"]
    m_cfg = cfg.model
    assert (m_cfg.hidden_size, m_cfg.depth, m_cfg.num_heads, m_cfg.patch_size, m_cfg.mlp_ratio) == (64, 2, 4, 2, 4.0)
    assert cfg.data.channels == 4 and cfg.data.image_size == 8
    assert cfg.data.num_classes == (10 if m == "shortcut" else 1)
    assert cfg.objective.train_type == ("shortcut" if m == "shortcut" else "flow_matching")
    assert model.ignore_k == (m == "naive")  # official ignore_dt: k only reaches the shortcut model


def test_import_job_writes_a_checkpoint_that_sample_and_inference_accept(tmp_path, capsys):
    from jobs.import_official import main as import_main
    from jobs.sample import main as sample_main
    from shortcut_ray.checkpoint import load_for_inference, read_state
    from shortcut_ray.sampler import fixed_noise

    out = str(tmp_path / "imported")
    assert import_main([os.path.join(DATA, FIXTURES["shortcut"][0]), "--recipe", "tiny_official", "--out", out]) == 0
    assert "mapped 43 tensors x 2 trees" in capsys.readouterr().out
    meta = read_state(out)
    assert meta["step"] == 0 and meta["imported_from"]["sha256"] == SHA256["shortcut"]
    inputs, want = _expected("shortcut")
    models = {}
    for weights, key in (("online", "params"), ("ema", "params_ema")):
        models[weights], _, _ = load_for_inference(out, weights)
        np.testing.assert_allclose(_run(models[weights], inputs), want[key], atol=1e-4, rtol=0)
    # jobs.sample on the imported checkpoint; N=1 is one Euler step x0 + f(x0, 0, 0, y) from the same noise
    assert sample_main([out, "--steps", "1,4", "--n", "4", "--raw", "--out", str(tmp_path / "s"),
                        "--weights", "online", "--device", "cpu"]) == 0
    one = np.load(tmp_path / "s" / "N001.npy")
    x0 = fixed_noise((4, 4, 8, 8), 42, "cpu")
    y = torch.arange(4)
    with torch.no_grad():
        manual = x0 + models["online"](x0, torch.zeros(4), torch.zeros(4), y)
    assert one.shape == (4, 4, 8, 8) and np.isfinite(np.load(tmp_path / "s" / "N004.npy")).all()
    np.testing.assert_allclose(one, manual.numpy(), atol=1e-5)
    # what the Ray worker does for `jobs.train --set train.resume_from=OUT`: load into a TrainState, train on
    from shortcut_ray import checkpoint
    from shortcut_ray.config import Config
    from shortcut_ray.train_step import TrainState

    st = TrainState.create(Config.from_dict(meta["config"]))
    assert checkpoint.load(out, st.model, st.ema, st.optimizer)["step"] == 0
    np.testing.assert_allclose(_run(st.ema, inputs), want["params_ema"], atol=1e-4, rtol=0)
    metrics = st.step_on(torch.randn(64, 4, 8, 8), torch.randint(0, 10, (64,)))
    assert torch.isfinite(metrics["loss"]) and st.step == 1


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    tree = {"train_state": {"params": {"x": _Evil(str(marker))}, "step": np.int32(1)}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(official.OfficialFormatError, match=r"refusing to load (posix|nt)\.system"):
        official.read_checkpoint(str(path))
    assert not marker.exists()
    for module, name in (("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")):
        evil = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol-0 GLOBAL + REDUCE
        with pytest.raises(official.OfficialFormatError, match=rf"refusing to load {module}\.{name}"):
            official.unpickle(evil, "evil")


def test_truncated_and_non_checkpoint_files_give_clear_errors(tmp_path):
    data = open(os.path.join(DATA, FIXTURES["shortcut"][0]), "rb").read()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(official.OfficialFormatError, match="truncated"):
        official.read_checkpoint(str(cut))
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": np.zeros(3)}))
    with pytest.raises(official.OfficialFormatError, match=r"no train_state\['params'\]"):
        official.read_checkpoint(str(other))
    with pytest.raises(FileNotFoundError):
        official.read_checkpoint(str(tmp_path / "missing.pkl"))


def _write_modified(tmp_path, edit) -> str:
    state, _ = official.read_checkpoint(os.path.join(DATA, FIXTURES["shortcut"][0]))
    edit(state)
    state.pop("opt_state")  # its stand-in namedtuples are not importable classes; the importer ignores it
    path = tmp_path / "modified.pkl"
    path.write_bytes(pickle.dumps({"train_state": state}))  # numpy-only: readable by the restricted unpickler
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["params"]["DiTBlock_1"].pop("Dense_3"),
     r"params: missing DiTBlock_1/Dense_3/kernel \(-> blocks\.1\.attn\.v\.weight\), expected shape \(64, 64\)"),
    (lambda s: s["params_ema"]["DiTBlock_0"]["Dense_2"].update(kernel=np.zeros((64, 32), np.float32)),
     r"params_ema: DiTBlock_0/Dense_2/kernel \(-> blocks\.0\.attn\.q\.weight\) expected shape \(64, 64\), "
     r"got shape \(64, 32\)"),
    (lambda s: s["params"].update(Extra_0={"kernel": np.zeros((2, 2), np.float32)}),
     r"params: Extra_0/kernel \(shape \(2, 2\)\) has no place"),
])
def test_a_tree_that_does_not_match_names_the_first_mismatch(tmp_path, edit, message):
    path = _write_modified(tmp_path, edit)
    state, _ = official.read_checkpoint(path)
    cfg = official.import_config(official.infer_shape(state["params"]), "tiny_official")
    with pytest.raises(official.OfficialFormatError, match=message):
        official.build_imported(cfg, state)


def test_config_comes_from_the_tree_plus_a_recipe_or_flags():
    state, _ = official.read_checkpoint(os.path.join(DATA, FIXTURES["shortcut"][0]))
    shape = official.infer_shape(state["params"])
    with pytest.raises(ConfigError, match=r"recipe 'celebahq256_dit_b' has model.hidden_size=768 but the "
                                          r"checkpoint's tree has 64"):
        official.import_config(shape, "celebahq256_dit_b")
    with pytest.raises(ConfigError, match="--heads, --image-size, --train-type"):
        official.import_config(shape)
    cfg = official.import_config(shape, heads=2, image_size=16, train_type="naive")
    assert (cfg.model.num_heads, cfg.data.image_size, cfg.objective.train_type) == (2, 16, "flow_matching")
    assert cfg.objective.class_conditional  # 10 classes
    with pytest.raises(ConfigError, match="contradicts the checkpoint's tree"):
        official.import_config(shape, "tiny_official", overrides=["model.depth=3"])


def test_jax_arrays_and_frozen_dicts_load_as_numpy_and_dicts_without_jax(tmp_path, monkeypatch):
    """Other JAX versions pickle jax Arrays (jax._src.array._reconstruct_array) and flax FrozenDicts."""
    fake = {name: types.ModuleType(name) for name in ("jax", "jax._src", "jax._src.array", "flax", "flax.core",
                                                       "flax.core.frozen_dict")}

    def _reconstruct_array(fun, args, arr_state, aval_state):
        raise AssertionError("never called: the importer must use its own stand-in")

    class FrozenDict(dict):
        def __reduce__(self):
            return (FrozenDict, (dict(self),))

    class JaxArray:
        def __init__(self, a):
            self.a = a

        def __reduce__(self):
            fun, args, state = self.a.__reduce__()
            return (_reconstruct_array, (fun, args, state, None))

    _reconstruct_array.__module__, _reconstruct_array.__qualname__ = "jax._src.array", "_reconstruct_array"
    FrozenDict.__module__, FrozenDict.__qualname__ = "flax.core.frozen_dict", "FrozenDict"
    fake["jax._src.array"]._reconstruct_array = _reconstruct_array
    fake["flax.core.frozen_dict"].FrozenDict = FrozenDict
    for name, mod in fake.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def wrap(tree):
        return FrozenDict({k: wrap(v) if isinstance(v, dict) else JaxArray(v) for k, v in tree.items()})

    state, _ = official.read_checkpoint(os.path.join(DATA, FIXTURES["shortcut"][0]))
    path = tmp_path / "jax.pkl"
    trees = {key: wrap(state[key]) for key in ("params", "params_ema")}
    path.write_bytes(pickle.dumps({"train_state": {**trees, "step": state["step"]}}))
    for name in fake:
        monkeypatch.delitem(sys.modules, name)
    loaded, _ = official.read_checkpoint(str(path))
    assert "jax" not in sys.modules and "flax" not in sys.modules
    assert type(loaded["params"]) is dict
    kernel = loaded["params"]["DiTBlock_0"]["Dense_2"]["kernel"]
    assert type(kernel) is np.ndarray
    np.testing.assert_array_equal(kernel, state["params"]["DiTBlock_0"]["Dense_2"]["kernel"])


def test_official_fid_statistics_are_a_reference_with_provenance(tmp_path, tiny_fid_weights):
    from shortcut_ray.config import apply_overrides
    from shortcut_ray.evaluation import Evaluator
    from shortcut_ray.fid import FeatureStats
    from shortcut_ray.presets import get_preset

    g = np.random.default_rng(0)
    path = tmp_path / "celeba256_fidstats_ours.npz"  # the authors' format: mu and sigma only
    np.savez(path, mu=g.normal(size=8), sigma=np.eye(8))
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    stats = FeatureStats.load(str(path))
    assert stats.n == 0 and stats.provenance == {"file": str(path), "sha256": sha,
                                                 "source": "official JAX statistics (kvfrans/shortcut-models)"}

    net = tiny_fid_weights
    cfg = apply_overrides(get_preset("debug_cpu"), [f"eval.fid_ref_stats={path}", f"eval.fid_weights={net}"])
    # what Evaluator.run puts in the eval JSON ("fid_reference") and log_reference sends to MLflow as fid_ref.*
    assert Evaluator(cfg, torch.device("cpu")).fid_reference == stats.provenance
    no_fid = apply_overrides(cfg, ["eval.fid_weights="])
    assert Evaluator(no_fid, torch.device("cpu")).fid_reference == {}  # no FID computed: nothing to attribute
