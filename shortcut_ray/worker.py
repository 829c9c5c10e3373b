"""Ray Train worker: `train_loop_per_worker` builds the parts, restores, and runs the loop.

The only caller of ray.train.get_context / get_dataset_shard / report (DESIGN §1). A `Runner` owns
the loop state; periodic actions are `*_every` integers (<= 0 disables) that also run after the
last step, each done by a collaborator of shortcut_ray/periodic.py. Every rank calls
`ray.train.report` the same number of times (it is a barrier in Train V2, RAY_NOTES §1b): once per
checkpoint, with the checkpoint directory each rank wrote its DCP shards to; Ray merges them into
`<storage>/<run>/checkpoint_<step>`. `evaluate_loop_per_worker` shares the set-up (`_setup`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from . import checkpoint, data
from .config import Config
from .faults import PermanentError
from .guard import FiniteGuard
from .model import flops_per_forward
from .periodic import Checkpointer, EvalAction, GridSampler, MetricsLogger, publish_model, score
from .periodic import say as _say
from .storage import checkpoint_dir
from .teacher import attach as attach_teacher
from .tracking import NullTracker, create_tracker
from .train_step import TrainState


def _due(every: int, step: int, last: int) -> bool:
    """Periodic actions: every `every` steps and after the last one; every <= 0 disables."""
    return every > 0 and (step == last or step % every == 0)


def _setup(loop_config: dict) -> tuple[Config, int, int, torch.device, TrainState]:
    """(config, rank, world size, device, fresh TrainState) of this Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return cfg, rank, world, device, TrainState.create(cfg, device)


def _report_checkpoint(metrics: dict, directory: str, name: str) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)


class Runner:
    def __init__(self, loop_config: dict):
        self.cfg, self.rank, self.world, self.device, self.state = _setup(loop_config)
        self.run_name: str = loop_config["run_name"]
        self.dataset_uri: str = loop_config.get("dataset_uri", "")
        attach_teacher(self.state)  # CD / PD: frozen teacher + student from its checkpoint (teacher.py)
        checkpoint.clean_stale_staging()  # left by workers killed mid-checkpoint
        self.epoch = 0
        meta = self._restore(loop_config.get("resume_from", ""))
        self._start_tracking_or_explain(meta.get("mlflow_run_id"))
        self.checkpointer = Checkpointer(self.cfg, self.state, self.rank, self.tracker,
                                         loop_config.get("checkpoint_root", ""), _resumed_uri(meta),
                                         report=_report_checkpoint)
        self.guard = FiniteGuard(self.device)
        self.evaluation = EvalAction(self.cfg, self.state, self.rank, self.world, self.tracker)
        self.grids = GridSampler(self.cfg, self.state, self.rank, self.world, self.tracker)

    # -- restore -----------------------------------------------------------------------------------
    def _restore(self, resume_from: str) -> dict:
        """Latest checkpoint of this run (worker restart or relaunch), else an explicit warm start."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and resume_from:
            from .storage import pyarrow_filesystem

            fs, path = pyarrow_filesystem(resume_from)
            ckpt = ray.train.Checkpoint(path, filesystem=fs)
        if ckpt is None:
            return {}
        with checkpoint_dir(ckpt) as d:  # every rank its own download (see storage.checkpoint_dir)
            meta = checkpoint.load(d, self.state.model, self.state.ema, self.state.optimizer,
                                   modules=self.state.checkpoint_modules())
        self.state.step, self.epoch = int(meta["step"]), int(meta.get("epoch", 0))
        if self.rank == 0:
            _say(f"resumed {self.run_name} at step {self.state.step} from {ckpt.path}")
            _warn_uncommitted(self.state.step)
        if ray.train.get_checkpoint() is None:  # a warm start begins a new MLflow run
            meta.pop("mlflow_run_id", None)
            meta.pop("checkpoint_uri", None)
            meta.pop("checkpoints", None)
        return meta

    def _start_tracking_or_explain(self, run_id: str | None) -> None:
        """MLflow down at the start of a run is permanent (the driver checked it seconds ago: fix the server
        or the URI); at a restart mid-run it only warns and the run trains on untracked."""
        try:
            self.tracker = create_tracker(self.cfg.tracking, self.rank) if self.cfg.tracking.enabled else NullTracker()
            self._start_tracking(run_id)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if self.state.step == 0:
                raise PermanentError(f"MLflow at {self.cfg.tracking.tracking_uri} failed at the start of the run "
                                     f"({why}); fix the server or tracking.tracking_uri, or set "
                                     f"tracking.enabled=false") from None
            _say(f"warning: MLflow failed on restart ({why}); training continues without tracking")
            self.tracker = NullTracker()
            self.run_id = run_id

    def _start_tracking(self, run_id: str | None) -> None:
        cfg = self.cfg
        tags = {"preset": cfg.preset, "train_type": cfg.objective.train_type, "dataset": cfg.data.source,
                "model": f"h{cfg.model.hidden_size}-d{cfg.model.depth}-p{cfg.model.patch_size}",
                "ray_run_name": self.run_name, "world_size": str(self.world)}
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # shows as a nested child in the UI
        tags.update(kv.split("=", 1) for kv in cfg.tracking.tags.split(",") if "=" in kv)
        self.run_id = self.tracker.start(cfg.tracking.run_name or self.run_name, tags, run_id)
        n_params = sum(p.numel() for p in self.state.model.parameters())  # DTensor numel = global size
        self.tracker.log_params({**cfg.flat(), "derived.num_params": n_params, "derived.world_size": self.world,
                                 "derived.sampling_weights": "ema" if cfg.ema.eval_with_ema else "online",
                                 "derived.bootstrap_levels": self.state.objective.layout.global_levels.tolist()})
        if run_id:
            self.tracker.set_tags({"resumed_at_step": str(self.state.step)})
        self._start_tracking_extras(resumed=bool(run_id))

    # -- issue 14: dataset input, system metrics, the generator in the Model Registry ------------------
    def _start_tracking_extras(self, resumed: bool) -> None:
        cfg = self.cfg.tracking
        if self.rank != 0 or not cfg.enabled:
            return
        if self.dataset_uri and not resumed:
            from .shards import dataset_info

            self.tracker.log_dataset(self.dataset_uri, dataset_info(self.dataset_uri), self.cfg.data.source)
        if cfg.system_metrics == "on" or (cfg.system_metrics == "auto" and self.device.type == "cuda"):
            self.tracker.start_system_metrics()

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        cfg, st, last = self.cfg, self.state, self.cfg.train.max_steps
        shard = ray.train.get_dataset_shard("train")
        self.metrics_log = MetricsLogger(cfg, st, self.rank, self.world, self.tracker, self._flops_per_image())
        # cached epochs (data.cache_mb) are ordered by (seed, rank, epoch at start): a resumed run draws new orders
        stream = data.EpochStream(shard, st.local_batch, cfg.data, self.device,
                                  seed=(cfg.train.seed * 1009 + self.rank) * 100_003 + self.epoch,
                                  rows_per_rank=self._rows_per_rank())
        try:
            steps_this_epoch = 0
            while st.step < last:
                batch = self.metrics_log.next_batch(stream)
                if batch is None:  # end of the epoch: Ray Data reshuffles files for the next one
                    self.epoch += 1
                    if steps_this_epoch == 0:
                        raise ValueError(f"the dataset yields no full batch of {st.local_batch} rows per worker; "
                                         f"lower train.global_batch or use more data")
                    steps_this_epoch = 0
                    continue
                metrics = st.step_on(*batch)
                _maybe_inject_fault(st.step, self.rank)
                self._guard_step(metrics, last)
                self.evaluation.saw(batch)
                self.metrics_log.stepped()
                steps_this_epoch += 1
                self._actions(st.step, metrics)
            self.tracker.end("FINISHED")
        except BaseException as e:
            self._fail_tracking(e)
            raise
        finally:
            stream.close()

    def _rows_per_rank(self) -> int | None:
        """This rank's share of the dataset's rows (manifest count / world size); None when unknown."""
        if not self.dataset_uri:
            return None
        from .shards import dataset_info

        return -(-int(dataset_info(self.dataset_uri)["count"]) // self.world)

    def _actions(self, step: int, metrics: dict) -> None:
        """The periodic actions of a step, in order: log, sample grids, (last step) publish the model,
        evaluate, then checkpoint or report the eval results."""
        import ray.train

        cfg, last = self.cfg.train, self.cfg.train.max_steps
        if _due(cfg.log_every, step, last):
            self.metrics_log.log(metrics, step, self.epoch)
        if _due(cfg.sample_every, step, last):
            self.grids.run(step)
        report = {"step": step, "epoch": self.epoch}
        if step == last:  # the same decision on every rank (a collective inside)
            report.update(publish_model(self.cfg, self.state, self.rank, self.tracker))
        eval_due = _due(cfg.eval_every, step, last)
        if eval_due:
            report.update(self.evaluation.run(step))  # eval/* metrics on rank 0 only
        # ray.train.report is a barrier (DESIGN §2.14): decide from the config, which every
        # rank shares, never from the metrics, which only rank 0 holds.
        if _due(cfg.checkpoint_every, step, last):
            self.checkpointer.save(step, metrics, report, extra={"epoch": self.epoch, "mlflow_run_id": self.run_id,
                                                                 "run_name": self.run_name})
        elif eval_due:  # eval results reach Ray (and Tune) even between checkpoints
            ray.train.report({**report, "loss": float(metrics["loss"])}, checkpoint=None)

    # -- divergence (guard.py) -----------------------------------------------------------------------
    def _guard_step(self, metrics: dict, last: int) -> None:
        """Stop before any action of a step whose loss/gradients (or, at checkpoint steps, weights) are
        non-finite; the device-side flag is read only at the guard's check steps."""
        step = self.state.step
        self.guard.observe(step, metrics)
        if FiniteGuard.due(step, last, self.cfg.train):
            ckpt_due = _due(self.cfg.train.checkpoint_every, step, last)
            self.guard.check(step, self.state.model if ckpt_due else None, self._divergence_message)

    def _divergence_message(self, first_bad: int, step: int) -> str:
        good = self.checkpointer.latest
        where = (f"The last good checkpoint is {good} (nothing after it was saved, so Ray's rotation kept it)."
                 if good else "No checkpoint of this run was saved before it.")
        again = (f"resume from it with `python -m jobs.train --resume {self.run_name} --set optim.lr=...`"
                 if good else "start a new run")
        return (f"training diverged: the loss or gradient norm became non-finite (nan/inf) at step {first_bad} "
                f"(found at the check of step {step}) in run {self.run_name}. {where} To continue, lower "
                f"optim.lr (now {self.cfg.optim.lr:g}) or set optim.grad_clip > 0 (now {self.cfg.optim.grad_clip:g}), "
                f"then {again}.")

    def _fail_tracking(self, error: BaseException) -> None:
        """Mark the MLflow run FAILED with the reason (KILLED when interrupted); never mask `error`."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            self.tracker.set_tags({"failure_reason": f"{type(error).__name__}: {error}"[:4000]})
            self.tracker.end(status)
        except Exception as e:  # noqa: BLE001 - the tracking server may be the thing that failed
            _say(f"warning: could not mark the MLflow run {status}: {e}")

    def _flops_per_image(self) -> float:
        """Training FLOPs per image: 3x forward for the online pass (fwd + bwd) plus the objective's extra
        no-grad forwards per row (teacher half-steps, CFG copies, rollouts), DESIGN §5."""
        cfg = self.cfg
        fwd = flops_per_forward(cfg.model, cfg.data.image_size, cfg.data.channels)
        return fwd * (3 + self.state.objective.extra_forwards_per_row)


def _resumed_uri(meta: dict) -> str | None:
    """The URI of the checkpoint this run resumed from (checkpoints before 2026-12 kept a list of 50)."""
    return meta.get("checkpoint_uri") or (meta.get("checkpoints") or [None])[-1]


def _warn_uncommitted(step: int) -> None:
    """Say so when the run's storage holds a checkpoint newer than the one Ray Train committed: a job
    killed between a checkpoint's upload and its commit resumes from the last *committed* one (only
    committed checkpoints are known complete on every rank), so up to checkpoint_every steps are redone."""
    import pyarrow.fs as pafs
    import ray.train

    try:
        storage = ray.train.get_context().get_storage()
        infos = storage.storage_filesystem.get_file_info(pafs.FileSelector(storage.experiment_fs_path))
    except Exception:  # noqa: BLE001 - a diagnostic only; never block a resume on it
        return
    newer = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and (checkpoint.step_of(i.base_name) or 0) > step)
    if newer:
        _say(f"note: {', '.join(newer)} in storage was never committed by Ray Train (the job "
             f"stopped while reporting it); continuing from the last committed checkpoint, step {step}")


def _quiet_worker() -> None:
    """Known-harmless warnings and INFO lines that would otherwise reach the user's console."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # Ray Data -> torch
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # MLflow, our pyfunc
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" on a fresh machine
    try:  # "Reporting training result N: TrainingReport(...)" per rank and checkpoint: Train V2 logs it at INFO
        from ray.train.v2._internal.execution import context  # under the file's path, not under "ray.train"

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault-tolerance drill: if $SHORTCUT_RAY_FAULT_FILE names a file holding "STEP RANK", that rank
    dies at that step once (the file is removed first), so Ray must restart from the last checkpoint."""
    path = os.environ.get("SHORTCUT_RAY_FAULT_FILE")
    if not path or not os.path.exists(path):
        return
    try:
        at_step, at_rank = (int(v) for v in open(path).read().split())
    except (OSError, ValueError):
        return
    if (step, rank) == (at_step, at_rank):
        os.remove(path)
        raise RuntimeError(f"injected fault at step {step} on rank {rank} ($SHORTCUT_RAY_FAULT_FILE)")


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (see launch.build_trainer)."""
    threads = os.environ.get("SHORTCUT_RAY_THREADS") or Config.from_dict(loop_config["config"]).train.torch_threads
    if int(threads) > 0:  # $SHORTCUT_RAY_THREADS (benchmarks) over train.torch_threads
        torch.set_num_threads(int(threads))
    _quiet_worker()
    Runner(loop_config).run()


# -- jobs.evaluate ------------------------------------------------------------------------------------------

def evaluate_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point of jobs.evaluate: FID/FD of a checkpoint with every worker sampling."""
    import ray.train

    from .evaluation import Evaluator

    cfg, rank, world, device, state = _setup(loop_config)
    uri = loop_config["checkpoint"]
    meta = _load_for_eval(uri, state)
    ev = Evaluator(cfg, device, rank, world)
    ev.set_reference(_real_images(ray.train.get_dataset_shard("train"), cfg, state, ev.samples_per_rank))
    metrics, details = score(ev, state)
    step = int(meta["step"])
    if rank == 0 and cfg.tracking.enabled:
        _log_eval_run(cfg, meta, ev, uri, step, metrics, details)
    # Train V2 keeps only checkpointed reports in the Result: rank 0 returns the numbers as a tiny
    # checkpoint (eval.json), which also leaves them beside the eval run in storage.
    _report_eval({"step": step, "checkpoint": uri, **metrics, "details": details}, rank)


def _load_for_eval(uri: str, state: TrainState) -> dict:
    """The checkpoint's weights into `state` (a DCP checkpoint, or the portable .safetensors export)."""
    import ray.train

    from .storage import pyarrow_filesystem

    if uri.endswith(".safetensors"):  # the portable export: weights only
        return checkpoint.load_weights(checkpoint.local_copy(uri), state.model, state.ema)
    fs, path = pyarrow_filesystem(uri)
    with checkpoint_dir(ray.train.Checkpoint(path, filesystem=fs)) as d:
        return checkpoint.load(d, state.model, state.ema, state.optimizer)


def _real_images(shard, cfg: Config, state: TrainState, n: int) -> torch.Tensor:
    """This rank's first `n` real images of the dataset shard (the eval reference)."""
    real, seen = [], 0
    for x, *_ in data.batches(shard, state.local_batch, cfg.data, state.device):
        real.append(x.float().cpu())
        seen += x.shape[0]
        if seen >= n:
            break
    return torch.cat(real)[:n]


def _log_eval_run(cfg: Config, meta: dict, ev, uri: str, step: int, metrics: dict, details: dict) -> None:
    """Rank 0: the eval/* metrics in an MLflow run "<run>-eval" (the training run's id when it has one)."""
    from .evaluation import log_reference

    tracker = create_tracker(cfg.tracking, 0)
    tracker.start(f"{meta.get('run_name', 'eval')}-eval", {"kind": "evaluate"}, meta.get("mlflow_run_id"))
    tracker.log_metrics(metrics, step)
    log_reference(tracker, ev.fid_reference)
    tracker.log_dict({"step": step, "checkpoint": uri, **details}, f"eval/final_step_{step:07d}.json")
    tracker.end("FINISHED")


def _report_eval(result: dict, rank: int) -> None:
    """Every rank reports once (a barrier); rank 0 with eval.json as the checkpoint."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="shortcut-eval-")
    try:
        if rank == 0:
            with open(os.path.join(tmp, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
        ray.train.report({"step": result["step"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
