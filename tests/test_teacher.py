"""Distillation teachers (ALGORITHM §6.3, §6.4): driver-side checks, frozen teacher + student init, and
progressive distillation's stage teacher across a checkpoint. No Ray: CPU, single process."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch

from shortcut_ray import checkpoint, storage, teacher
from shortcut_ray.config import ConfigError, apply_overrides
from shortcut_ray.objectives.flow_matching import FlowMatchingObjective
from shortcut_ray.presets import get_preset
from shortcut_ray.train_step import TrainState

FM = ["objective.train_type=flow_matching", "train.num_workers=1", "data.image_size=8", "train.global_batch=8"]


def _cfg(*extra):
    return apply_overrides(get_preset("debug_cpu"), [*FM, *extra])


def _save_teacher(path, cfg, seed=0) -> str:
    """A flow-matching checkpoint whose online and EMA weights differ (random final layers)."""
    torch.manual_seed(seed)
    st = TrainState.create(cfg)
    for m in (st.model, st.ema):
        torch.nn.init.normal_(m.final.linear.weight, std=0.3)
    return checkpoint.save(str(path), st.model, st.ema, st.optimizer, 123, cfg)


@pytest.fixture
def teacher_uri(tmp_path):
    return _save_teacher(tmp_path / "teacher", _cfg())


@pytest.fixture
def distill(monkeypatch):
    """Make flow_matching behave like a distillation method in the registry (as CD / PD will)."""
    def _set(progressive=False):
        monkeypatch.setattr(FlowMatchingObjective, "needs_teacher", True, raising=False)
        monkeypatch.setattr(FlowMatchingObjective, "refreshes_teacher", progressive, raising=False)
    return _set


def test_needs_teacher_fallback_and_registry_flag(distill):
    assert teacher.needs_teacher("consistency_distillation") and teacher.needs_teacher("progressive")
    assert not teacher.needs_teacher("flow_matching") and not teacher.needs_teacher("shortcut")
    assert teacher.refreshes_teacher("progressive") and not teacher.refreshes_teacher("consistency_distillation")
    distill(progressive=True)
    assert teacher.needs_teacher("flow_matching") and teacher.refreshes_teacher("flow_matching")


def test_pd_stage_runs_six_to_zero_and_clamps():  # pitfall 22: k = 6 - stage
    assert [teacher.pd_stage(s, 700) for s in (0, 99, 100, 199, 600, 699, 700)] == [0, 0, 1, 1, 6, 6, 6]
    assert teacher.pd_stage(-1, 700) == 0


def test_a_matching_teacher_passes(teacher_uri):
    assert teacher.check_teacher_checkpoint(_cfg(), teacher_uri)["step"] == 123


@pytest.mark.parametrize("override, field, fix", [
    ("model.hidden_size=128", "model.hidden_size: teacher 64, this run 128", "--set model.hidden_size=64"),
    ("model.depth=3", "model.depth: teacher 2, this run 3", "--set model.depth=2"),
    ("data.image_size=16", "data.image_size: teacher 8, this run 16", "--set data.image_size=8"),
    ("data.channels=3", "data.channels: teacher 1, this run 3", "--set data.channels=1"),
    ("data.num_classes=5", "data.num_classes: teacher 10, this run 5", "--set data.num_classes=10"),
])
def test_a_teacher_of_another_shape_is_refused_naming_the_field(teacher_uri, override, field, fix):
    with pytest.raises(ConfigError) as e:
        teacher.check_teacher_checkpoint(_cfg(override), teacher_uri)
    assert field in str(e.value) and fix in str(e.value) and teacher_uri in str(e.value)


def test_a_teacher_that_is_not_flow_matching_is_refused(tmp_path):
    shortcut = apply_overrides(_cfg(), ["objective.train_type=shortcut", "train.global_batch=64"])
    uri = _save_teacher(tmp_path / "sc", shortcut)
    with pytest.raises(ConfigError, match="train_type='shortcut'.*flow-matching teacher"):
        teacher.check_teacher_checkpoint(_cfg(), uri)


def test_teacher_uri_missing_not_a_checkpoint_or_not_needed(distill, tmp_path, teacher_uri):
    assert teacher.check_teacher(_cfg()) is None  # flow matching uses no teacher
    with pytest.raises(ConfigError, match="uses no teacher; remove it"):
        teacher.check_teacher(_cfg(f"objective.teacher_checkpoint={teacher_uri}"))
    distill()
    with pytest.raises(ConfigError, match="objective.teacher_checkpoint is empty; set it"):
        teacher.check_teacher(_cfg())
    with pytest.raises(ConfigError, match="no state.json at .*checkpoint_NNNNNNN"):
        teacher.check_teacher(_cfg(f"objective.teacher_checkpoint={tmp_path}"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "state.json").write_text(open(os.path.join(teacher_uri, "state.json")).read())
    with pytest.raises(ConfigError, match="no .metadata: the checkpoint is incomplete"):
        teacher.check_teacher(_cfg(f"objective.teacher_checkpoint={half}"))
    assert teacher.check_teacher(_cfg(f"objective.teacher_checkpoint={teacher_uri}"))["step"] == 123


def test_remote_teacher_is_read_and_copied_through_fsspec(teacher_uri, tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.put(teacher_uri.rstrip("/") + "/", "/teachers/ck/", recursive=True)
    uri = "memory://teachers/ck"
    assert teacher.check_teacher_checkpoint(_cfg(), uri)["step"] == 123
    monkeypatch.setenv(storage.ENV_CACHE, str(tmp_path / "cache"))
    local = storage.local_copy(uri)  # what teacher.load_teacher and pairs do with a remote teacher
    assert sorted(os.listdir(local)) == sorted(os.listdir(teacher_uri))
    assert storage.local_copy(uri) == local  # cached


def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_attach_builds_a_frozen_teacher_and_starts_the_student_from_it(distill, teacher_uri):
    distill()
    cfg = _cfg(f"objective.teacher_checkpoint={teacher_uri}")
    st = TrainState.create(cfg)
    ref_online, _, _ = checkpoint.load_for_inference(teacher_uri, "online")
    ref_ema, _, _ = checkpoint.load_for_inference(teacher_uri, "ema")
    assert not _same(_weights(st.model), _weights(ref_online))
    t = teacher.attach(st)
    assert st.distill is t and st.step == 0
    assert _same(_weights(t.online), _weights(ref_online)) and _same(_weights(t.ema), _weights(ref_ema))
    assert not _same(_weights(t.online), _weights(t.ema)) and t.network() is t.ema and t.network(False) is t.online
    for m in (t.online, t.ema):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    # student = the checkpoint's params and EMA, fresh optimiser, no shared storage with the teacher
    assert _same(_weights(st.model), _weights(ref_online)) and _same(_weights(st.ema), _weights(ref_ema))
    assert not st.optimizer.state and all(p.requires_grad for p in st.model.parameters())
    st.step_on(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert _same(_weights(t.online), _weights(ref_online)) and not _same(_weights(st.model), _weights(ref_online))
    assert t.checkpoint_modules() == {} and st.checkpoint_modules() == {}  # CD: teacher reloaded from its URI


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_progressive_teacher_switches_at_stages_and_survives_a_checkpoint(distill, teacher_uri, tmp_path):
    distill(progressive=True)
    cfg = _cfg(f"objective.teacher_checkpoint={teacher_uri}", "train.max_steps=14")  # stages of 2 steps
    batches = _batches(8)
    a = TrainState.create(cfg)
    teacher.attach(a)
    original = _weights(a.distill.online)
    student_at = {}
    for x, y in batches[:5]:  # steps 0..4; stage switches before steps 2 and 4
        student_at[a.step] = (_weights(a.model), _weights(a.ema))
        a.step_on(x, y)
    assert a.distill.stage == 2
    assert _same(_weights(a.distill.online), student_at[4][0]) and _same(_weights(a.distill.ema), student_at[4][1])
    assert not _same(_weights(a.distill.online), original)
    ck = checkpoint.save(str(tmp_path / "pd"), a.model, a.ema, a.optimizer, a.step, cfg,
                         modules=a.checkpoint_modules())  # mid-stage 2 (step 5 is its second step)

    b = TrainState.create(cfg)
    teacher.attach(b)  # the original teacher ...
    meta = checkpoint.load(ck, b.model, b.ema, b.optimizer, modules=b.checkpoint_modules())
    b.step = meta["step"]  # ... replaced by stage 2's teacher from the checkpoint
    assert _same(_weights(b.distill.online), _weights(a.distill.online))
    assert _same(_weights(b.distill.ema), _weights(a.distill.ema))
    for x, y in batches[5:8]:  # steps 5 (same stage), 6 (switch to stage 3), 7
        before = _weights(a.model)
        switched = [s.distill.before_step(s.step, s.model, s.ema) for s in (a, b)]
        assert switched == [a.step == 6] * 2
        if a.step == 6:
            assert _same(_weights(b.distill.online), before)
        a.step_on(x, y)
        b.step_on(x, y)
    assert _same(_weights(a.distill.online), _weights(b.distill.online)) and _same(_weights(a.model), _weights(b.model))


def test_resuming_progressive_from_a_checkpoint_without_its_teacher_is_refused(distill, teacher_uri):
    distill(progressive=True)
    st = TrainState.create(_cfg(f"objective.teacher_checkpoint={teacher_uri}"))
    teacher.attach(st)
    with pytest.raises(ValueError, match=r"has no \['teacher', 'teacher_ema'\] weights"):
        checkpoint.load(teacher_uri, st.model, st.ema, st.optimizer, modules=st.checkpoint_modules())


def _fsdp_worker(rank, world, port, teacher_uri, out_dir):
    import torch.distributed as dist

    from shortcut_ray.distributed import is_sharded

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = _cfg("train.num_workers=2", "train.max_steps=14")
        full = lambda m: [p.full_tensor() for p in m.parameters()]  # noqa: E731
        st = TrainState.create(cfg)
        st.distill = teacher.build_teacher(cfg, teacher_uri, torch.device("cpu"), progressive=True)
        teacher.init_student(st, teacher_uri)
        assert is_sharded(st.distill.online) and is_sharded(st.distill.ema) and is_sharded(st.model)
        init = {"online": full(st.distill.online), "ema": full(st.distill.ema), "student": full(st.model)}
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):  # steps 0, 1, 2: stage 1 starts at step 2
            if st.step == 2:
                before = full(st.model)
            st.step_on(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
        ck = os.path.join(out_dir, "pd")
        checkpoint.save(ck, st.model, st.ema, st.optimizer, st.step, cfg, rank=rank, modules=st.checkpoint_modules())
        other = TrainState.create(cfg)
        other.distill = teacher.build_teacher(cfg, teacher_uri, torch.device("cpu"), progressive=True)
        checkpoint.load(ck, other.model, other.ema, other.optimizer, modules=other.checkpoint_modules())
        assert _same(full(other.distill.online), full(st.distill.online))
        assert _same(full(other.distill.ema), full(st.distill.ema))
        torch.save({**init, "switched": _same(full(st.distill.online), before)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_teacher_is_fsdp2_sharded_over_two_gloo_ranks(teacher_uri, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_worker, args=(2, port, teacher_uri, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ref_online, _, _ = checkpoint.load_for_inference(teacher_uri, "online")
    ref_ema, _, _ = checkpoint.load_for_inference(teacher_uri, "ema")
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert _same(got["online"], _weights(ref_online)) and _same(got["ema"], _weights(ref_ema))
        assert _same(got["student"], _weights(ref_online)) and got["switched"]


def test_launch_refuses_a_missing_teacher_before_starting_ray(distill):
    import ray

    from shortcut_ray import launch

    distill()
    for entry in (launch.fit, launch.build_trainer):
        with pytest.raises(ConfigError, match="objective.teacher_checkpoint is empty"):
            entry(_cfg())
    assert not ray.is_initialized()
