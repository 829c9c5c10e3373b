"""Sweep search spaces over dotted config keys, checked against the config before any trial starts;
the metric, ASHA rungs and how many trials fit the cluster. Ray-free except `param_space`, which
builds the Tune domains (ray imported there). `shortcut_ray.tune` runs the sweep.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass

from .config import Config, ConfigError, field_type, override, parse_value

DRIVER_RESOURCE = "train_driver"
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna")


# -- search space ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dim:
    """One searched config key. choice/grid: `values` are parsed candidates; uniform/loguniform/randint:
    `values` = (lo, hi), hi exclusive for randint (as tune.randint). `dropped` = ((value, reason), ...)
    removed because the config rejects them (or, for the default space, the budget makes them moot)."""

    key: str
    kind: str
    values: tuple
    dropped: tuple = ()

    def spec(self) -> str:
        return f"{self.kind}({','.join(fmt_value(v) for v in self.values)})"


def fmt_value(v) -> str:
    """A value as --space/--set spell it (true, [1,4])."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    return str(v)


def _parse_value(key: str, raw: str):
    """A raw candidate parsed with the field's type, via the same code as --set."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        return parse_value(raw, field_type(key))
    except ValueError as e:
        raise ConfigError(f"cannot parse {raw!r} for {key} ({field_type(key)}): {e}") from None


def _split_args(s: str) -> list[str]:
    """'1,[2,4],3' -> ['1', '[2,4]', '3']: commas inside brackets belong to tuple values."""
    out, depth = [""], 0
    for ch in s:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            out.append("")
        else:
            out[-1] += ch
    return [a.strip() for a in out if a.strip()]


_SPEC = re.compile(r"^\s*([\w.]+)\s*=\s*(\w+)\s*\((.*)\)\s*$")


def parse_dim(text: str) -> Dim:
    """'objective.bootstrap_every=choice(2,4,8)' -> Dim (values parsed with the field's type; not yet
    checked against a config: see `validate_dim`)."""
    m = _SPEC.match(text)
    if not m:
        raise ConfigError(f"--space {text!r} must look like key=KIND(args) with KIND in {KINDS}, "
                          f"e.g. optim.lr=loguniform(1e-4,1e-3) or objective.bootstrap_every=choice(2,4,8)")
    key, kind, args = m.group(1), m.group(2), _split_args(m.group(3))
    typ = field_type(key)
    if kind not in KINDS:
        raise ConfigError(f"--space {text!r}: unknown kind {kind!r}; use one of {KINDS}")
    if kind in ("choice", "grid"):
        if not args:
            raise ConfigError(f"--space {text!r}: {kind}() needs at least one value")
        return Dim(key, kind, tuple(dict.fromkeys(_parse_value(key, a) for a in args)))
    if len(args) != 2:
        raise ConfigError(f"--space {text!r}: {kind}(lo,hi) takes exactly two bounds")
    want = int if kind == "randint" else float
    if typ is not want:
        alt = "uniform/loguniform" if typ is float else "randint" if typ is int else "choice"
        raise ConfigError(f"--space {text!r}: {kind} needs a {want.__name__} field but {key} is "
                          f"{getattr(typ, '__name__', typ)}; use {alt}(...)")
    lo, hi = (_parse_value(key, a) for a in args)
    if not lo < hi:
        raise ConfigError(f"--space {text!r}: lower bound must be below the upper bound")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"--space {text!r}: loguniform needs lo > 0")
    return Dim(key, kind, (lo, hi))


def _reject_reason(base: Config, key: str, value) -> str | None:
    try:
        override(base, {key: value})
        return None
    except (ConfigError, TypeError) as e:
        return str(e)


def validate_dim(base: Config, dim: Dim) -> Dim:
    """Drop candidates the Config rejects for this base (e.g. bootstrap_every values that leave a step
    level without rows for the preset's global batch and worker count). Continuous ranges cannot be
    filtered: both bounds must be valid. ConfigError if nothing valid is left."""
    if dim.kind in ("uniform", "loguniform") or (dim.kind == "randint" and dim.values[1] - dim.values[0] > 4096):
        for v in (dim.values[0], dim.values[1] - (dim.kind == "randint")):
            if (why := _reject_reason(base, dim.key, v)) is not None:
                raise ConfigError(f"{dim.key}={dim.spec()}: bound {v} is invalid: {why}")
        return dim
    keep, dropped = [], list(dim.dropped)
    for v in dim.values if dim.kind != "randint" else range(*dim.values):
        why = _reject_reason(base, dim.key, v)
        (keep.append(v) if why is None else dropped.append((v, why)))
    if not keep:
        reasons = "; ".join(f"{fmt_value(v)}: {w}" for v, w in dropped)
        raise ConfigError(f"no valid value left for {dim.key}={dim.spec()} with this base config: {reasons}")
    if dim.kind == "randint" and not dropped:
        return dim
    kind = "choice" if dim.kind == "randint" else dim.kind  # a filtered integer range becomes a choice
    return Dim(dim.key, kind, tuple(keep), tuple(dropped))


def parse_space(specs: typing.Iterable[str], base: Config) -> dict[str, Dim]:
    """--space strings -> {key: Dim}, each validated against `base`."""
    space: dict[str, Dim] = {}
    for s in specs:
        d = parse_dim(s)
        if d.key in space:
            raise ConfigError(f"--space names {d.key} twice")
        space[d.key] = validate_dim(base, d)
    return space


BOOTSTRAP_EVERY_CANDIDATES = (2, 4, 8, 16, 32)
EMA_DECAY_CANDIDATES = (0.99, 0.995, 0.999, 0.9999)


def default_space(base: Config) -> dict[str, Dim]:
    """objective.bootstrap_every (shortcut objective only) x ema.decay.

    bootstrap_every candidates the Config rejects for this global batch / worker count are dropped
    (they would leave step levels without bootstrap rows, ALGORITHM §2.2). ema.decay keeps decays whose
    averaging horizon 1/(1-decay) is at most a quarter of train.max_steps (a slower EMA is still mostly
    its initial weights at the end, a poor bootstrap teacher); at least the two fastest are kept.
    """
    space: dict[str, Dim] = {}
    if base.objective.train_type == "shortcut":
        space["objective.bootstrap_every"] = validate_dim(
            base, Dim("objective.bootstrap_every", "choice", BOOTSTRAP_EVERY_CANDIDATES))
    budget = base.train.max_steps / 4
    fits = [d for d in EMA_DECAY_CANDIDATES if 1 / (1 - d) <= budget]
    keep = fits if len(fits) >= 2 else list(EMA_DECAY_CANDIDATES[:2])
    dropped = tuple((d, f"averaging horizon {1 / (1 - d):.0f} steps > train.max_steps/4 = {budget:.0f}")
                    for d in EMA_DECAY_CANDIDATES if d not in keep)
    space["ema.decay"] = validate_dim(base, Dim("ema.decay", "choice", tuple(keep), dropped))
    return space


def param_space(space: dict[str, Dim], search: str = "random") -> dict:
    """Tune domains for the search algorithm: 'random' (BasicVariantGenerator: choice -> tune.choice,
    grid -> tune.grid_search), 'grid' (every dim must be discrete; all become grid_search), 'optuna'
    (no grid_search there: grid -> tune.choice)."""
    from ray import tune

    if search not in SEARCHES:
        raise ConfigError(f"search must be one of {SEARCHES}, got {search!r}")
    out = {}
    for key, d in space.items():
        vals = list(d.values)
        if d.kind in ("choice", "grid"):
            as_grid = (d.kind == "grid" and search != "optuna") or search == "grid"
            out[key] = tune.grid_search(vals) if as_grid else tune.choice(vals)
        elif search == "grid":
            raise ConfigError(f"--search grid needs discrete dims; {key}={d.spec()} is not (use choice/grid)")
        else:
            out[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[d.kind](*vals)
    return out


# -- budget, metric and resources -------------------------------------------------------------------

_EVAL_METRIC = re.compile(r"^eval/(\w+)/N(\d+)$")


def check_metric(base: Config, metric: str) -> Config:
    """Errors for metrics that will never be reported; turns eval on (train.eval_every = max_steps // 4)
    when an eval metric is requested and eval is off, so ASHA has rungs to compare."""
    m = _EVAL_METRIC.match(metric)
    if not m:
        return base
    kind, n = m.group(1), int(m.group(2))
    if kind == "fid" and not base.eval.fid_weights:
        raise ConfigError(f"metric {metric} needs Inception weights: set eval.fid_weights (path or URI), "
                          f"or sweep on eval/fd_pixel/N{n}, which needs none")
    if n not in base.eval.fid_steps:
        raise ConfigError(f"metric {metric} is only reported if {n} is in eval.fid_steps "
                          f"(now {base.eval.fid_steps}); add it with --set eval.fid_steps=...")
    if base.train.eval_every <= 0:
        base = override(base, {"train.eval_every": max(1, base.train.max_steps // 4)})
    return base


def report_interval(base: Config, metric: str) -> int:
    """Steps between reports that carry `metric` (eval metrics at eval steps, the rest at checkpoints)."""
    every = base.train.eval_every if metric.startswith("eval/") else base.train.checkpoint_every
    return every if every > 0 else base.train.max_steps


def asha_grace_period(base: Config, metric: str, reduction_factor: int = 2) -> int:
    """First ASHA rung: about max_steps/8 rounded up to a multiple of the report interval, so rungs
    (grace, 2*grace, 4*grace ...) land on steps that report the metric."""
    every = report_interval(base, metric)
    grace = max(every, math.ceil(base.train.max_steps / reduction_factor ** 3 / every) * every)
    return min(grace, base.train.max_steps)


def max_concurrent_trials(resources: dict, train_cfg, data_cpus: float = 1.0, driver_cpus: float = 0.0) -> int:
    """How many trials fit the cluster: CPUs (minus `data_cpus` left to Ray Data's read/decode tasks,
    RAY_NOTES §2) over num_workers * cpus_per_worker (+ the driver's share), GPUs over num_workers, and
    the train_driver resource count. ConfigError if not even one trial fits."""
    per_cpu = train_cfg.num_workers * train_cfg.cpus_per_worker + driver_cpus
    caps = {"CPU": math.floor((resources.get("CPU", 0.0) - data_cpus) / per_cpu + 1e-9)}
    if train_cfg.use_gpu:
        caps["GPU"] = math.floor(resources.get("GPU", 0.0) / train_cfg.num_workers + 1e-9)
    if DRIVER_RESOURCE in resources:
        caps[DRIVER_RESOURCE] = math.floor(resources[DRIVER_RESOURCE])
    n = min(caps.values())
    if n < 1:
        raise ConfigError(
            f"one trial needs {per_cpu:g} CPU (+{data_cpus:g} left for Ray Data)"
            + (f" and {train_cfg.num_workers} GPU" if train_cfg.use_gpu else "")
            + f" but the cluster has {resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU; "
              f"lower train.num_workers / train.cpus_per_worker or add nodes")
    return n


def expected_trials(space: dict[str, Dim], search: str, num_samples: int) -> int:
    """Trials Tune will create: num_samples per point of the grid dims (every dim for --search grid)."""
    if search == "optuna":
        return num_samples
    sizes = [len(d.values) for d in space.values() if d.kind == "grid" or search == "grid"]
    return num_samples * math.prod(sizes)
