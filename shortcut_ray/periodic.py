"""The worker's periodic actions, one job each; `worker.Runner` decides when they run (`worker._due`).

- `MetricsLogger`: train/* and perf/* metrics over a log interval, and the console progress line;
- `GridSampler`: labelled sample grids at every N of eval.sample_steps;
- `EvalAction`: FD / FID (and the eval-time figures and diagnostics) of the sampling weights;
- `Checkpointer`: a DCP checkpoint handed to Ray Train through the `report` callable it is given;
- `publish_model`: the generator as an MLflow model after the last step.

Collective operations (all_reduce_mean, all_gather_rows, Evaluator.run, the diagnostics, gathering the
sharded weights) run on every rank; only rank 0 logs images and prints. No ray here: the worker is the
only caller of ray.train (DESIGN §1).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from . import checkpoint
from .config import Config
from .distributed import all_gather_rows, all_reduce_mean
from .optim import lr_at
from .progress import PREFIX, Progress, eval_line
from .sampler import fixed_noise, sample
from .train_step import TrainState


def say(message: str) -> None:
    """One line, `progress.PREFIX` + message, to the worker's stdout, which Ray forwards to the driver.
    Not print(): Train V2 patches print into its logger *and* tees it to a wrapped stdout, so every
    printed line reached the job log twice."""
    sys.stdout.write(PREFIX + message + "\n")
    sys.stdout.flush()


# -- metrics and the console line ------------------------------------------------------------------------

# Dense bf16 peak per GPU from the datasheets, matched in order against torch.cuda.get_device_name
# (the H100 PCIe and NVL parts are slower than the SXM one that is named plainly "H100 80GB HBM3").
PEAK_BF16_DENSE = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H200.*NVL", 835e12),
    (r"H100", 989e12), (r"H200", 989e12), (r"A100", 312e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12),
)


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called `name`; None when unknown (MFU is then not reported)."""
    return next((v for pattern, v in PEAK_BF16_DENSE if re.search(pattern, name, re.IGNORECASE)), None)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the worker's GPU for MFU (datasheet numbers; None when unknown)."""
    return peak_flops_for(torch.cuda.get_device_name(device))


class MetricsLogger:
    """Every train.log_every steps: global-batch means of the step's metrics, throughput over the interval
    (images/s, step time, data-wait fraction, TFLOP/s, MFU on a known GPU), and on rank 0 the console
    progress line. The interval's clock starts when the logger is made and restarts after each log."""

    def __init__(self, cfg: Config, state: TrainState, rank: int, world: int, tracker, flops_per_image: float):
        self.cfg, self.state, self.rank, self.world, self.tracker = cfg, state, rank, world, tracker
        self.flops_img = flops_per_image
        self.progress: Progress | None = None  # the ETA's clock starts at the first batch (after Ray Data's start-up)
        self._restart()

    def _restart(self) -> None:
        self.t_log, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def next_batch(self, stream):
        """The stream's next batch (None at the end of an epoch), its wait counted as data wait."""
        t0 = time.perf_counter()
        batch = stream.next()
        self.wait += time.perf_counter() - t0
        if self.progress is None:
            self.progress = Progress(total=self.cfg.train.max_steps, start_step=self.state.step)
        return batch

    def stepped(self) -> None:
        self.steps += 1

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        cfg, steps, device = self.cfg, self.steps, self.state.device
        m = all_reduce_mean(metrics)  # global-batch averages (one collective, at log steps only)
        host = {f"train/{k}": float(v) for k, v in m.items()}  # the only host sync of the interval
        elapsed = time.perf_counter() - self.t_log  # after the sync: on GPU the queued work is included
        host["train/lr"] = lr_at(step - 1, cfg.optim, cfg.train.max_steps)
        ips = steps * cfg.train.global_batch / max(elapsed, 1e-9)
        host.update({"perf/images_per_s": ips, "perf/step_time_s": elapsed / max(steps, 1),
                     "perf/data_wait_frac": self.wait / max(elapsed, 1e-9), "perf/tflops": ips * self.flops_img / 1e12,
                     "train/epoch": epoch, "train/param_norm": float(self.state.param_norm())})
        if device.type == "cuda":
            host["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            peak = peak_flops(device)
            if peak:
                host["perf/mfu"] = ips / self.world * self.flops_img / peak
        self.tracker.log_metrics(host, step)
        self.progress.update(step)
        if self.rank == 0:
            say(self.progress.line(step, host["train/loss"], ips))
        self._restart()


# -- sample grids --------------------------------------------------------------------------------------

def grid_layout(cfg: Config) -> tuple[torch.Tensor, list[str], int]:
    """(labels, row labels, columns) of a sample grid: one row per class (at most 10), eval.grid_size
    samples each; unconditional runs: eval.grid_size rows of the null label."""
    ncol = cfg.eval.grid_size
    if cfg.objective.class_conditional:
        nrow = min(cfg.data.num_classes, 10)
        return torch.arange(nrow).repeat_interleave(ncol), [f"class {c}" for c in range(nrow)], ncol
    return torch.full((ncol * ncol,), cfg.data.num_classes), ["uncond."] * ncol, ncol


def to_images(x: torch.Tensor, cfg: Config) -> np.ndarray:
    """Model outputs -> images in [-1, 1] (pixels as they are; latents are decoded by latents.py)."""
    if cfg.data.kind == "latents":
        from .latents import decode_for_display

        return decode_for_display(x, cfg.data)
    return x.cpu().numpy()


class GridSampler:
    """Every train.sample_every steps: labelled PNG grids at every N of eval.sample_steps from the same
    fixed noise (one row per class, upscaled for the MLflow UI, shortcut_ray/figures.py); ranks split the rows."""

    def __init__(self, cfg: Config, state: TrainState, rank: int, world: int, tracker):
        self.cfg, self.state, self.rank, self.world, self.tracker = cfg, state, rank, world, tracker

    @torch.no_grad()
    def run(self, step: int) -> None:
        from .figures import labelled_grid

        cfg, st = self.cfg, self.state
        y, row_labels, ncol = grid_layout(cfg)
        n = y.numel()
        noise = fixed_noise((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), cfg.eval.seed)
        mine = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        rows = []
        for steps in cfg.eval.sample_steps:
            with st.autocast():
                x = sample(st.sampling_model, noise[mine].to(st.device), y[mine].to(st.device), steps,
                           cfg.eval.cfg_scale, cfg.data.num_classes, cfg.objective.denoise_timesteps,
                           objective=st.objective)
            x = all_gather_rows(x.float().contiguous())
            if self.rank == 0:
                images = to_images(x, cfg)
                self.tracker.log_image(labelled_grid(images, ncol, row_labels, title=f"N={steps} steps, step {step}"),
                                       f"samples/step_{step:07d}/N{steps:03d}.png")
                rows.append(images[::ncol])  # the first sample of every row (class), same noise for every N
        if self.rank == 0:  # one row per N, same noise: compare step counts at a glance
            self.tracker.log_image(labelled_grid(np.concatenate(rows), len(row_labels),
                                                 [f"N={s}" for s in cfg.eval.sample_steps],
                                                 title=f"same noise per column ({row_labels[0]} ... {row_labels[-1]})"),
                                   f"samples/step_{step:07d}/all_N.png")


# -- evaluation ------------------------------------------------------------------------------------------

def score(evaluator, state: TrainState) -> tuple[dict[str, float], dict]:
    """eval/* metrics (FD / FID at every N of eval.fid_steps) and details of the sampling weights; every
    rank samples (collectives inside), the numbers are complete on rank 0."""
    metrics, details = evaluator.run(state.sampling_model, state.autocast, batch_size=state.local_batch * 4)
    return {f"eval/{k}": v for k, v in metrics.items()}, details


class EvalAction:
    """Every train.eval_every steps: `score` against real images collected while training, then the
    eval-time figures (quality vs N; loss heat-map and one-step reconstructions on the last batch)."""

    def __init__(self, cfg: Config, state: TrainState, rank: int, world: int, tracker):
        self.cfg, self.state, self.rank, self.world, self.tracker = cfg, state, rank, world, tracker
        self.evaluator = None
        self.reference: list[torch.Tensor] = []  # real images for eval statistics, collected while training
        self.last_batch = None  # real rows for the eval-time diagnostics (a reference, no copy)
        if cfg.train.eval_every > 0:
            from .evaluation import Evaluator, log_reference

            self.evaluator = Evaluator(cfg, state.device, rank, world)
            log_reference(tracker, self.evaluator.ref_fid.provenance if self.evaluator.ref_fid else {})

    def saw(self, batch) -> None:
        """A training batch: kept for the diagnostics, its images for the reference until there are enough."""
        self.last_batch = batch
        ev = self.evaluator
        if ev is not None and sum(r.shape[0] for r in self.reference) < ev.samples_per_rank:
            self.reference.append(batch[0].detach().float().cpu())

    def run(self, step: int) -> dict[str, float]:
        """All ranks sample; rank 0 logs. Returns the eval/* metrics (rank 0 only holds them)."""
        ev = self.evaluator
        if ev.ref_pixel is None or ev.num_reference < ev.samples_per_rank * self.world:
            ev.set_reference(torch.cat(self.reference)[: ev.samples_per_rank])
        metrics, details = score(ev, self.state)
        self.tracker.log_metrics(metrics, step)
        self.tracker.log_dict({"step": step, **details}, f"eval/step_{step:07d}.json")
        if self.rank == 0:
            say(eval_line(step, metrics))
            self._quality_chart(metrics, step)
        from .diagnostics import supported

        if self.cfg.eval.diagnostics and supported(self.cfg.objective.train_type):  # every rank: FSDP collectives
            self._diagnostics(step)
        return metrics

    def _quality_chart(self, metrics: dict[str, float], step: int) -> None:
        from .figures import quality_chart

        per_n: dict[str, dict[int, float]] = {}
        for key, v in metrics.items():  # eval/fd_pixel/N4 -> per_n["fd_pixel"][4]
            kind, n = key.split("/")[-2], int(key.rsplit("/N", 1)[1])
            per_n.setdefault(kind, {})[n] = v
        if per_n:
            title = f"{self.cfg.preset}, step {step}, {self.cfg.eval.fid_samples} samples per N"
            self.tracker.log_image(quality_chart(per_n, title), f"eval/quality_vs_N_step_{step:07d}.png")

    def _diagnostics(self, step: int) -> None:
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
            self.tracker.log_image(labelled_grid(to_images(images, cfg), x1[:8].shape[0], labels,
                                                 title=f"one-step reconstructions, step {step}"),
                                   f"diagnostics/reconstructions_step_{step:07d}.png")


# -- checkpoints and the final model ------------------------------------------------------------------------

class Checkpointer:
    """Every train.checkpoint_every steps: this rank's DCP shards to a staging folder, handed to Ray Train by
    `report(metrics, directory, name)` (a barrier: every rank calls it), then the latest checkpoint as MLflow
    tags. The history is Ray's (train.num_to_keep); this keeps only the latest URI, for the divergence message."""

    def __init__(self, cfg: Config, state: TrainState, rank: int, tracker, root: str, latest: str | None,
                 report: Callable[[dict, str, str], None]):
        self.cfg, self.state, self.rank, self.tracker, self.root = cfg, state, rank, tracker, root
        self.latest = latest  # this run's last committed checkpoint (also in its own state.json)
        self.report = report

    def save(self, step: int, metrics: dict, report: dict, extra: dict) -> None:
        name = checkpoint.dir_name(step)
        uri = f"{self.root.rstrip('/')}/{name}" if self.root else name
        tmp = checkpoint.staging_dir()
        try:
            checkpoint.save(tmp, self.state.model, self.state.ema, self.state.optimizer, step, self.cfg,
                            extra={**extra, "checkpoint_uri": uri}, rank=self.rank,
                            modules=self.state.checkpoint_modules())
            self.report({**report, "loss": float(metrics["loss"])}, tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.latest = uri
        self.tracker.set_tags({"checkpoint.latest": uri, "checkpoint.step": str(step)})


def publish_model(cfg: Config, state: TrainState, rank: int, tracker) -> dict:
    """After the last step: the sampling weights as an MLflow pyfunc model, registered under
    tracking.register_model. Every rank calls it (gathering the sharded weights is a collective)."""
    from . import generator

    if not (cfg.tracking.enabled and cfg.tracking.log_model):
        return {}
    weights_state = generator.full_state_dict(state.sampling_model)
    if rank != 0:
        return {}
    name = cfg.tracking.register_model
    name = f"shortcut-ray-{cfg.preset}" if name == "auto" else name
    tmp = tempfile.mkdtemp(prefix="shortcut-generator-")
    try:
        weights, config = generator.save(weights_state, cfg, tmp)
        uri = tracker.log_generator(weights, config, cfg, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"logged the generator: {uri}")
    tracker.set_tags({"model_uri": uri})
    return {"model_uri": uri}
