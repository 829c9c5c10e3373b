"""Faults and bad input (issue: no hang, nothing lost, nothing run, no silent success).

Each test reproduces one probe that failed before its fix. Tests that need Ray are marked slow.
"""

from __future__ import annotations

import os
import re
import threading

import pytest

from shortcut_ray.config import apply_overrides
from shortcut_ray.presets import get_preset


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_eval_between_checkpoints_does_not_hang(tmp_path, local_ray):
    """Point 0: every rank must make the same ray.train.report calls. Eval at 3, 6, 9 is not a checkpoint
    step (10); only rank 0 holds eval metrics, so branching on them left rank 0 in report's barrier and
    rank 1 in the next step's all-gather, forever."""
    from shortcut_ray.launch import fit, resolve_runtime

    cfg = apply_overrides(get_preset("debug_cpu"), [
        "train.eval_every=3", "train.checkpoint_every=10", "train.max_steps=12", "train.num_workers=2",
        "train.sample_every=0", "train.log_every=4", "eval.fid_samples=16", "eval.fid_steps=1,2",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=cadence", "tracking.enabled=false"])
    box: dict = {}

    def target():
        try:
            box["result"] = fit(resolve_runtime(cfg))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout=300)
    assert not th.is_alive(), "training with eval between checkpoints hung (report barrier mismatch)"
    assert "error" not in box, box.get("error")
    assert box["result"].metrics["step"] == 12


def _cfg(tmp_path, name, *overrides, tracking=False):
    sets = [f"train.storage_path={tmp_path / 'runs'}", f"train.run_name={name}", "train.sample_every=0",
            "train.num_workers=2", "train.log_every=5", "eval.fid_samples=16"]
    sets += [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracking else ["tracking.enabled=false"]
    return apply_overrides(get_preset("debug_cpu"), [*sets, *overrides])


@pytest.mark.slow
def test_divergence_stops_fast_keeps_last_good_checkpoint_and_fails_mlflow_run(tmp_path, local_ray):
    """Point 1: a diverged run (lr 1e30 after a good start) used to run on, report success, write non-finite
    checkpoints and rotate the good ones away. Now: a DivergenceError naming the step and the last good
    checkpoint, raised without retries; no checkpoint after it; the MLflow run FAILED with the reason."""
    import time

    from mlflow.tracking import MlflowClient

    from shortcut_ray.faults import DivergenceError, find_permanent
    from shortcut_ray.launch import fit, resolve_runtime

    t0 = time.perf_counter()
    good = fit(resolve_runtime(_cfg(tmp_path, "div", "train.max_steps=10", "train.checkpoint_every=5",
                                    tracking=True)))
    good_s = time.perf_counter() - t0
    assert good.metrics["step"] == 10
    t0 = time.perf_counter()
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray wraps it; the cause is checked below
        fit(resolve_runtime(_cfg(tmp_path, "div", "train.max_steps=60", "train.checkpoint_every=5",
                                 "train.num_to_keep=1", "train.max_failures=3", "optim.lr=1e30", tracking=True)))
    elapsed = time.perf_counter() - t0
    err = find_permanent(info.value)
    assert isinstance(err, DivergenceError), info.value
    assert "checkpoint_0000010" in str(err) and re.search(r"at step 1\d ", str(err)), str(err)
    # one attempt costs about what the 10-step run did (start-up dominates); max_failures=3 retries would be 4x
    assert elapsed < 1.5 * good_s + 20, f"divergence took {elapsed:.0f} s to surface, a good run {good_s:.0f} s: retried?"
    run_dir = tmp_path / "runs" / "div"
    ckpts = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_0"))
    assert ckpts[-1] == "checkpoint_0000010", ckpts  # nothing after the divergence; the good one kept
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shortcut-ray").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "diverged" in runs[0].data.tags["failure_reason"]


# -- point 2: loading a checkpoint never runs code from it --------------------------------------------------
class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A real single-process checkpoint of the debug model after one step: (dir, TrainState)."""
    import torch

    from shortcut_ray import checkpoint
    from shortcut_ray.train_step import TrainState

    cfg = apply_overrides(get_preset("debug_cpu"), ["train.num_workers=1"])
    st = TrainState.create(cfg)
    g = torch.Generator().manual_seed(0)
    st.step_on(torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint_0000001")
    checkpoint.save(path, st.model, st.ema, st.optimizer, 1, cfg, extra={"run_name": "t"})
    return path, st


def _poisoned_copy(src, dst, marker):
    """A copy of `src` whose .metadata also holds a pickled os.system call (DCP's own unpickler runs it)."""
    import os
    import pickle
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, ".metadata"), "rb") as f:
        meta = pickle.load(f)  # our own, trusted file
    meta.planner_data = {"x": _Evil(marker)}
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    os.remove(os.path.join(dst, "weights.safetensors"))  # force the DCP path
    return dst


def test_malicious_dcp_metadata_is_refused_and_never_run(saved_checkpoint, tmp_path):
    """Point 2: DCP read .metadata with pickle.load, so a crafted checkpoint ran a shell command under
    jobs.sample, jobs.evaluate, --resume and resume_from. Every load path refuses it; the marker never appears."""
    import torch.distributed.checkpoint as dcp

    from shortcut_ray import checkpoint
    from shortcut_ray.safe_dcp import UntrustedCheckpointError
    from shortcut_ray.train_step import TrainState

    src, st = saved_checkpoint
    marker = tmp_path / "pwned"
    bad = _poisoned_copy(src, str(tmp_path / "bad"), marker)
    with pytest.raises(UntrustedCheckpointError, match="posix.system|os.system"):
        checkpoint.load_for_inference(bad, "ema")
    fresh = TrainState.create(st.cfg)
    with pytest.raises(UntrustedCheckpointError):
        checkpoint.load(bad, fresh.model, fresh.ema, fresh.optimizer)
    from jobs import sample

    assert sample.main([bad, "--steps", "1", "--n", "4", "--out", str(tmp_path / "s")]) == 1
    assert not marker.exists(), "code from the checkpoint ran"
    # the probe is real: torch's own reader runs it
    model, _, _ = checkpoint.load_for_inference(src, "ema")
    dcp.load({"ema": model.state_dict()}, checkpoint_id=bad, no_dist=True)
    assert marker.exists()


def test_safe_loader_restores_everything_and_safetensors_export_matches(saved_checkpoint, tmp_path):
    """The allow-list is not too strict: a real checkpoint (model, EMA, optimiser incl. param groups) loads;
    weights.safetensors (online and EMA) gives the same tensors; jobs.sample accepts the export."""
    import os
    import shutil

    import torch

    from shortcut_ray import checkpoint
    from shortcut_ray.train_step import TrainState

    src, st = saved_checkpoint
    fresh = TrainState.create(st.cfg)
    meta = checkpoint.load(src, fresh.model, fresh.ema, fresh.optimizer)
    assert meta["step"] == 1
    for a, b in zip(st.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.optimizer.param_groups[0]["lr"] == st.optimizer.param_groups[0]["lr"]
    assert len(fresh.optimizer.state) == len(st.optimizer.state) > 0
    dcp_only = shutil.copytree(src, str(tmp_path / "dcp_only"))
    os.remove(os.path.join(dcp_only, "weights.safetensors"))
    for role, live in (("online", st.model), ("ema", st.ema)):
        from_st, _, m1 = checkpoint.load_for_inference(os.path.join(src, "weights.safetensors"), role)
        from_dcp, _, _ = checkpoint.load_for_inference(dcp_only, role)
        assert m1["step"] == 1 and m1["run_name"] == "t"
        for (k, a), b, c in zip(from_st.state_dict().items(), from_dcp.state_dict().values(), live.state_dict().values()):
            assert torch.equal(a, b) and torch.equal(a, c), k
    assert not torch.equal(next(st.model.parameters()), next(st.ema.parameters()))  # roles really differ
    from jobs import sample

    out = tmp_path / "samples"
    assert sample.main([os.path.join(src, "weights.safetensors"), "--steps", "1", "--n", "4", "--out", str(out)]) == 0
    assert (out / "N001.png").exists()


def _pre_fusion_copy(src: str, dst: str) -> str:
    """`src` rewritten as a checkpoint of the three-projection attention (before q/k/v were fused):
    every `*.attn.qkv.*` entry split into q, k and v rows, the optimiser's name lists likewise, and no
    weights.safetensors (forces the DCP path)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from shortcut_ray import safe_dcp

    legacy = {}
    for key, value in safe_dcp.read_all(src).items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", value.chunk(3) if value.dim() else [value] * 3):
                legacy[key.replace(".attn.qkv.", f".attn.{part}.")] = chunk.clone()
        elif key.endswith(".params"):
            legacy[key] = [n.replace(".attn.qkv.", f".attn.{p}.") for n in value
                           for p in ("qkv" if ".attn.qkv." in n else "-")]
        else:
            legacy[key] = value
    with safe_dcp.single_process_quiet():
        dcp.save(legacy, checkpoint_id=dst, no_dist=True)
    shutil.copy(os.path.join(src, "state.json"), dst)
    return dst


def test_checkpoint_written_before_the_qkv_fusion_still_resumes_and_samples(saved_checkpoint, tmp_path):
    """A run checkpointed before q/k/v became one projection resumes with identical model, EMA and Adam
    state (DCP matches entries by name, so it is converted into a private copy first, removed after)."""
    import glob
    import tempfile

    import torch

    from shortcut_ray import checkpoint, safe_dcp
    from shortcut_ray.train_step import TrainState

    src, st = saved_checkpoint
    old = _pre_fusion_copy(src, str(tmp_path / "pre_fusion"))
    stored = safe_dcp.SafeReader(old).read_metadata().state_dict_metadata
    assert "optim.state.blocks.0.attn.k.weight.exp_avg" in stored and not any(".qkv." in k for k in stored)
    fresh, again = TrainState.create(st.cfg), TrainState.create(st.cfg)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "shortcut-fused-qkv-*")))
    assert checkpoint.load(old, fresh.model, fresh.ema, fresh.optimizer)["step"] == 1
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "shortcut-fused-qkv-*"))) == before  # removed
    checkpoint.load(src, again.model, again.ema, again.optimizer)
    for (k, a), b in zip(fresh.model.state_dict().items(), st.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(fresh.ema.parameters(), st.ema.parameters()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["param_groups"] == st.optimizer.state_dict()["param_groups"]
    for (pa, sa), sb in zip(fresh.optimizer.state_dict()["state"].items(), st.optimizer.state_dict()["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), pa
    g = torch.Generator().manual_seed(1)  # and training continues exactly as from today's checkpoint
    x, y = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    fresh.step_on(x, y)
    again.step_on(x, y)
    for a, b in zip(fresh.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    model, _, _ = checkpoint.load_for_inference(old, "ema")
    for (k, a), b in zip(model.state_dict().items(), st.ema.state_dict().values()):
        assert torch.equal(a, b), k


def _load_both_sharded(rank: int, world: int, init: str, old: str, src: str, out: str) -> None:
    """One rank of the 2-process test: FSDP2 states restored from the pre-fusion copy and from the
    original (DCP coordinated across the ranks); rank 0 writes whether every full tensor agrees."""
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from shortcut_ray import checkpoint
    from shortcut_ray.distributed import is_sharded
    from shortcut_ray.train_step import TrainState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = apply_overrides(get_preset("debug_cpu"), [f"train.num_workers={world}"])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = []
    for path in (old, src):
        st = TrainState.create(cfg)
        checkpoint.load(path, st.model, st.ema, st.optimizer)
        adam = get_optimizer_state_dict(st.model, st.optimizer, options=full).get("state", {})  # rank 0 only
        states.append({**{f"model.{k}": v for k, v in get_model_state_dict(st.model, options=full).items()},
                       **{f"ema.{k}": v for k, v in get_model_state_dict(st.ema, options=full).items()},
                       **{f"adam.{k}.{m}": t for k, d in adam.items() for m, t in d.items()}})
    if rank == 0:
        differ = [k for k in states[1] if not torch.equal(states[0][k], states[1][k])]
        with open(out, "w") as f:
            json.dump({"sharded": is_sharded(st.model), "tensors": len(states[1]), "differ": differ}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_pre_fusion_checkpoint_resumes_on_two_fsdp2_ranks(saved_checkpoint, tmp_path):
    """Each rank converts into its own private copy; the coordinated DCP load of those copies restores
    what today's checkpoint restores, tensor for tensor."""
    import json

    import torch.multiprocessing as mp

    src, _ = saved_checkpoint
    old = _pre_fusion_copy(src, str(tmp_path / "pre_fusion"))
    out = tmp_path / "result.json"
    mp.spawn(_load_both_sharded, args=(2, f"file://{tmp_path}/pg", old, src, str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert res["sharded"] and res["tensors"] > 60 and res["differ"] == [], res  # model, EMA and Adam state


def test_sample_on_missing_or_non_checkpoint_path_is_one_line_error(tmp_path, capsys):
    """Point 7: jobs.sample on a missing path printed a 16-line FileNotFoundError traceback."""
    from jobs import sample

    assert sample.main([str(tmp_path / "nope"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert sample.main([str(tmp_path / "empty"), "--steps", "1"]) == 1
    assert "has no state.json" in capsys.readouterr().err


# -- point 3/6/7: fail fast on the driver, before any worker --------------------------------------------
def _train_main(tmp_path, *sets, resume=""):
    """jobs.train.main with small settings; returns (exit code, stderr+stdout, seconds)."""
    import contextlib
    import io
    import time

    from jobs import train

    argv = ["--preset", "debug_cpu", "--set", f"train.storage_path={tmp_path / 'runs'}"]
    for s in sets:
        argv += ["--set", s]
    if resume:
        argv += ["--resume", resume]
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        rc = train.main(argv)
    return rc, out.getvalue(), time.perf_counter() - t0


def test_unreachable_tracking_server_fails_in_seconds_before_workers(tmp_path):
    """Point 3: MLflow down cost 13.5 minutes (HTTP retries x worker-group restarts) before failing."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, secs = _train_main(tmp_path, f"tracking.tracking_uri=http://127.0.0.1:{port}", "train.run_name=x")
    assert rc == 1 and secs < 15, (rc, secs, out)
    assert "unreachable" in out and "tracking.enabled=false" in out and "Traceback" not in out, out
    assert not (tmp_path / "runs" / "x").exists()  # no worker ever started


def test_storage_path_not_writable_fails_before_workers(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    rc, out, secs = _train_main(tmp_path, f"train.storage_path={tmp_path / 'afile' / 'runs'}",
                                "tracking.enabled=false")
    assert rc == 1 and secs < 15 and "cannot write to the run storage path" in out, out


def test_unreachable_object_store_fails_within_15_s_with_one_clear_line(monkeypatch):
    """gs:// with nothing answering (here: an emulator address where no server listens): gcsfs retries
    for about a minute and ended in raw aiohttp tracebacks; the driver's probe gives up in seconds."""
    import time

    from shortcut_ray.faults import PermanentError
    from shortcut_ray.preflight import check_storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(PermanentError, match="cannot write to the run storage path gs://no-such-bucket/runs"):
        check_storage("gs://no-such-bucket/runs")
    assert time.monotonic() - t0 < 15


def _bad_dataset(tmp_path, how):
    """A real digits shard set, damaged `how`; returns (uri, damaged shard file name)."""
    import json

    from shortcut_ray.shards import write_digits

    uri = str(tmp_path / f"data-{how}")
    manifest = write_digits(uri, 16)
    name = manifest["shards"][0]["file"]
    shard = tmp_path / f"data-{how}" / name
    raw = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "flipped":
        mid = len(raw) // 2
        raw[mid: mid + 64] = bytes(b ^ 0xFF for b in raw[mid: mid + 64])
        shard.write_bytes(bytes(raw))
    elif how == "counts":
        manifest["shards"][0]["rows"] += 7
        (tmp_path / f"data-{how}" / "manifest.json").write_text(json.dumps(manifest))
    return uri, name


@pytest.mark.parametrize("how,says", [("truncated", "bytes"), ("flipped", "sha256"), ("counts", "rows")])
def test_damaged_dataset_is_refused_on_the_driver_naming_the_shard(tmp_path, how, says):
    """Point 6: checksums and counts in the manifest were never verified (a mismatch trained to the end);
    a truncated shard failed with a raw ArrowInvalid that did not name the file."""
    uri, name = _bad_dataset(tmp_path, how)
    rc, out, secs = _train_main(tmp_path, "data.source=parquet", f"data.uri={uri}", "tracking.enabled=false")
    assert rc == 1 and secs < 15, (rc, secs, out)
    assert name in out and says in out and "re-run jobs.prepare_data" in out and "Traceback" not in out, out


def test_resume_of_a_missing_run_lists_the_runs_it_can_see(tmp_path):
    """Point 4: `--resume NAME` of a run that does not exist silently started a new run from step 0."""
    (tmp_path / "runs" / "digits-shortcut-20261122-101500").mkdir(parents=True)
    rc, out, secs = _train_main(tmp_path, "tracking.enabled=false", resume="digits-shortcut-2026112-101500")
    assert rc == 1 and secs < 15
    assert "no such run" in out and "digits-shortcut-20261122-101500" in out, out
    assert not (tmp_path / "runs" / "digits-shortcut-2026112-101500").exists()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One local MLflow store for the tracking tests of this module (creating one takes ~30 s here)."""
    from shortcut_ray.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowTracker(uri, "warm-up")
    return uri


def test_mlflow_trouble_mid_run_warns_keeps_metrics_and_catches_up(sqlite_uri, capsys):
    """Point 3: MLflow trouble in the middle of a run must not kill training; metrics logged during the
    outage arrive once the server answers again."""
    import time

    from mlflow.tracking import MlflowClient

    from shortcut_ray.tracking import MlflowTracker

    tr = MlflowTracker(sqlite_uri, "mid-run")
    tr.start("r", {})
    tr.log_metrics({"train/loss": 1.0}, 1)
    good = tr.client
    tr.client = MlflowClient("http://127.0.0.1:9")  # the server goes away (nothing listens on port 9)
    t0 = time.perf_counter()
    tr.log_metrics({"train/loss": 2.0}, 2)
    tr.log_image(__import__("numpy").zeros((4, 4, 3), "uint8"), "x.png")
    tr.set_tags({"a": "b"})
    assert time.perf_counter() - t0 < 30  # one failed call; the others skip during the outage
    assert capsys.readouterr().err.count("training continues") == 1  # one warning per outage
    tr.client = good  # back
    tr.retry_after_s = 0.0  # (60 s in a run)
    tr.log_metrics({"train/loss": 3.0}, 3)
    hist = [(m.step, m.value) for m in good.get_metric_history(tr.run_id, "train/loss")]
    assert sorted(hist) == [(1, 1.0), (2, 2.0), (3, 3.0)]


# -- point 4/5: config validation -------------------------------------------------------------------------
@pytest.mark.parametrize("override,says", [
    ("objective.bootstrap_every=1", "nothing is learned"),
    ("optim.lr=inf", "finite"), ("optim.lr=nan", "finite"),
    ("train.max_failures=-5", "-1 for unlimited"),
    ("train.run_name=../escaped", "one folder name"), ("train.run_name=a/b", "one folder name"),
    ("train.run_name=..", "one folder name"),
])
def test_config_refuses_inputs_that_train_nothing_or_escape_storage(override, says):
    from shortcut_ray.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        apply_overrides(get_preset("debug_cpu"), [override])


def test_config_accepts_the_edges_it_should():
    cfg = apply_overrides(get_preset("debug_cpu"), ["train.max_failures=-1", "objective.bootstrap_every=2",
                                                    "train.run_name=digits-shortcut-20261122-101500"])
    assert cfg.train.max_failures == -1
    apply_overrides(get_preset("debug_cpu"), ["objective.train_type=flow_matching", "objective.bootstrap_every=1"])


def test_global_batch_suggestion_is_accepted():
    """global_batch=63 with 2 workers suggested 62, which the bootstrap layout then rejected."""
    import re as _re

    from shortcut_ray.config import ConfigError

    for bad in (63, 62, 50, 17):
        cfg, msg = get_preset("debug_cpu"), ""
        try:
            apply_overrides(cfg, [f"train.global_batch={bad}"])
            continue
        except ConfigError as e:
            msg = str(e)
        suggested = int(_re.findall(r"(?:train.global_batch=|at least )(\d+)", msg)[-1])
        assert apply_overrides(cfg, [f"train.global_batch={suggested}"]).train.global_batch == suggested, msg


def test_experiment_is_created_on_the_driver_with_durable_artifacts(sqlite_uri, tmp_path):
    """Point 8 of the issue: created inside a Ray worker, the experiment's artifact location was the worker's
    temporary directory (/tmp/ray/session_*/...); every later run of it wrote its grids there."""
    import os

    from mlflow.tracking import MlflowClient

    from shortcut_ray import preflight
    from shortcut_ray.tracking import ensure_experiment

    cfg = apply_overrides(get_preset("debug_cpu"), [f"tracking.tracking_uri={sqlite_uri}", "tracking.experiment=durable"])
    preflight.check_tracking(cfg)
    client = MlflowClient(sqlite_uri)
    loc = client.get_experiment_by_name("durable").artifact_location
    store_dir = os.path.dirname(sqlite_uri.removeprefix("sqlite:///"))
    assert loc.removeprefix("file://") == os.path.join(store_dir, "mlartifacts", "durable"), loc
    client.create_experiment("old", artifact_location="/tmp/ray/session_2026-11-22_10-15-00_1_1/artifacts/x/mlruns/1")
    said: list[str] = []
    ensure_experiment(apply_overrides(cfg, ["tracking.experiment=old"]).tracking, log=said.append)
    assert len(said) == 1 and "temporary directory" in said[0] and "tracking.experiment" in said[0]


def test_redone_steps_after_a_restore_are_not_logged_twice(sqlite_uri):
    """Point 9: a restore redoes the steps after the last checkpoint; they were logged a second time."""
    from shortcut_ray.tracking import MlflowTracker

    first = MlflowTracker(sqlite_uri, "redo")
    run_id = first.start("r", {})
    for step in range(1, 8):
        first.log_metrics({"train/loss": float(step)}, step)
    again = MlflowTracker(sqlite_uri, "redo")  # the restarted rank 0, restored from the step-4 checkpoint
    again.start("r", {}, run_id)
    for step in range(5, 11):
        again.log_metrics({"train/loss": 100.0 + step}, step)
    hist = sorted((m.step, m.value) for m in again.client.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in hist] == list(range(1, 11))
    assert dict(hist)[7] == 7.0 and dict(hist)[8] == 108.0
    assert again.client.get_run(run_id).data.tags["metrics.not_relogged_through_step"] == "7"
    again.log_metrics({"eval/fd_pixel/N1": 3.0}, 7)  # new to the run at a held step (jobs.evaluate): logged
    assert [m.step for m in again.client.get_metric_history(run_id, "eval/fd_pixel/N1")] == [7]


def test_interrupted_runs_are_marked_killed(sqlite_uri):
    """Point 9: an interrupted driver left its MLflow run RUNNING forever (its workers die with it)."""
    from shortcut_ray.tracking import MlflowTracker, close_interrupted

    cfg = apply_overrides(get_preset("debug_cpu"), [f"tracking.tracking_uri={sqlite_uri}", "tracking.experiment=kill"])
    tr = MlflowTracker(sqlite_uri, "kill")
    run_id = tr.start("r", {"ray_run_name": "victim"})
    other = tr.start("o", {"ray_run_name": "bystander"})
    assert close_interrupted(cfg.tracking, "victim", "KILLED", "the driver was interrupted") == 1
    assert tr.client.get_run(run_id).info.status == "KILLED"
    assert tr.client.get_run(other).info.status == "RUNNING"


def test_staging_folders_of_dead_processes_are_cleaned(tmp_path):
    """Point 9: killed workers left their checkpoint staging folders in /tmp (1.5 GB after six kills)."""
    import os
    import subprocess

    from shortcut_ray import checkpoint

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{checkpoint.STAGING_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{checkpoint.STAGING_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for d in (stale, live, other):
        d.mkdir()
    assert checkpoint.clean_stale_staging(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()
    mine = checkpoint.staging_dir()
    os.rmdir(mine)
    assert os.path.basename(mine).startswith(f"{checkpoint.STAGING_PREFIX}{os.getpid()}-")


# -- permanent errors through Ray: not retried, one paragraph, non-zero exit -------------------------------
@pytest.mark.slow
def test_checkpoint_of_another_model_size_fails_once_with_a_clear_message(tmp_path, saved_checkpoint, local_ray):
    """Point 7: a checkpoint of another model size was retried max_failures times and ended in a raw
    `Size mismatch ... model.x_embed.weight` inside a WorkerGroupError traceback."""
    path, _ = saved_checkpoint  # DiT-T: hidden 64
    rc, out, secs = _train_main(tmp_path, f"train.resume_from={path}", "model.hidden_size=128", "model.num_heads=2",
                                "train.max_failures=3", "train.run_name=wrong-size", "tracking.enabled=false",
                                "train.sample_every=0")
    assert rc == 1, out
    assert "holds a model of another shape" in out and "WorkerGroupError" not in out.split("failed:")[-1], out
    assert secs < 240, f"{secs:.0f} s to surface a permanent error (one attempt: ~30 s idle, ~2 min at load 50)"


@pytest.mark.slow
def test_interrupted_driver_marks_its_mlflow_run_killed(tmp_path, sqlite_uri, local_ray):
    """Point 9: Ctrl-C on `python -m jobs.train` left its MLflow run RUNNING forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import ray

    # the driver joins this module's cluster: a second local cluster did not start in time at load 50
    env = {**os.environ, "PYTHONPATH": root, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", "--preset", "debug_cpu", "--set", "train.max_steps=100000",
         "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0", "--set", "train.num_workers=1",
         "--set", "train.global_batch=64", "--set", f"train.storage_path={tmp_path / 'runs'}",
         "--set", "train.run_name=ctrl-c", "--set", f"tracking.tracking_uri={sqlite_uri}",
         "--set", "tracking.experiment=ctrl-c"], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(sqlite_uri)
    try:
        deadline = time.time() + 300
        runs = []
        while time.time() < deadline and not runs:
            time.sleep(3)
            exp = client.get_experiment_by_name("ctrl-c")
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
            assert proc.poll() is None, proc.stdout.read()
        assert runs, "the run never started"
        time.sleep(5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED", out[-3000:]


def test_workers_that_reserve_every_cpu_are_refused_with_the_setting_that_fits():
    from shortcut_ray.config import override
    from shortcut_ray.faults import PermanentError
    from shortcut_ray.preflight import check_cpus

    cfg = override(get_preset("digits"), {"train.num_workers": 1, "train.cpus_per_worker": 2})
    with pytest.raises(PermanentError, match=r"leave none for Ray Data.*train\.cpus_per_worker=1\b"):
        check_cpus(cfg, cluster_cpus=2)  # would wait forever for a read slot (Ray Data only warns)
    two = override(cfg, {"train.num_workers": 2, "train.cpus_per_worker": 1})
    with pytest.raises(PermanentError, match=r"train\.cpus_per_worker=0\.5\b"):
        check_cpus(two, cluster_cpus=2)
    check_cpus(override(cfg, {"train.cpus_per_worker": 1}), cluster_cpus=2)  # one CPU left: fine
    check_cpus(cfg, cluster_cpus=2, autoscaling=True)  # a cluster that can grow gets the benefit of the doubt
