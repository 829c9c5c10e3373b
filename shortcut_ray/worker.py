"""Ray Train worker: `train_loop_per_worker` builds the parts, restores, and runs the loop.

The only caller of ray.train.get_context / get_dataset_shard / report (DESIGN §1). A `Runner` owns
the loop state; periodic actions are `*_every` integers (<= 0 disables) that also run after the
last step. Every rank calls `ray.train.report` the same number of times (it is a barrier in Train
V2, RAY_NOTES §1b): once per checkpoint, with the checkpoint directory each rank wrote its DCP shards
to; Ray merges them into `<storage>/<run>/checkpoint_<step>`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from . import checkpoint, data
from .config import Config
from .distributed import all_gather_rows, all_reduce_mean
from .faults import PermanentError
from .guard import FiniteGuard
from .model import flops_per_forward
from .optim import lr_at
from .progress import Progress
from .sampler import fixed_noise, sample
from .teacher import attach as attach_teacher
from .tracking import NullTracker, create_tracker
from .train_step import TrainState


def _due(every: int, step: int, last: int) -> bool:
    """Periodic actions: every `every` steps and after the last one; every <= 0 disables."""
    return every > 0 and (step == last or step % every == 0)


class Runner:
    def __init__(self, loop_config: dict):
        import ray.train
        import ray.train.torch

        self.cfg = Config.from_dict(loop_config["config"])
        self.run_name: str = loop_config["run_name"]
        self.dataset_uri: str = loop_config.get("dataset_uri", "")
        self.checkpoint_root: str = loop_config.get("checkpoint_root", "")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.state = TrainState.create(self.cfg, self.device)
        attach_teacher(self.state)  # CD / PD: frozen teacher + student from its checkpoint (teacher.py)
        checkpoint.clean_stale_staging()  # left by workers killed mid-checkpoint
        self.epoch = 0
        meta = self._restore(loop_config.get("resume_from", ""))
        self._start_tracking_or_explain(meta.get("mlflow_run_id"))
        self.checkpoints: list[str] = list(meta.get("checkpoints", []))
        self.guard = FiniteGuard(self.device)
        self.evaluator = None
        self.reference: list[torch.Tensor] = []  # real images for eval statistics, collected while training
        if self.cfg.train.eval_every > 0:
            from .evaluation import Evaluator, log_reference

            self.evaluator = Evaluator(self.cfg, self.device, self.rank, self.world)
            log_reference(self.tracker, self.evaluator.ref_fid.provenance if self.evaluator.ref_fid else {})

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
        with ckpt.as_directory() as d:
            meta = checkpoint.load(d, self.state.model, self.state.ema, self.state.optimizer,
                                   modules=self.state.checkpoint_modules())
        self.state.step, self.epoch = int(meta["step"]), int(meta.get("epoch", 0))
        if self.rank == 0:
            _say(f"[shortcut-ray] resumed {self.run_name} at step {self.state.step} from {ckpt.path}")
            _warn_uncommitted(self.state.step)
        if ray.train.get_checkpoint() is None:  # a warm start begins a new MLflow run
            meta.pop("mlflow_run_id", None)
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
            _say(f"[shortcut-ray] warning: MLflow failed on restart ({why}); training continues without tracking")
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

    def _publish_model(self) -> dict:
        """After the last step: the sampling weights as an MLflow pyfunc model, registered under
        tracking.register_model. Every rank calls it (gathering the sharded weights is a collective)."""
        from . import generator

        cfg = self.cfg
        if not (cfg.tracking.enabled and cfg.tracking.log_model):
            return {}
        state = generator.full_state_dict(self.state.sampling_model)
        if self.rank != 0:
            return {}
        name = cfg.tracking.register_model
        name = f"shortcut-ray-{cfg.preset}" if name == "auto" else name
        tmp = tempfile.mkdtemp(prefix="shortcut-generator-")
        try:
            weights, config = generator.save(state, cfg, tmp)
            uri = self.tracker.log_generator(weights, config, cfg, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"[shortcut-ray] logged the generator: {uri}")
        self.tracker.set_tags({"model_uri": uri})
        return {"model_uri": uri}

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        cfg, st = self.cfg, self.state
        shard = ray.train.get_dataset_shard("train")
        last = cfg.train.max_steps
        flops_img = self._flops_per_image()
        self.progress = None  # the console line's ETA; its clock starts at the first batch (after Ray Data's start-up)
        t_log, steps_since, wait = time.perf_counter(), 0, 0.0
        # cached epochs (data.cache_mb) are ordered by (seed, rank, epoch at start): a resumed run draws new orders
        stream = data.EpochStream(shard, st.local_batch, cfg.data, self.device,
                                  seed=(cfg.train.seed * 1009 + self.rank) * 100_003 + self.epoch,
                                  rows_per_rank=self._rows_per_rank())
        try:
            while st.step < last:
                steps_this_epoch = 0
                while st.step < last:
                    t0 = time.perf_counter()
                    batch = stream.next()
                    wait += time.perf_counter() - t0
                    if self.progress is None:
                        self.progress = Progress(total=last, start_step=st.step)
                    if batch is None:  # end of the epoch: Ray Data reshuffles files for the next one
                        self.epoch += 1
                        break
                    metrics = st.step_on(*batch)
                    self.last_batch = batch  # real rows for the eval-time diagnostics (a reference, no copy)
                    _maybe_inject_fault(st.step, self.rank)
                    self._guard_step(metrics, last)
                    self._collect_reference(batch[0])
                    steps_since += 1
                    steps_this_epoch += 1
                    step = st.step
                    if _due(cfg.train.log_every, step, last):
                        self._log(metrics, step, t_log, steps_since, wait, flops_img)
                        t_log, steps_since, wait = time.perf_counter(), 0, 0.0
                    if _due(cfg.train.sample_every, step, last):
                        self._sample_grids(step)
                    report = {"step": step, "epoch": self.epoch}
                    if step == last:  # the same decision on every rank (a collective inside)
                        report.update(self._publish_model())
                    eval_due = _due(cfg.train.eval_every, step, last)
                    if eval_due:
                        report.update(self._evaluate(step))  # eval/* metrics on rank 0 only
                    # ray.train.report is a barrier (DESIGN §2.14): decide from the config, which every
                    # rank shares, never from the metrics, which only rank 0 holds.
                    if _due(cfg.train.checkpoint_every, step, last):
                        self._checkpoint(step, metrics, report)
                    elif eval_due:  # eval results reach Ray (and Tune) even between checkpoints
                        ray.train.report({**report, "loss": float(metrics["loss"])}, checkpoint=None)
                if steps_this_epoch == 0 and st.step < last:
                    raise ValueError(f"the dataset yields no full batch of {st.local_batch} rows per worker; "
                                     f"lower train.global_batch or use more data")
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
        good = self.checkpoints[-1] if self.checkpoints else None
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
            _say(f"[shortcut-ray] warning: could not mark the MLflow run {status}: {e}")

    def _flops_per_image(self) -> float:
        """Training FLOPs per image: 3x forward for the online pass (fwd + bwd) plus the objective's extra
        no-grad forwards per row (teacher half-steps, CFG copies, rollouts), DESIGN §5."""
        cfg = self.cfg
        fwd = flops_per_forward(cfg.model, cfg.data.image_size, cfg.data.channels)
        return fwd * (3 + self.state.objective.extra_forwards_per_row)

    def _log(self, metrics, step, t_log, steps, wait, flops_img) -> None:
        m = all_reduce_mean(metrics)  # global-batch averages (one collective, at log steps only)
        host = {f"train/{k}": float(v) for k, v in m.items()}  # the only host sync of the interval
        elapsed = time.perf_counter() - t_log  # after the sync: on GPU the queued work is included
        host["train/lr"] = lr_at(step - 1, self.cfg.optim, self.cfg.train.max_steps)
        ips = steps * self.cfg.train.global_batch / max(elapsed, 1e-9)
        host.update({"perf/images_per_s": ips, "perf/step_time_s": elapsed / max(steps, 1),
                     "perf/data_wait_frac": wait / max(elapsed, 1e-9), "perf/tflops": ips * flops_img / 1e12,
                     "train/epoch": self.epoch, "train/param_norm": float(self.state.param_norm())})
        if self.device.type == "cuda":
            host["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            peak = _peak_flops(self.device)
            if peak:
                host["perf/mfu"] = ips / self.world * flops_img / peak
        self.tracker.log_metrics(host, step)
        self.progress.update(step)
        if self.rank == 0:
            _say("[shortcut-ray] " + self.progress.line(step, host["train/loss"], ips))

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_grids(self, step: int) -> None:
        """Labelled PNG grids at every N of eval.sample_steps from the same fixed noise (one row per class,
        upscaled for the MLflow UI, shortcut_ray/figures.py); ranks split the rows."""
        from .figures import labelled_grid

        cfg = self.cfg
        y, row_labels, ncol = grid_layout(cfg)
        n = y.numel()
        noise = fixed_noise((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), cfg.eval.seed)
        mine = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        model = self.state.sampling_model
        rows = []
        for steps in cfg.eval.sample_steps:
            with self.state.autocast():
                x = sample(model, noise[mine].to(self.device), y[mine].to(self.device), steps,
                           cfg.eval.cfg_scale, cfg.data.num_classes, cfg.objective.denoise_timesteps,
                           objective=self.state.objective)
            x = all_gather_rows(x.float().contiguous())
            if self.rank == 0:
                images = self._to_images(x)
                self.tracker.log_image(labelled_grid(images, ncol, row_labels, title=f"N={steps} steps, step {step}"),
                                       f"samples/step_{step:07d}/N{steps:03d}.png")
                rows.append(images[::ncol])  # the first sample of every row (class), same noise for every N
        if self.rank == 0:  # one row per N, same noise: compare step counts at a glance
            self.tracker.log_image(labelled_grid(np.concatenate(rows), len(row_labels),
                                                 [f"N={s}" for s in cfg.eval.sample_steps],
                                                 title=f"same noise per column ({row_labels[0]} ... {row_labels[-1]})"),
                                   f"samples/step_{step:07d}/all_N.png")

    def _to_images(self, x: torch.Tensor) -> np.ndarray:
        """Model outputs -> images in [-1, 1] (pixels as they are; latents are decoded by latents.py)."""
        if self.cfg.data.kind == "latents":
            from .latents import decode_for_display

            return decode_for_display(x, self.cfg.data)
        return x.cpu().numpy()

    # -- checkpoints -------------------------------------------------------------------------------
    # -- evaluation ------------------------------------------------------------------------------------
    def _collect_reference(self, x: torch.Tensor) -> None:
        if self.evaluator is not None and sum(r.shape[0] for r in self.reference) < self.evaluator.samples_per_rank:
            self.reference.append(x.detach().float().cpu())

    def _evaluate(self, step: int) -> dict[str, float]:
        """FD / FID at every N of eval.fid_steps (all ranks sample; rank 0 logs). Returns eval/* metrics."""
        ev = self.evaluator
        if ev.ref_pixel is None or ev.num_reference < ev.samples_per_rank * self.world:
            ev.set_reference(torch.cat(self.reference)[: ev.samples_per_rank])
        metrics, details = ev.run(self.state.sampling_model, self.state.autocast, batch_size=self.state.local_batch * 4)
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        self.tracker.log_metrics(metrics, step)
        self.tracker.log_dict({"step": step, **details}, f"eval/step_{step:07d}.json")
        if self.rank == 0:
            _say(f"[shortcut-ray] eval step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            self._log_quality_chart(metrics, step)
        from .diagnostics import supported

        if self.cfg.eval.diagnostics and supported(self.cfg.objective.train_type):  # every rank: FSDP collectives
            self._log_diagnostics(step)
        return metrics

    # -- eval-time figures (issue 14): quality vs N, loss heat-map, one-step reconstructions -------------
    def _log_quality_chart(self, metrics: dict[str, float], step: int) -> None:
        from .figures import quality_chart

        per_n: dict[str, dict[int, float]] = {}
        for key, v in metrics.items():  # eval/fd_pixel/N4 -> per_n["fd_pixel"][4]
            kind, n = key.split("/")[-2], int(key.rsplit("/N", 1)[1])
            per_n.setdefault(kind, {})[n] = v
        if per_n:
            title = f"{self.cfg.preset}, step {step}, {self.cfg.eval.fid_samples} samples per N"
            self.tracker.log_image(quality_chart(per_n, title), f"eval/quality_vs_N_step_{step:07d}.png")

    def _log_diagnostics(self, step: int) -> None:
        from .diagnostics import loss_heatmap, reconstructions
        from .figures import heatmap, labelled_grid

        cfg, st = self.cfg, self.state
        rows = min(cfg.eval.diagnostic_rows, st.local_batch)
        x1, y = (t[:rows] for t in self.last_batch)
        levels = cfg.objective.num_levels
        values, t_values = loss_heatmap(st.objective, st.networks, x1, y, levels, cfg.eval.diagnostic_t_bins,
                                        seed=cfg.eval.seed, autocast=st.autocast)
        images, labels = reconstructions(st.objective, st.sampling_model, st.networks, x1[:8], y[:8], levels,
                                         autocast=st.autocast)
        if self.rank == 0:
            self.tracker.log_image(heatmap(values.numpy(), t_values.numpy(), f"loss over forced (k, t), step {step}"),
                                   f"diagnostics/loss_heatmap_step_{step:07d}.png")
            self.tracker.log_dict({"step": step, "t": t_values.tolist(), "loss": values.tolist()},
                                  f"diagnostics/loss_heatmap_step_{step:07d}.json")
            self.tracker.log_image(labelled_grid(self._to_images(images), x1[:8].shape[0], labels,
                                                 title=f"one-step reconstructions, step {step}"),
                                   f"diagnostics/reconstructions_step_{step:07d}.png")

    def _checkpoint(self, step: int, metrics: dict, report: dict) -> None:
        import ray.train

        name = checkpoint.dir_name(step)
        uri = f"{self.checkpoint_root.rstrip('/')}/{name}" if self.checkpoint_root else name
        self.checkpoints = (self.checkpoints + [uri])[-50:]
        tmp = checkpoint.staging_dir()
        try:
            checkpoint.save(tmp, self.state.model, self.state.ema, self.state.optimizer, step, self.cfg,
                            extra={"epoch": self.epoch, "mlflow_run_id": self.run_id, "run_name": self.run_name,
                                   "checkpoints": self.checkpoints}, rank=self.rank,
                            modules=self.state.checkpoint_modules())
            ray.train.report({**report, "loss": float(metrics["loss"])},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.tracker.set_tags({"checkpoint.latest": uri, "checkpoint.step": str(step)})
        self.tracker.log_dict({"checkpoints": self.checkpoints}, "checkpoints.json")


def grid_layout(cfg: Config) -> tuple[torch.Tensor, list[str], int]:
    """(labels, row labels, columns) of a sample grid: one row per class (at most 10), eval.grid_size
    samples each; unconditional runs: eval.grid_size rows of the null label."""
    ncol = cfg.eval.grid_size
    if cfg.objective.class_conditional:
        nrow = min(cfg.data.num_classes, 10)
        return torch.arange(nrow).repeat_interleave(ncol), [f"class {c}" for c in range(nrow)], ncol
    return torch.full((ncol * ncol,), cfg.data.num_classes), ["uncond."] * ncol, ncol


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
        _say(f"[shortcut-ray] note: {', '.join(newer)} in storage was never committed by Ray Train (the job "
             f"stopped while reporting it); continuing from the last committed checkpoint, step {step}")


def _say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not print(): Train V2 patches
    print into its logger *and* tees it to a wrapped stdout, so every printed line reached the job log twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


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


# Dense bf16 peak per GPU from the datasheets, matched in order against torch.cuda.get_device_name
# (the H100 PCIe and NVL parts are slower than the SXM one that is named plainly "H100 80GB HBM3").
PEAK_BF16_DENSE = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H200.*NVL", 835e12),
    (r"H100", 989e12), (r"H200", 989e12), (r"A100", 312e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12),
)


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called `name`; None when unknown (MFU is then not reported)."""
    import re

    return next((v for pattern, v in PEAK_BF16_DENSE if re.search(pattern, name, re.IGNORECASE)), None)


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the worker's GPU for MFU (datasheet numbers; None when unknown)."""
    return peak_flops_for(torch.cuda.get_device_name(device))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (see launch.build_trainer)."""
    threads = os.environ.get("SHORTCUT_RAY_THREADS") or Config.from_dict(loop_config["config"]).train.torch_threads
    if int(threads) > 0:  # $SHORTCUT_RAY_THREADS (benchmarks) over train.torch_threads
        torch.set_num_threads(int(threads))
    _quiet_worker()
    Runner(loop_config).run()


def evaluate_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point of jobs.evaluate: FID/FD of a checkpoint with every worker sampling."""
    import ray.train
    import ray.train.torch

    from .evaluation import Evaluator, log_reference

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    state = TrainState.create(cfg, device)
    from .storage import pyarrow_filesystem

    if loop_config["checkpoint"].endswith(".safetensors"):  # the portable export: weights only
        meta = checkpoint.load_weights(checkpoint.local_copy(loop_config["checkpoint"]), state.model, state.ema)
    else:
        fs, path = pyarrow_filesystem(loop_config["checkpoint"])
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
            meta = checkpoint.load(d, state.model, state.ema, state.optimizer)
    ev = Evaluator(cfg, device, rank, world)
    real, seen = [], 0
    for x, *_ in data.batches(ray.train.get_dataset_shard("train"), state.local_batch, cfg.data, device):
        real.append(x.float().cpu())
        seen += x.shape[0]
        if seen >= ev.samples_per_rank:
            break
    ev.set_reference(torch.cat(real)[: ev.samples_per_rank])
    metrics, details = ev.run(state.sampling_model, state.autocast, batch_size=state.local_batch * 4)
    step = int(meta["step"])
    if rank == 0 and cfg.tracking.enabled:
        tracker = create_tracker(cfg.tracking, rank)
        tracker.start(f"{meta.get('run_name', 'eval')}-eval", {"kind": "evaluate"}, meta.get("mlflow_run_id"))
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        log_reference(tracker, ev.fid_reference)
        tracker.log_dict({"step": step, "checkpoint": loop_config["checkpoint"], **details},
                         f"eval/final_step_{step:07d}.json")
        tracker.end("FINISHED")
    # Train V2 keeps only checkpointed reports in the Result: rank 0 returns the numbers as a tiny
    # checkpoint (eval.json), which also leaves them beside the eval run in storage.
    result = {"step": step, "checkpoint": loop_config["checkpoint"],
              **{f"eval/{k}": v for k, v in metrics.items()}, "details": details}
    tmp = tempfile.mkdtemp(prefix="shortcut-eval-")
    try:
        if rank == 0:
            with open(os.path.join(tmp, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
