"""Hyper-parameter sweeps: the --space parser and space filtering (fast, no Ray), and a 4-trial ASHA
sweep on a tiny CPU config against a real `mlflow server` (slow + services: minutes on 2 cores)."""

from __future__ import annotations

import json
import math

import pytest

from shortcut_ray import sweep_runs
from shortcut_ray import tune as st
from shortcut_ray import tune_space as ts
from shortcut_ray.config import Config, ConfigError, apply_overrides
from shortcut_ray.presets import get_preset


def _base(*overrides):
    # global batch 64, 2 workers, M = 128; eval off and fid_steps 1,4,128 pinned (the digits preset evaluates
    # at its end since issue 14; these tests are about how the sweep turns eval on)
    # 2 workers of 0.5 CPU pinned too: these tests were written against that layout (digits trains on 1 since issue 14)
    return apply_overrides(get_preset("digits"), ["train.eval_every=0", "eval.fid_steps=1,4,128", "train.num_workers=2",
                                                  "train.cpus_per_worker=0.5", "train.torch_threads=0", *overrides])


# -- fast: parser -------------------------------------------------------------------------------------

def test_parse_dim_kinds_and_field_types():
    assert ts.parse_dim("optim.lr=loguniform(1e-4, 1e-3)") == ts.Dim("optim.lr", "loguniform", (1e-4, 1e-3))
    assert ts.parse_dim("optim.lr=uniform(1e-4,2e-4)").kind == "uniform"
    d = ts.parse_dim("objective.bootstrap_every=choice(2, 4,8)")
    assert d.values == (2, 4, 8) and all(type(v) is int for v in d.values)
    assert ts.parse_dim("ema.decay=grid(0.99,0.999)").values == (0.99, 0.999)
    assert ts.parse_dim("ema.eval_with_ema=choice(true,false)").values == (True, False)
    assert ts.parse_dim("optim.schedule=choice(constant,cosine)").values == ("constant", "cosine")
    assert ts.parse_dim("eval.fid_steps=choice([1,4],[1,2,8])").values == ((1, 4), (1, 2, 8))
    assert ts.parse_dim("train.max_steps=randint(10,20)").values == (10, 20)
    assert ts.parse_dim("optim.lr=choice(1e-4,1e-4)").values == (1e-4,)  # duplicates collapse


@pytest.mark.parametrize("spec, match", [
    ("optim.lr=3e-4", "KIND"),
    ("optim.lr=normal(0,1)", "unknown kind"),
    ("optim.lrr=choice(1)", "unknown key"),
    ("lr=choice(1)", "section.key"),
    ("nope.lr=choice(1)", "section.key"),
    ("optim.warmup_steps=uniform(1,5)", "randint"),
    ("optim.lr=randint(1,5)", "uniform"),
    ("optim.lr=uniform(1e-3,1e-4)", "lower bound"),
    ("optim.lr=loguniform(0,1e-3)", "lo > 0"),
    ("optim.lr=uniform(1)", "exactly two"),
    ("optim.lr=choice()", "at least one"),
    ("objective.bootstrap_every=choice(2,x)", "cannot parse"),
])
def test_parse_dim_errors_say_what_to_do(spec, match):
    with pytest.raises(ConfigError, match=match):
        ts.parse_dim(spec)


# -- fast: filtering against the config ---------------------------------------------------------------

def test_bootstrap_every_filtered_by_config_validation():
    d = ts.validate_dim(_base(), ts.parse_dim("objective.bootstrap_every=choice(2,4,8,16,32)"))
    assert d.values == (2, 4, 8)  # 64 // 16 = 4 rows < 7 levels
    assert [v for v, _ in d.dropped] == [16, 32] and "global_batch" in d.dropped[0][1]
    # 2 workers: 64 // 3 = 21 bootstrap rows do not split evenly; randint becomes a filtered choice
    r = ts.validate_dim(_base(), ts.parse_dim("objective.bootstrap_every=randint(2,10)"))
    assert r.kind == "choice" and r.values == (2, 4, 5, 6, 8)
    one = ts.validate_dim(_base("train.num_workers=1"), ts.parse_dim("objective.bootstrap_every=randint(2,10)"))
    assert (one.kind, one.values, one.dropped) == ("randint", (2, 10), ())  # all valid: stays a range
    with pytest.raises(ConfigError, match="no valid value"):
        ts.validate_dim(_base(), ts.parse_dim("objective.bootstrap_every=choice(16,32)"))


def test_continuous_bounds_must_be_valid():
    assert ts.validate_dim(_base(), ts.parse_dim("ema.decay=uniform(0.9,0.999)")).values == (0.9, 0.999)
    with pytest.raises(ConfigError, match="bound 1.5"):
        ts.validate_dim(_base(), ts.parse_dim("ema.decay=uniform(0.9,1.5)"))


def test_parse_space_checks_the_whole_list():
    space = ts.parse_space(["optim.lr=loguniform(1e-4,1e-3)", "objective.bootstrap_every=grid(4,8,16)"], _base())
    assert list(space) == ["optim.lr", "objective.bootstrap_every"]
    assert space["objective.bootstrap_every"].spec() == "grid(4,8)"
    with pytest.raises(ConfigError, match="twice"):
        ts.parse_space(["optim.lr=choice(1e-4)", "optim.lr=choice(2e-4)"], _base())


def test_default_space():
    space = ts.default_space(_base())
    assert space["objective.bootstrap_every"].values == (2, 4, 8)
    assert space["ema.decay"].values == (0.99, 0.995)  # 1/(1-0.999) = 1000 > 1500/4 steps: dropped
    assert ts.default_space(_base("train.max_steps=100000"))["ema.decay"].values == ts.EMA_DECAY_CANDIDATES
    assert ts.default_space(_base("train.max_steps=16"))["ema.decay"].values == (0.99, 0.995)  # at least two
    assert list(ts.default_space(_base("objective.train_type=flow_matching"))) == ["ema.decay"]


# -- fast: metric, ASHA budget, concurrency, trial config ---------------------------------------------

def test_check_metric_turns_eval_on_and_rejects_unreportable_metrics():
    assert ts.check_metric(_base(), "eval/fd_pixel/N1").train.eval_every == 1500 // 4
    assert ts.check_metric(_base("train.eval_every=100"), "eval/fd_pixel/N1").train.eval_every == 100
    assert ts.check_metric(_base(), "loss").train.eval_every == 0
    with pytest.raises(ConfigError, match="fid_weights"):
        ts.check_metric(_base(), "eval/fid/N1")
    with pytest.raises(ConfigError, match="fid_steps"):
        ts.check_metric(_base(), "eval/fd_pixel/N2")


def test_asha_grace_period_lands_on_report_steps():
    assert ts.asha_grace_period(_base("train.eval_every=375"), "eval/fd_pixel/N1") == 375
    assert ts.asha_grace_period(_base("train.eval_every=50"), "eval/fd_pixel/N1") == 200  # ~1500/8, x50
    assert ts.asha_grace_period(_base("train.max_steps=16", "train.eval_every=8"), "eval/fd_pixel/N1") == 8
    assert ts.asha_grace_period(_base("train.checkpoint_every=500"), "loss") == 500


def test_max_concurrent_trials():
    t = _base("train.num_workers=1", "train.cpus_per_worker=0.5").train
    assert ts.max_concurrent_trials({"CPU": 2.0, "train_driver": 2.0}, t) == 2  # 1 CPU left to Ray Data
    assert ts.max_concurrent_trials({"CPU": 2.0, "train_driver": 1.0}, t) == 1
    assert ts.max_concurrent_trials({"CPU": 2.0}, t, driver_cpus=0.01) == 1
    g = _base("train.num_workers=2", "train.use_gpu=true", "train.cpus_per_worker=4").train
    assert ts.max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, g) == 4
    assert ts.max_concurrent_trials({"CPU": 20.0, "GPU": 8.0}, g) == 2
    with pytest.raises(ConfigError, match="cluster has"):
        ts.max_concurrent_trials({"CPU": 1.0}, t)


def test_trial_config_applies_sampled_values_and_identity():
    base = _base("tracking.tags=team=x")
    config = {"objective.bootstrap_every": 4, "ema.decay": 0.995, "eval.fid_steps": [1, 4],
              "sweep": {"name": "s", "parent_run_id": "p123", "train_storage": "/r/s/train", "base_config": "unused"}}
    cfg = st.trial_config(config, "abc_00001", base)
    assert (cfg.objective.bootstrap_every, cfg.ema.decay, cfg.eval.fid_steps) == (4, 0.995, (1, 4))
    assert cfg.train.run_name == cfg.tracking.run_name == "s-abc_00001"
    assert cfg.train.storage_path == "/r/s/train" and cfg.tracking.parent_run_id == "p123"
    assert cfg.tracking.tags == "team=x,sweep=s,trial_id=abc_00001"


def test_param_space_per_search_algorithm():
    pytest.importorskip("ray.tune")
    space = ts.parse_space(["objective.bootstrap_every=choice(2,4)", "ema.decay=grid(0.99,0.995)"], _base())
    rnd = ts.param_space(space, "random")
    assert type(rnd["objective.bootstrap_every"]).__name__ == "Categorical" and "grid_search" in rnd["ema.decay"]
    assert "grid_search" in ts.param_space(space, "grid")["objective.bootstrap_every"]
    with pytest.raises(ConfigError, match="discrete"):
        ts.param_space({"optim.lr": ts.parse_dim("optim.lr=uniform(1e-4,1e-3)")}, "grid")
    assert ts.expected_trials(space, "random", 3) == 6 and ts.expected_trials(space, "grid", 1) == 4


def test_tune_config_limits_concurrency_and_sets_asha_rungs():
    pytest.importorskip("ray.tune")
    base = _base("train.eval_every=375")
    tc = st._tune_config("asha", "random", st.DEFAULT_METRIC, "min", 8, 3, base)
    # Tune ignores TuneConfig.max_concurrent_trials for an explicit BasicVariantGenerator
    assert tc.search_alg.max_concurrent == 3 and tc.max_concurrent_trials is None
    assert (tc.scheduler._max_t, tc.scheduler._time_attr) == (1500, "step")
    assert sorted(m for m, _ in tc.scheduler._brackets[0]._rungs) == [375, 750, 1500]
    assert type(st._tune_config("fifo", "grid", "loss", "min", 1, 2, base).scheduler).__name__ == "FIFOScheduler"
    with pytest.raises(ConfigError, match="scheduler"):
        st._tune_config("pbt", "random", "loss", "min", 1, 2, base)


# -- slow: a real sweep ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    import ray

    st.init_local_ray(num_cpus=2, driver_slots=4)
    yield
    ray.shutdown()


def _sweep_config(tmp_path, uri):
    # DiT-T on batches of 16 with M = 8 (3 step levels): bootstrap_every 8, 16 and 32 leave a level
    # without rows and are filtered out of the default space, so trials draw from {2, 4} x {0.99, 0.995}.
    # 1 worker at 0.25 CPU: all 4 trials run at once on 2 CPUs, with 1 CPU left to Ray Data.
    return apply_overrides(get_preset("debug_cpu"), [
        "train.global_batch=16", "objective.denoise_timesteps=8", "objective.bootstrap_every=4", "train.max_steps=16",
        "train.num_workers=1", "train.cpus_per_worker=0.25", "train.checkpoint_every=8", "train.eval_every=8",
        "train.log_every=8",
        "train.sample_every=0", "eval.sample_steps=1", "eval.grid_size=2", "eval.fid_steps=1", "eval.fid_samples=16",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", "tracking.experiment=test-sweep"])


@pytest.mark.slow
@pytest.mark.services
def test_asha_sweep_nested_mlflow_runs_and_best_config(tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from tests.services import mlflow_server

    with mlflow_server(tmp_path) as uri:
        cfg = _sweep_config(tmp_path, uri)
        out = st.run_sweep(cfg, name="s1", num_samples=4)  # default space, ASHA, all 4 trials at once
        assert out.finished and len(out.trials) == 4 and all(t["status"] == "TERMINATED" for t in out.trials)
        assert out.best_trial_id and math.isfinite(out.best_value)
        assert out.best_config.train.run_name == f"s1-{out.best_trial_id}"
        assert out.best_checkpoint.endswith("checkpoint_0000016")
        assert (tmp_path / "runs" / "s1" / "train" / f"s1-{out.best_trial_id}" / "checkpoint_0000016").is_dir()

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("test-sweep")
        parents = client.search_runs([exp.experiment_id], "tags.sweep = 's1' and tags.`sweep.role` = 'parent'")
        assert len(parents) == 1
        parent = parents[0]
        assert parent.info.run_id == out.parent_run_id and parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
        assert len(children) == 4
        assert {c.data.tags["ray_run_name"] for c in children} == {t["run_name"] for t in out.trials}
        for c in children:
            stopped = next(t for t in out.trials if t["run_name"] == c.data.tags["ray_run_name"])["step"] < 16
            # an ASHA-stopped trial's run is closed as KILLED; with 8 steps left, its Train run may still
            # finish (and end its run FINISHED) before the trial actor is gone. Never left RUNNING.
            assert c.info.status in (("KILLED", "FINISHED") if stopped else ("FINISHED",)), c.info.status
            assert c.data.tags["sweep.stopped_early"] == str(stopped).lower()
            assert int(c.data.params["objective.bootstrap_every"]) in (2, 4)
            assert c.data.params["ema.decay"] in ("0.99", "0.995")
            assert "eval/fd_pixel/N1" in c.data.metrics

        # parent: base config + space as params; best trial's params, metric, checkpoint and config
        p = parent.data
        assert p.params["space.objective.bootstrap_every"] == "choice(2,4)" and p.params["train.max_steps"] == "16"
        best = next(t for t in out.trials if t["trial_id"] == out.best_trial_id)
        assert p.params["best.objective.bootstrap_every"] == str(best["params"]["objective.bootstrap_every"])
        assert p.params["best.trial_id"] == out.best_trial_id
        assert p.metrics["best/eval/fd_pixel/N1"] == pytest.approx(out.best_value)
        assert p.tags["best.checkpoint"] == out.best_checkpoint and p.tags["best.run_id"] == out.best_run_id
        local = client.download_artifacts(out.parent_run_id, "best_config.json", str(tmp_path))
        best_cfg = Config.from_dict(json.load(open(local)))
        assert best_cfg == out.best_config
        assert best_cfg.objective.bootstrap_every == best["params"]["objective.bootstrap_every"]

        # same name again: refused without --resume; with it, the finished sweep is restored, not re-run
        with pytest.raises(ConfigError, match="--resume"):
            st.run_sweep(cfg, name="s1", num_samples=4)
        again = st.run_sweep(cfg, name="s1", num_samples=4, resume=True)
        assert again.best_trial_id == out.best_trial_id and again.parent_run_id == out.parent_run_id
        assert len(client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")) == 4

        # the closing pass itself: runs a killed trial left RUNNING get the status they are given
        from shortcut_ray.tracking import MlflowTracker

        tracker = MlflowTracker(uri, "test-sweep")
        ids = {n: client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": "p0", "ray_run_name": n}).info.run_id
               for n in ("a", "b", "c")}
        assert sorted(sweep_runs.close_trial_runs(tracker, "p0", {"b": "FAILED", "c": "FINISHED"})) == sorted(ids.values())
        statuses = {n: client.get_run(i).info.status for n, i in ids.items()}
        assert statuses == {"a": "KILLED", "b": "FAILED", "c": "FINISHED"}
