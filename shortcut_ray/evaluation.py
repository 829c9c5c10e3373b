"""Sample-quality evaluation at every requested step count, with every rank sampling in parallel.

For each N in eval.fid_steps all ranks generate their share of eval.fid_samples from fixed noise
(the same noise for every N), the samples are gathered, and rank 0 computes
- `fd_pixel/N{n}`: the Frechet distance between generated and real images in the model's own space
  (pixels or latents), average-pooled to at most 16x16 per channel. Cheap, needs no weights; the
  project's proxy for sweeps and CPU runs. Not comparable to published FIDs.
- `fid/N{n}`: the standard FID (ALGORITHM §5) with the InceptionV3 of eval.fid_weights, against
  eval.fid_ref_stats or statistics of the real images given to the Evaluator.
Engine layer: torch + torch.distributed only (the worker and jobs/evaluate.py supply model and data).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config
from .distributed import all_gather_rows
from .fid import FeatureStats, load_inception
from .objectives import for_sampling
from .sampler import sample


def pooled(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * min(H,16)^2) float64 features for the pixel-space Frechet distance."""
    side = min(16, x.shape[-1])
    return F.adaptive_avg_pool2d(x.float(), side).flatten(1).double()


def log_reference(tracker, provenance: dict) -> None:
    """Record the FID reference as `fid_ref.*` MLflow params. MLflow params cannot change, so a run
    that already holds another reference (re-evaluated against a different file) gets tags instead."""
    if not provenance:
        return
    params = {f"fid_ref.{k}": v for k, v in provenance.items()}
    try:
        tracker.log_params(params)
    except Exception:  # noqa: BLE001 - mlflow's MlflowException; the engine layer does not import mlflow
        tracker.set_tags(params)


class Evaluator:
    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.inception = None
        if cfg.eval.fid_weights:
            self.inception = load_inception(cfg.eval.fid_weights, device=device)
        self.ref_pixel: FeatureStats | None = None
        self.ref_fid: FeatureStats | None = FeatureStats.load(cfg.eval.fid_ref_stats) if cfg.eval.fid_ref_stats else None
        self.num_reference = 0
        self.reference_data = ""

    @property
    def samples_per_rank(self) -> int:
        return -(-self.cfg.eval.fid_samples // self.world)  # equal shares: same number of forwards per rank

    @property
    def fid_reference(self) -> dict:
        """Provenance of the FID reference, logged beside every FID (file + sha256, or the data)."""
        if self.ref_fid is None or self.inception is None:  # no FID, nothing to attribute
            return {}
        return self.ref_fid.provenance or {"source": f"computed from {self.num_reference} real images of "
                                                     f"{self.reference_data}".strip()}

    def set_reference(self, local_images: torch.Tensor) -> None:
        """Real images (this rank's share, model space); gathered so every rank holds the statistics."""
        real = all_gather_rows(local_images.to(self.device).float().contiguous())
        self.num_reference = real.shape[0]
        self.reference_data = f"{self.cfg.data.source} {self.cfg.data.uri}"  # kept if cfg is swapped later
        self.ref_pixel = FeatureStats.from_features(pooled(real).cpu().numpy())
        if self.inception is not None and self.ref_fid is None:
            feats = all_gather_rows(self.inception(self._display(local_images.to(self.device))).float())
            self.ref_fid = FeatureStats.from_features(feats.double().cpu().numpy())

    def _display(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.data.kind == "latents":
            from .latents import decode_for_display

            return torch.as_tensor(decode_for_display(x, self.cfg.data), device=self.device)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def run(self, model, autocast=None, batch_size: int = 256) -> tuple[dict[str, float], dict]:
        """Metrics {"fd_pixel/N1": .., "fid/N1": ..} (on rank 0; other ranks get {}) and a report dict."""
        cfg = self.cfg
        d, n_local = cfg.data, self.samples_per_rank
        g = torch.Generator().manual_seed(cfg.eval.seed * 7_919 + self.rank)  # per-rank noise, fixed over N
        noise = torch.randn((n_local, d.channels, d.image_size, d.image_size), generator=g)
        if cfg.objective.class_conditional:
            labels = torch.randint(0, d.num_classes, (n_local,), generator=g)  # uniform classes (§5)
        else:
            labels = torch.full((n_local,), d.num_classes)
        objective = for_sampling(cfg)  # the run's sampler rule (live reflow's k, DDIM, consistency)
        metrics: dict[str, float] = {}
        report = {"samples": n_local * self.world, "reference_images": self.num_reference,
                  "weights": "ema" if cfg.ema.eval_with_ema else "online", "cfg_scale": cfg.eval.cfg_scale,
                  "inception": getattr(self.inception, "weights_id", None), "fid_reference": self.fid_reference,
                  "per_N": {}}
        for n in cfg.eval.fid_steps:
            t0 = time.perf_counter()
            chunks = []
            for i in range(0, n_local, batch_size):
                ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
                with ctx:
                    x = sample(model, noise[i:i + batch_size].to(self.device), labels[i:i + batch_size].to(self.device),
                               n, cfg.eval.cfg_scale, d.num_classes, cfg.objective.denoise_timesteps,
                               objective=objective)
                chunks.append(x.float())
            local = torch.cat(chunks)
            gen = all_gather_rows(local.contiguous())
            entry = {"seconds_sampling": time.perf_counter() - t0}
            if self.ref_pixel is not None:
                stats = FeatureStats.from_features(pooled(gen).cpu().numpy())
                metrics[f"fd_pixel/N{n}"] = entry["fd_pixel"] = stats.frechet_distance(self.ref_pixel)
            if self.inception is not None and self.ref_fid is not None:
                feats = all_gather_rows(self.inception(self._display(local)).float())
                stats = FeatureStats.from_features(feats.double().cpu().numpy())
                metrics[f"fid/N{n}"] = entry["fid"] = stats.frechet_distance(self.ref_fid)
                entry["fid_mu_norm"] = float(np.linalg.norm(stats.mu))
            report["per_N"][str(n)] = entry
        return (metrics if self.rank == 0 else {}), report
