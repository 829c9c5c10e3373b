"""Two-stage reflow pairs (ALGORITHM §6.6): deterministic rows, the paired shard format, resume, the
driver-side checks, and (slow) the Ray Data actor job on a tiny flow-matching teacher."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from shortcut_ray import data, pairs, shards
from shortcut_ray.checkpoint import load_for_inference
from shortcut_ray.config import ConfigError, DataConfig, apply_overrides
from shortcut_ray.objectives.flow_matching import FlowMatchingObjective
from shortcut_ray.sampler import sample
from tests.test_teacher import _cfg, _save_teacher


@pytest.fixture(scope="module")
def teacher_uri(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "checkpoint_0000123", _cfg())


def _read_pairs(uri):
    """(x0, x1, y) of a paired dataset, read straight from its shards in manifest order."""
    import pyarrow.parquet as pq

    info = shards.dataset_info(uri)
    shape = (info["channels"], info["image_size"], info["image_size"])
    cols = {"x0": [], "x1": [], "label": []}
    for s in info["shards"]:
        t = pq.read_table(os.path.join(uri, s["file"])).to_pydict()
        for k in cols:
            cols[k] += t[k]
    return (torch.from_numpy(shards.bytes_array(cols["x0"], info["pair_dtype"], shape)),
            torch.from_numpy(shards.bytes_array(cols["x1"], info["pair_dtype"], shape)), torch.tensor(cols["label"]))


def _direct(teacher_uri, x0, y, steps, cfg_scale, weights="ema"):
    model, tcfg, _ = load_for_inference(teacher_uri, weights)
    return sample(model, x0, y, steps, cfg_scale, tcfg.data.num_classes, tcfg.objective.denoise_timesteps)


def test_rows_depend_on_seed_and_row_index_only():
    a0, ay = pairs.draw_rows(3, 0, 10, (1, 4, 4), 10)
    b0, by = pairs.draw_rows(3, 6, 4, (1, 4, 4), 10)
    assert torch.equal(a0[6:], b0) and torch.equal(ay[6:], by)
    c0, _ = pairs.draw_rows(4, 0, 10, (1, 4, 4), 10)
    assert not torch.equal(a0, c0) and ay.min() >= 0 and ay.max() < 10
    _, only2 = pairs.draw_rows(0, 0, 50, (1, 2, 2), 3, probs=[0.0, 0.0, 1.0])
    assert (only2 == 2).all()


def test_generate_locally_writes_pairs_a_manifest_and_resumes(teacher_uri, tmp_path):
    out = str(tmp_path / "pairs")
    plan = pairs.PairPlan(teacher=teacher_uri, count=20, steps=4, cfg_scale=2.0, shard_size=8, seed=5)
    r = pairs.generate(plan, out, use_ray=False, batch_size=6, log=lambda m: None)
    m = r.manifest
    assert (r.written, r.skipped) == ([0, 1, 2], [])
    assert [s["rows"] for s in m["shards"]] == [8, 8, 4] and m["count"] == 20 and m["paired"]
    assert m["teacher"]["checkpoint"] == teacher_uri and m["teacher"]["step"] == 123
    assert m["sampler"] == {"steps": 4, "weights": "ema", "cfg_scale": 2.0, "seed": 5, "labels": "uniform",
                            "precision": "fp32", "method": "euler (sampler.sample)"}
    assert (m["kind"], m["image_size"], m["channels"], m["num_classes"]) == ("pixels", 8, 1, 10)
    assert shards.verify_shards(out)["count"] == 20
    x0, x1, y = _read_pairs(out)
    e0, ey = pairs.draw_rows(5, 0, 20, (1, 8, 8), 10)
    assert torch.equal(x0, e0) and torch.equal(y, ey) and sum(m["class_counts"]) == 20
    # x1 is the teacher EMA's 4-step CFG sample of exactly that noise (not the online weights')
    torch.testing.assert_close(x1, _direct(teacher_uri, x0, y, 4, 2.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x1, _direct(teacher_uri, x0, y, 4, 2.0, "online"), atol=1e-3)
    assert not torch.allclose(x1, x0, atol=1e-3)

    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".parquet")}
    again = pairs.generate(plan, out, use_ray=False, log=lambda m: None)  # rerun: nothing to do
    assert (again.written, again.skipped) == ([], [0, 1, 2])
    assert mtimes == {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in mtimes}
    with open(os.path.join(out, "part-00001.parquet"), "ab") as f:  # a damaged shard is regenerated
        f.write(b"junk")
    os.remove(os.path.join(out, "part-00002.parquet"))  # and a lost one
    fixed = pairs.generate(plan, out, use_ray=False, log=lambda m: None)
    assert (fixed.written, fixed.skipped) == ([1, 2], [0])
    assert torch.equal(_read_pairs(out)[1], x1)  # bit-identical regeneration
    grown = pairs.generate(pairs.PairPlan(**{**plan.__dict__, "count": 26}), out, use_ray=False, log=lambda m: None)
    assert (grown.written, grown.skipped) == ([2, 3], [0, 1])  # shard 2 grew from 4 to 8 rows

    with pytest.raises(ConfigError, match="holds pairs of another plan.*'steps': \\(4, 8\\)"):
        pairs.generate(pairs.PairPlan(**{**plan.__dict__, "steps": 8}), out, use_ray=False, log=lambda m: None)


def test_generate_refuses_a_bad_teacher_or_plan(teacher_uri, tmp_path):
    sc = _save_teacher(tmp_path / "sc", apply_overrides(_cfg(), ["objective.train_type=shortcut", "train.global_batch=64"]))
    with pytest.raises(ConfigError, match="flow-matching teacher"):
        pairs.resolve_plan(pairs.PairPlan(teacher=sc, count=4))
    with pytest.raises(ConfigError, match=r"steps must be in 1..128"):
        pairs.resolve_plan(pairs.PairPlan(teacher=teacher_uri, count=4, steps=256))
    with pytest.raises(ConfigError, match="no state.json"):
        pairs.resolve_plan(pairs.PairPlan(teacher=str(tmp_path), count=4))
    plan, _, _ = pairs.resolve_plan(pairs.PairPlan(teacher=teacher_uri, count=4))
    assert plan.cfg_scale == 1.0 and plan.steps == 128 and plan.weights == "ema"  # defaults of §6.6


def test_paired_rows_decode_to_x1_y_x0_and_split(teacher_uri, tmp_path):
    import pyarrow.parquet as pq

    out = str(tmp_path / "p")
    pairs.generate(pairs.PairPlan(teacher=teacher_uri, count=6, steps=2, shard_size=6, dtype="float16"), out,
                   use_ray=False, log=lambda m: None)
    rows = pq.read_table(os.path.join(out, "part-00000.parquet")).to_pydict()
    b = data.decode_batch({k: np.asarray(v, dtype=object) for k, v in rows.items()}, kind="pixels", channels=1,
                          image_size=8, random_flip=True, latent_scale=1.0, pair_dtype="float16")
    x0, x1, _ = _read_pairs(out)
    assert np.array_equal(b["x0"], x0.numpy()) and np.array_equal(b["image"], x1.numpy())  # never flipped
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int64
    x1_, y_, x0_ = data.split_paired((b["image"], b["label"], b["x0"]))
    assert x0_ is b["x0"] and x1_ is b["image"]
    assert data.split_paired((b["image"], b["label"]))[2] is None


def test_driver_checks_for_paired_datasets(teacher_uri, tmp_path, monkeypatch):
    out = str(tmp_path / "p")
    pairs.generate(pairs.PairPlan(teacher=teacher_uri, count=4, steps=1, shard_size=4), out, use_ray=False,
                   log=lambda m: None)
    info = shards.dataset_info(out)
    ok = DataConfig(source="parquet", uri=out, image_size=8, random_flip=False)
    data.check_matches(info, ok, out)
    with pytest.raises(ConfigError, match="paired .*random_flip=false"):
        data.check_matches(info, DataConfig(source="parquet", uri=out, image_size=8), out)
    with pytest.raises(ConfigError, match="image side 8 but data.image_size=16"):
        data.check_matches(info, DataConfig(source="parquet", uri=out, image_size=16, random_flip=False), out)
    cfg = _cfg(f"data.uri={out}", "data.source=parquet", "data.random_flip=false")
    with pytest.raises(ConfigError, match="paired .* would ignore its stored noise"):
        pairs.check_paired(cfg, info, out)
    import ray

    from shortcut_ray import launch

    with pytest.raises(ConfigError, match="would ignore its stored noise"):  # wired into the driver
        launch.build_trainer(cfg)
    assert not ray.is_initialized()
    monkeypatch.setattr(FlowMatchingObjective, "uses_pairs", True, raising=False)
    pairs.check_paired(cfg, info, out)
    digits = {"kind": "pixels", "paired": False}
    with pytest.raises(ConfigError, match="jobs.generate_pairs"):
        pairs.check_paired(cfg, digits, "digits")


@pytest.mark.slow
def test_generate_pairs_job_on_ray_data_actors(teacher_uri, tmp_path):
    import ray

    from jobs.generate_pairs import main

    out = str(tmp_path / "pairs")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        args = ["--teacher", teacher_uri, "--output", out, "--count", "36", "--shard-size", "12", "--steps", "8",
                "--cfg-scale", "1.5", "--seed", "9", "--concurrency", "2"]
        assert main(args) == 0
        info = json.load(open(os.path.join(out, "manifest.json")))
        assert [s["file"] for s in info["shards"]] == [f"part-0000{i}.parquet" for i in range(3)]
        x0, x1, y = _read_pairs(out)
        e0, ey = pairs.draw_rows(9, 0, 36, (1, 8, 8), 10)
        assert torch.equal(x0, e0) and torch.equal(y, ey)
        torch.testing.assert_close(x1, _direct(teacher_uri, x0, y, 8, 1.5), rtol=1e-5, atol=1e-5)
        mtimes = [os.stat(os.path.join(out, s["file"])).st_mtime_ns for s in info["shards"]]
        result = pairs.generate(pairs.PairPlan(teacher=teacher_uri, count=36, shard_size=12, steps=8, cfg_scale=1.5,
                                               seed=9), out, log=lambda m: None)
        assert (result.written, result.skipped) == ([], [0, 1, 2])
        assert mtimes == [os.stat(os.path.join(out, s["file"])).st_mtime_ns for s in info["shards"]]
        # the training pipeline yields (x1, y, x0) batches of the stored coupling
        cfg = DataConfig(source="parquet", uri=out, image_size=8, random_flip=False, shuffle_buffer=0)
        got = list(data.batches(data.build_dataset(cfg, out, seed=0).iterator(), 12, cfg))
        assert len(got) == 3 and all(len(b) == 3 for b in got)
        bx1, by, bx0 = (torch.cat(t) for t in zip(*got))
        order = torch.argsort(bx0.flatten(1)[:, 0])
        ref = torch.argsort(x0.flatten(1)[:, 0])
        assert torch.equal(bx0[order], x0[ref]) and torch.equal(bx1[order], x1[ref]) and torch.equal(by[order], y[ref])
    finally:
        ray.shutdown()
