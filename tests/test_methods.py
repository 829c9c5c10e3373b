"""Every method of ALGORITHM §6 through the jobs' code path, CI-sized (issue 12).

Fast part: the `<base>_<method>` presets exist, differ from their base only where they should, and a
distillation preset without a teacher is refused naming the teacher preset to train.

Slow part (one local Ray session for the module; DiT-T/2 on digits, 14 steps per run, 1 worker): a
flow-matching run trained first is the teacher of consistency distillation and progressive
distillation and, through pairs.py's local (no-Ray) path, the source of two-stage reflow's pairs.
Each method is trained the way jobs/train.py does it (parse_config -> resolve_runtime -> launch.fit),
must report a finite loss and leave a checkpoint, and is sampled by jobs.sample's main; diffusion is
also evaluated by jobs.evaluate's main (pixel FD proxy, few samples).
"""

from __future__ import annotations

import glob
import math
import os

import pytest

from shortcut_ray.config import ConfigError
from shortcut_ray.objectives.registry import names
from shortcut_ray.presets import BASELINE_METHODS, METHOD_BASES, get_preset

STEPS = 14  # PD: 7 stages of 2 steps; CT: 7 curriculum levels


# -- presets (fast) --------------------------------------------------------------------------------

def test_every_method_has_a_preset_on_every_base():
    assert set(BASELINE_METHODS) == set(names()) - {"shortcut"}
    for base in METHOD_BASES:
        ref = get_preset(base)
        for method in BASELINE_METHODS:
            cfg = get_preset(f"{base}_{method}")
            assert cfg.objective.train_type == method
            assert (cfg.model, cfg.train, cfg.eval, cfg.ema) == (ref.model, ref.train, ref.eval, ref.ema)
            assert cfg.objective.teacher_checkpoint == ""
            if method == "reflow":
                assert (cfg.data.source, cfg.data.random_flip) == ("parquet", False) and cfg.data.uri
                assert (cfg.data.image_size, cfg.data.channels, cfg.data.kind) == \
                    (ref.data.image_size, ref.data.channels, ref.data.kind)
            else:
                assert cfg.data == ref.data


@pytest.mark.parametrize("name", ["digits_consistency_distillation", "celebahq256_dit_b_progressive"])
def test_a_distillation_preset_without_teacher_says_which_teacher_to_train(name):
    from shortcut_ray.teacher import check_teacher

    base = name.rsplit("_", 2 if name.endswith("_distillation") else 1)[0]
    with pytest.raises(ConfigError, match=f"--preset {base}_flow_matching.*objective.teacher_checkpoint="):
        check_teacher(get_preset(name))


# -- every method through the jobs (slow, one Ray session) -----------------------------------------

@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("methods")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield {"root": root, "tracking": f"sqlite:///{root / 'mlflow.db'}"}
    ray.shutdown()


def _train(session, method: str, *sets: str):
    """Train like jobs/train.py; returns (result, checkpoint dir)."""
    from jobs.train import parse_config
    from shortcut_ray.launch import fit, resolve_runtime

    run = f"m-{method}"
    argv = ["--preset", "debug_cpu", "--set", f"objective.train_type={method}"]
    for s in (f"train.max_steps={STEPS}", "train.num_workers=1", "train.global_batch=16", "train.log_every=2",
              "train.sample_every=0", f"train.checkpoint_every={STEPS}",  # <= 0 would disable the final one
              f"train.storage_path={session['root'] / 'runs'}", f"train.run_name={run}",
              f"tracking.tracking_uri={session['tracking']}", "tracking.experiment=methods",
              "data.shuffle_buffer=64", "eval.sample_steps=1,4", "eval.grid_size=2", *sets):
        argv += ["--set", s]
    _, cfg = parse_config(argv)
    result = fit(resolve_runtime(cfg))
    assert result.error is None, result.error
    assert math.isfinite(result.metrics["loss"]), result.metrics
    ckpts = sorted(glob.glob(str(session["root"] / "runs" / run / "checkpoint_[0-9]*")))
    assert ckpts and os.path.exists(os.path.join(ckpts[-1], "state.json")), ckpts
    return result, ckpts[-1]


def _sample(ckpt: str, out) -> None:
    from jobs.sample import main

    assert main([ckpt, "--steps", "1,4", "--n", "4", "--out", str(out), "--device", "cpu"]) == 0
    for n in (1, 4):
        assert os.path.getsize(out / f"N{n:03d}.png") > 0


@pytest.fixture(scope="module")
def teacher(session):
    """A flow-matching checkpoint (the flow-matching method itself, and the teacher of the others)."""
    _, ckpt = _train(session, "flow_matching")
    _sample(ckpt, session["root"] / "samples-flow_matching")
    return ckpt


@pytest.mark.slow
def test_flow_matching_teacher_trains_and_samples(teacher):
    assert os.path.exists(os.path.join(teacher, "state.json"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["consistency_distillation", "progressive"])
def test_distillation_from_the_flow_matching_teacher(session, teacher, method, tmp_path):
    _, ckpt = _train(session, method, f"objective.teacher_checkpoint={teacher}")
    _sample(ckpt, tmp_path)


@pytest.mark.slow
def test_two_stage_reflow_on_pairs_from_the_teacher(session, teacher, tmp_path):
    from shortcut_ray.pairs import PairPlan, generate

    pairs = str(tmp_path / "pairs")
    result = generate(PairPlan(teacher=teacher, count=64, steps=4, shard_size=32), pairs, use_ray=False)
    assert result.manifest["paired"] and result.manifest["count"] == 64
    _, ckpt = _train(session, "reflow", "data.source=parquet", f"data.uri={pairs}", "data.random_flip=false")
    _sample(ckpt, tmp_path / "samples")


END_TO_END = {
    "consistency": ("objective.sampler=multistep",),  # jobs.sample then uses consistency sampling
    "live_reflow": (),
    "diffusion": (),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(END_TO_END))
def test_end_to_end_method_trains_and_samples_through_the_jobs(session, method, tmp_path):
    _, ckpt = _train(session, method, *END_TO_END[method])
    _sample(ckpt, tmp_path)
    if method == "diffusion":
        from jobs.evaluate import main

        assert main([ckpt, "--steps", "1,4", "--samples", "16"]) == 0
