"""Any-step sampler (ALGORITHM §4): Euler steps of power-of-two sizes the model was trained on.

`sample(model, noise, y, num_steps)` is a pure function: the same noise gives comparable outputs at
every step count (DESIGN house style 3). For N a power of two this is exactly the paper's sampler
(d = 1/N, k = log2 N, t_i = i/N). Beyond the paper, any integer budget 1 <= N <= M is accepted:

    Rule. Let p be the largest power of two <= N. Start from p steps of size 1/p and halve the LAST
    N - p of them (each halving adds one step), so big steps are taken near the noise and small ones
    near the data. N = 3 -> d = 1/2, 1/4, 1/4; N = 5 -> 1/4, 1/4, 1/4, 1/8, 1/8; N = 6 -> 1/4, 1/4,
    1/8 x 4. Every d is 2^-k with k <= log2 M, a level the model was trained on, and the times t are
    dyadic, so they are exact in floating point.

An objective may replace the schedule and the update (`sample(..., objective=obj)`, see
objectives/base.py): live reflow queries k = 0 below N = M, consistency models may re-noise
(multistep), diffusion takes DDIM steps. Guidance is objectives.base.guided_velocity, as in training.
"""

from __future__ import annotations

import math

import torch

from .objectives.base import SampleStep, guided_velocity


def k_for_steps(num_steps: int) -> int:
    """Level k = log2 N of an N-step power-of-two sampler (k = 0: one step of d = 1)."""
    if num_steps < 1 or num_steps & (num_steps - 1):
        raise ValueError(f"k_for_steps needs a power of two >= 1, got {num_steps}")
    return int(math.log2(num_steps))


def step_schedule(num_steps: int, denoise_timesteps: int = 128) -> list[tuple[float, int]]:
    """[(t_i, k_i)] of each Euler step; d_i = 2^-k_i, sum d_i = 1 (see the module docstring's rule)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= denoise_timesteps:
        raise ValueError(f"num_steps must be in 1..{denoise_timesteps} (the model's finest level is "
                         f"d = 1/{denoise_timesteps}), got {num_steps}")
    p = 1 << (num_steps.bit_length() - 1)  # largest power of two <= N
    n_fine = 2 * (num_steps - p)  # steps of size 1/(2p), at the end
    n_coarse = num_steps - n_fine  # steps of size 1/p, first
    k_coarse = k_for_steps(p)
    levels = [k_coarse] * n_coarse + [k_coarse + 1] * n_fine
    schedule, t = [], 0.0
    for k in levels:
        schedule.append((t, k))
        t += 2.0 ** -k
    assert t == 1.0, "step sizes must sum to one"
    return schedule


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, num_steps: int, cfg_scale: float = 1.0,
           null_label: int | None = None, denoise_timesteps: int = 128, objective=None,
           renoise_seed: int = 0) -> torch.Tensor:
    """Integrate x from noise at t = 0 to data at t = 1 in `num_steps` steps (Euler: x <- x + d s).

    cfg_scale w: s = s(null) + w (s(y) - s(null)); w = 1 is conditional only (one pass), w = 0
    unconditional. `null_label` (the model's num_classes) is needed whenever w != 1.
    `objective` (optional) supplies the (t, d, k) of each step and the update rule: live reflow's k = 0
    below N = M, multistep consistency sampling, DDIM for diffusion. Without it: the Euler schedule above.
    Updates that re-noise draw fixed noise from `renoise_seed` (the same for every call).
    """
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError("cfg_scale != 1 needs null_label (the model's num_classes)")
    if objective is None:
        steps = [SampleStep(t, 2.0 ** -k, k) for t, k in step_schedule(num_steps, denoise_timesteps)]
        update = _euler
    else:
        steps, update = objective.sample_steps(num_steps), objective.sample_update
    x = noise.float()
    b = x.shape[0]
    for i, st in enumerate(steps):
        tt = torch.full((b,), st.t, device=x.device)
        kk = torch.full((b,), st.k, device=x.device, dtype=torch.long)
        s = guided_velocity(model, x, tt, kk, y, cfg_scale, null_label)
        x = update(x, s, st, lambda i=i: fixed_noise(tuple(x.shape), renoise_seed * 100_003 + i, x.device))
    return x


def _euler(x: torch.Tensor, s: torch.Tensor, step: SampleStep, noise) -> torch.Tensor:
    return x + step.d * s


def fixed_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The same noise for every step count (ALGORITHM §4: same-noise comparisons across N)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)
