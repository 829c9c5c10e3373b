"""Diffusion (ALGORITHM §6.6 default): DDPM linear betas, epsilon prediction, deterministic DDIM sampling.

Not in the official repository, so this is the documented default (the DiT paper's set-up): T = 1000
steps, betas linear from 1e-4 to 0.02, alpha_bar_tau = prod_{s <= tau} (1 - beta_s), and
    x_tau = sqrt(alpha_bar_tau) x1 + sqrt(1 - alpha_bar_tau) eps,   target = eps   (simple MSE),
with tau uniform in {0..T-1} and label dropout as for flow rows (for CFG). The same DiT is fed the time
t = (T - 1 - tau) / T in [0, 1), keeping the project's direction (t = 0 is the noisiest step, like the
flow grid j/M); k is ignored.

Sampling: DDIM with eta = 0 at N evenly spaced ("trailing") timesteps tau_i = T-1 - floor(i T / N),
i = 0..N-1, so N = 1 starts at tau = T-1 and N = T visits every timestep. One step from tau to tau'
(tau' = -1 after the last, alpha_bar = 1):
    x1_hat = (x - sqrt(1 - ab) eps_hat) / sqrt(ab),   x <- sqrt(ab') x1_hat + sqrt(1 - ab') eps_hat.
For pixel data (`data_range` = 1, set by build_objective from data.kind) x1_hat is clipped to [-1, 1]
and eps_hat re-derived from the clipped x1_hat, as DDPM/DDIM codebases do for pixel models
(`clip_denoised`): at tau = T-1, sqrt(alpha_bar) = 0.0064 multiplies any error of eps_hat by 156, and
an unclipped 1000-step Fashion-MNIST model sampled values of +-50 (FD 20,631 at N = 1, 1,780 at
N = 128). Latents (data_range None) are not clipped, as in DiT. Guidance combines eps_hat like velocities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Networks, Objective, Rows, SampleStep, per_row, rms


@dataclass(frozen=True)
class DDPMSchedule:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def alpha_bar(self) -> torch.Tensor:
        """(T,) float64 cumulative products of 1 - beta."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.timesteps, dtype=torch.float64)
        return torch.cumprod(1 - betas, dim=0)

    def t_of(self, tau: int) -> float:
        """Model time of timestep tau; tau = -1 (clean data) maps to t = 1."""
        return (self.timesteps - 1 - tau) / self.timesteps

    def tau_of(self, t: float) -> int:
        return self.timesteps - 1 - round(t * self.timesteps)

    def sample_taus(self, num_steps: int) -> list[int]:
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.timesteps:
            raise ValueError(f"DDIM needs 1 <= num_steps <= {self.timesteps}, got {num_steps!r}")
        return [self.timesteps - 1 - (i * self.timesteps) // num_steps for i in range(num_steps)]


@dataclass
class DiffusionDraws:
    eps: torch.Tensor  # (b, C, H, W)
    tau: torch.Tensor  # (b,) long in {0..T-1}
    drop: torch.Tensor  # (b,) bool


class DiffusionObjective(Objective):
    sampler = "ddim"
    schedule = DDPMSchedule()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._alpha_bar = self.schedule.alpha_bar()

    def _ab(self, device: torch.device) -> torch.Tensor:
        """alpha_bar as float32 on `device`, copied once."""
        cached = getattr(self, "_ab_dev", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._ab_dev = self._alpha_bar.float().to(device)
        return cached

    def draw(self, x1: torch.Tensor, generator: torch.Generator, step: int = 0, max_steps: int = 1) -> DiffusionDraws:
        self._check_batch(x1)
        b, dev = x1.shape[0], x1.device
        tau = torch.randint(0, self.schedule.timesteps, (b,), generator=generator, device=dev)
        eps = torch.randn(x1.shape, generator=generator, device=dev)
        drop = torch.rand(b, generator=generator, device=dev) < self.cfg.class_dropout_prob
        return DiffusionDraws(eps, tau, drop)

    def targets(self, x1: torch.Tensor, y: torch.Tensor, draws: DiffusionDraws, nets: Networks, step: int = 0,
                max_steps: int = 1) -> Rows:
        x1, y = x1.float(), self.labels(y)
        y = torch.where(draws.drop, torch.full_like(y, self.null), y)
        ab = per_row(self._ab(x1.device)[draws.tau])
        x_t = ab.sqrt() * x1 + (1 - ab).sqrt() * draws.eps
        T = self.schedule.timesteps
        t = (T - 1 - draws.tau).float() / T
        k = torch.zeros_like(y)
        diag = {"label_drop_frac": draws.drop.float().mean(), "rms_x_t": rms(x_t)}
        return Rows(x_t, t, k, y, draws.eps.float(), 0, diag)

    # -- DDIM (eta = 0) -----------------------------------------------------------------------------
    def sample_steps(self, num_steps: int) -> list[SampleStep]:
        sch = self.schedule
        taus = sch.sample_taus(num_steps) + [-1]
        return [SampleStep(sch.t_of(a), sch.t_of(b) - sch.t_of(a), 0) for a, b in zip(taus, taus[1:])]

    def alpha_bar_at(self, t: float) -> float:
        """alpha_bar of the timestep whose model time is t; 1.0 at t = 1 (clean data)."""
        tau = self.schedule.tau_of(t)
        return 1.0 if tau < 0 else float(self._alpha_bar[tau])

    def sample_update(self, x: torch.Tensor, s: torch.Tensor, step: SampleStep, noise) -> torch.Tensor:
        ab, ab_next = self.alpha_bar_at(step.t), self.alpha_bar_at(step.t + step.d)
        x1_hat = (x - (1 - ab) ** 0.5 * s) / ab ** 0.5
        if self.data_range is not None:  # pixels: the estimate stays in the data's range, eps follows it
            x1_hat = x1_hat.clamp(-self.data_range, self.data_range)
            s = (x - ab ** 0.5 * x1_hat) / (1 - ab) ** 0.5
        return ab_next ** 0.5 * x1_hat + (1 - ab_next) ** 0.5 * s
