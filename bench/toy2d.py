"""2-D 8-Gaussians toy: shortcut vs flow matching with this package's objective and sampler (ALGORITHM §9.2).

Trains the same small MLP velocity network twice, once with `train_type='shortcut'` and once with
`train_type='flow_matching'` (the paper's 'naive'), using `shortcut_ray.objectives.build_objective` for
every target and `shortcut_ray.sampler.sample` for every sample, then evaluates the EMA weights at
N = 1, 2, 4, 8, 128 from one fixed noise batch and checks the §9.2 pass criteria.

    python -m bench.toy2d                       # 8k steps, EMA 0.99 (the §9.2 CI calibration), ~minutes
    python -m bench.toy2d --steps 20000 --ema 0.999

Writes bench/results/toy2d.json (common.write_result: command, device, versions, date; see `summarise`). Importable: `make_data`, `MLPVelocity`, `train`, `evaluate`.

Metric definitions (all on 8,192 samples from the same fixed noise for every N):
  on_mode       share of samples within 0.3 (= 3 sigma) of the nearest centre;
  sw1           sliced Wasserstein-1 over 64 fixed random directions vs 8,192 fresh data points;
  mode_balance  min over the 8 modes of the on-mode count assigned to that mode, divided by the mean
                per-mode on-mode count (0 when nothing is on-mode);
  mean_abs      mean Euclidean norm |x| of the samples (data: about 2; collapse to the mean: about 0);
  same-noise gap             median over samples of |x_{N=1} - x_{N=128}| (Euclidean);
  self-consistency residual  RMS over the noise batch of s(x,0,0) - 1/2 [s(x,0,1) + s(x + 1/2 s(x,0,1), 1/2, 1)].
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from bench.common import add_out_arg, write_result
from shortcut_ray.config import ObjectiveConfig
from shortcut_ray.ema import make_ema, update_ema
from shortcut_ray.model import timestep_features
from shortcut_ray.objectives import Networks, build_objective, objective_class
from shortcut_ray.sampler import fixed_noise, sample

NUM_MODES = 8
RADIUS = 2.0
STD = 0.1
ON_MODE_RADIUS = 0.3  # 3 sigma
STEP_COUNTS = (1, 2, 4, 8, 128)
NUM_EVAL = 8192
NUM_PROJECTIONS = 64
NOISE_SEED = 42  # fixed evaluation noise, the same for every N and both runs
DATA_SEED = 1234  # the fresh reference data for SW1
PROJ_SEED = 99
RUNS = ("shortcut", "flow_matching")


# -- data ------------------------------------------------------------------------------------------

def centres() -> torch.Tensor:
    """(8, 2) mode centres on the circle of radius 2."""
    a = torch.arange(NUM_MODES, dtype=torch.float32) * (2 * math.pi / NUM_MODES)
    return RADIUS * torch.stack([torch.cos(a), torch.sin(a)], dim=1)


def make_data(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points of the 8-Gaussians mixture (radius 2, std 0.1) as (n, 2, 1, 1) 'images'."""
    idx = torch.randint(0, NUM_MODES, (n,), generator=generator)
    pts = centres()[idx] + STD * torch.randn(n, 2, generator=generator)
    return pts.view(n, 2, 1, 1)


# -- model -------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.act(h))))


class MLPVelocity(nn.Module):
    """f(x, t, k, y) for 2-D points: Linear(x) + Linear(TE(t)) + Linear(TE(k)) + LE(y), 3 residual SiLU
    blocks, zero-initialised output. TE = the package's raw-value [cos, sin] features (64-d).
    `ignore_k=True` replaces k by zeros before TE_k, exactly as ShortcutDiT does for baselines."""

    def __init__(self, width: int = 256, depth: int = 3, num_classes: int = 1, feat_dim: int = 64,
                 ignore_k: bool = False, dim: int = 2):
        super().__init__()
        self.dim, self.feat_dim, self.num_classes, self.ignore_k = dim, feat_dim, num_classes, ignore_k
        self.x_in = nn.Linear(dim, width)
        self.t_in = nn.Linear(feat_dim, width)
        self.k_in = nn.Linear(feat_dim, width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row = null label
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.ignore_k:
            k = torch.zeros_like(k)
        h = (self.x_in(x.reshape(shape[0], self.dim).float())
             + self.t_in(timestep_features(t, self.feat_dim))
             + self.k_in(timestep_features(k.float(), self.feat_dim))
             + self.y_embed(y))
        for blk in self.blocks:
            h = blk(h)
        return self.out(h).view(shape)


# -- training ----------------------------------------------------------------------------------------

def train(train_type: str, steps: int = 8000, ema_decay: float = 0.99, seed: int = 0, batch: int = 1024,
          lr: float = 1e-3, weight_decay: float = 0.1, bootstrap_every: int = 8, denoise_timesteps: int = 128,
          width: int = 256, log_every: int = 0) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train one run with the package objective; returns (EMA model in eval mode, per-step metric lists)."""
    cfg = ObjectiveConfig(train_type=train_type, denoise_timesteps=denoise_timesteps,
                          bootstrap_every=bootstrap_every, class_conditional=False, class_dropout_prob=0.0)
    if train_type == "shortcut" and batch // bootstrap_every < cfg.num_levels:
        raise ValueError(f"batch {batch} // bootstrap_every {bootstrap_every} gives fewer bootstrap rows than "
                         f"the {cfg.num_levels} step levels; raise the batch")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    obj = build_objective(cfg, num_classes=1, global_batch=batch)
    model = MLPVelocity(width=width, num_classes=1, ignore_k=not objective_class(train_type).uses_step_level)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    y = torch.full((batch,), 1, dtype=torch.long)  # null label (num_classes = 1); the objective re-nulls anyway
    hist: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x1 = make_data(batch, gen)
        out = obj.loss(Networks(online=model, ema=ema), x1, y, gen, step - 1, steps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay)
        for name in ("loss", "loss_flow", "loss_bootstrap"):
            if name in out.metrics:
                hist.setdefault(name, []).append(float(out.metrics[name]))
        if log_every and step % log_every == 0:
            tail = {k: sum(v[-log_every:]) / len(v[-log_every:]) for k, v in hist.items()}
            print(f"[{train_type}] step {step}/{steps} " + " ".join(f"{k}={v:.4f}" for k, v in tail.items())
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    return ema.eval(), hist


# -- evaluation --------------------------------------------------------------------------------------

def _points(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def sliced_w1(a: torch.Tensor, b: torch.Tensor, num_projections: int = NUM_PROJECTIONS,
              seed: int = PROJ_SEED) -> float:
    """Sliced Wasserstein-1 between equal-size point sets (n, 2) over fixed random unit directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float((pa - pb).abs().mean())


def point_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """on_mode, sw1, mode_balance, mean_abs of samples x (n, 2) against reference data ref (n, 2)."""
    dist = torch.cdist(x, centres())  # (n, 8)
    dmin, nearest = dist.min(dim=1)
    on = dmin < ON_MODE_RADIUS
    counts = torch.bincount(nearest[on], minlength=NUM_MODES).float()
    mean = counts.mean()
    return {
        "on_mode": float(on.float().mean()),
        "sw1": sliced_w1(x, ref),
        "mode_balance": float(counts.min() / mean) if mean > 0 else 0.0,
        "mean_abs": float(x.norm(dim=1).mean()),
    }


@torch.no_grad()
def self_consistency_residual(model: nn.Module, noise: torch.Tensor) -> float:
    """RMS of s(x,0,0) - 1/2 [s(x,0,1) + s(x + 1/2 s(x,0,1), 1/2, 1)] over the noise (§9.2)."""
    b = noise.shape[0]
    y = torch.full((b,), getattr(model, "num_classes", 1), dtype=torch.long)
    t0, th = torch.zeros(b), torch.full((b,), 0.5)
    k0, k1 = torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)
    s_full = model(noise, t0, k0, y).float()
    s1 = model(noise, t0, k1, y).float()
    s2 = model(noise + 0.5 * s1, th, k1, y).float()
    return float((s_full - 0.5 * (s1 + s2)).pow(2).mean().sqrt())


@torch.no_grad()
def evaluate(model: nn.Module, noise: torch.Tensor | None = None, ref: torch.Tensor | None = None,
             step_counts=STEP_COUNTS, num_samples: int = NUM_EVAL) -> dict:
    """Metrics of one model: {'per_n': {'1': {...}, ...}, 'same_noise_gap': .., 'self_consistency_residual': ..}.
    The same fixed noise is used for every N (and, by default, for every model)."""
    if noise is None:
        noise = fixed_noise((num_samples, 2, 1, 1), NOISE_SEED)
    if ref is None:
        ref = _points(make_data(noise.shape[0], torch.Generator().manual_seed(DATA_SEED)))
    model.eval()
    y = torch.full((noise.shape[0],), getattr(model, "num_classes", 1), dtype=torch.long)
    samples = {n: _points(sample(model, noise, y, n)) for n in step_counts}
    per_n = {str(n): point_metrics(samples[n], ref) for n in step_counts}
    lo, hi = min(step_counts), max(step_counts)
    gap = float((samples[lo] - samples[hi]).norm(dim=1).median())
    return {"per_n": per_n, "same_noise_gap": gap,
            "self_consistency_residual": self_consistency_residual(model, noise), "samples": samples}


def criteria(res: dict) -> dict[str, bool]:
    """The §9.2 pass criteria (as stated in the issue) on a results dict shaped like toy2d.json."""
    sc, fm = res["shortcut"], res["flow_matching"]
    return {
        "shortcut_n1_on_mode_ge_0.5": sc["1"]["on_mode"] >= 0.5,
        "shortcut_n1_sw1_3x_lower_than_fm": sc["1"]["sw1"] * 3.0 <= fm["1"]["sw1"],
        "shortcut_n128_on_mode_ge_0.9": sc["128"]["on_mode"] >= 0.9,
        "flow_matching_n128_on_mode_ge_0.9": fm["128"]["on_mode"] >= 0.9,
        "loss_bootstrap_10x_lower_than_loss_flow": res["loss_bootstrap"] * 10.0 <= res["loss_flow"],
    }


def _table(res: dict) -> str:
    lines = [f"{'run':<14}{'N':>5}{'on_mode':>9}{'sw1':>8}{'balance':>9}{'mean|x|':>9}"]
    for run in ("shortcut", "flow_matching"):
        for n, m in res[run].items():
            lines.append(f"{run:<14}{n:>5}{m['on_mode']:>9.3f}{m['sw1']:>8.3f}{m['mode_balance']:>9.3f}"
                         f"{m['mean_abs']:>9.3f}")
    for key in ("same_noise_gap", "self_consistency_residual"):
        lines.append(f"{key}: shortcut {res[key]['shortcut']:.4f}  flow_matching {res[key]['flow_matching']:.4f}")
    lines.append(f"loss_bootstrap {res['loss_bootstrap']:.4f}  loss_flow {res['loss_flow']:.4f}")
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {name}" for name, ok in res["criteria"].items()]
    lines.append(f"passed: {res['passed']}")
    return "\n".join(lines)


def _run_job(train_type: str, kwargs: dict, threads: int) -> tuple[dict, dict, float]:
    """Train one run and evaluate its EMA weights (in a worker process or inline): (history, eval, train s)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, hist = train(train_type, **kwargs)
    seconds = time.perf_counter() - t0
    ev = evaluate(model)
    ev.pop("samples")
    return hist, ev, seconds


def summarise(done: dict, tail: int) -> dict:
    """The results dict (per-N metrics of both runs, same-noise gaps, final losses, §9.2 criteria)."""
    res: dict = {run: done[run][1]["per_n"] for run in RUNS}
    for key in ("same_noise_gap", "self_consistency_residual"):
        res[key] = {run: done[run][1][key] for run in RUNS}
    hist = done["shortcut"][0]
    tail = min(tail, len(hist["loss_flow"]))
    res["loss_bootstrap"] = sum(hist["loss_bootstrap"][-tail:]) / tail
    res["loss_flow"] = sum(hist["loss_flow"][-tail:]) / tail
    res["criteria"] = criteria(res)
    res["passed"] = all(res["criteria"].values())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="total CPU threads")
    p.add_argument("--sequential", action="store_true",
                   help="train the two runs one after the other with --threads threads each, instead of in "
                        "two processes with --threads // 2 each (more robust on a busy shared CPU)")
    p.add_argument("--tail", type=int, default=200, help="steps averaged for the final losses")
    p.add_argument("--log-every", type=int, default=1000)
    add_out_arg(p, "toy2d")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kwargs = dict(steps=args.steps, ema_decay=args.ema, seed=args.seed, batch=args.batch, log_every=args.log_every)
    if args.sequential:
        done = {run: _run_job(run, kwargs, args.threads) for run in RUNS}
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(len(RUNS), mp_context=mp.get_context("spawn")) as pool:
            futs = {run: pool.submit(_run_job, run, kwargs, max(1, args.threads // len(RUNS))) for run in RUNS}
            done = {run: fut.result() for run, fut in futs.items()}
    for run in RUNS:
        print(f"{run}: trained in {done[run][2]:.0f}s")
    res = summarise(done, args.tail)
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["mode"] = "sequential" if args.sequential else f"2 runs in parallel, {max(1, args.threads // 2)} thread(s) each"
    print(_table(res))
    write_result(args.out or "toy2d", res, device=torch.device("cpu"))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
