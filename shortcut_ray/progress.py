"""What the user reads on the console: one progress line per log interval, and the end-of-run summary.

Pure Python (no torch, ray or mlflow), so the ETA maths is unit-tested on its own:

    p = Progress(total=600, start_step=0, start_time=t0)
    p.update(step=50, now=t1)            # after every log interval
    p.line(50, loss=0.31, images_per_s=180.0)
    # 'step    50/600 (  8%)  loss 0.3100  180.0 img/s  elapsed 0:41  ETA 7:31'

The ETA is the remaining steps over the recent step rate: an exponential moving average of the rate of
each interval (weight `smoothing` on the newest), so one slow interval (a checkpoint, an eval, the
first steps' warm-up) moves it but does not dominate it. Steps done before a resume count neither
toward the rate nor toward the elapsed time.
"""

from __future__ import annotations

import math
import time


def format_duration(seconds: float) -> str:
    """0:07, 4:05, 1:02:03; '?' when unknown (None, nan, inf or negative)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, start_step: int = 0, start_time: float | None = None, smoothing: float = 0.3):
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.total, self.start_step, self.smoothing = total, start_step, smoothing
        self.start_time = time.monotonic() if start_time is None else start_time
        self._last_step, self._last_time = start_step, self.start_time
        self.rate: float | None = None  # steps per second, smoothed

    def update(self, step: int, now: float | None = None) -> None:
        """Record that `step` steps are done at time `now` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        steps, dt = step - self._last_step, now - self._last_time
        if steps > 0 and dt > 0:
            r = steps / dt
            self.rate = r if self.rate is None else self.smoothing * r + (1 - self.smoothing) * self.rate
        self._last_step, self._last_time = step, now

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.start_time

    def eta(self, step: int | None = None) -> float | None:
        """Seconds until `total` at the smoothed rate; None before the first interval."""
        step = self._last_step if step is None else step
        if step >= self.total:
            return 0.0
        if not self.rate:
            return None
        return (self.total - step) / self.rate

    def line(self, step: int, loss: float, images_per_s: float, now: float | None = None, extra: str = "") -> str:
        width = len(str(self.total))
        pct = 100.0 * step / self.total
        eta = self.eta(step)
        return (f"step {step:>{width}d}/{self.total} ({pct:3.0f}%)  loss {loss:.4f}  {images_per_s:7.1f} img/s"
                f"  elapsed {format_duration(self.elapsed(now))}  ETA {format_duration(eta if eta is not None else float('nan'))}"
                + (f"  {extra}" if extra else ""))


PREFIX = "[shortcut-ray] "
"""Starts every line the worker prints for the user (`periodic.say` adds it; the jobs' own lines type it
out); bench/quickstart.py finds the progress and eval lines by it."""


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """'eval step 1500: eval/fd_pixel/N1 8.85, eval/fd_pixel/N2 6.52' (the metrics in their order)."""
    return f"eval step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def quality_table(metrics: dict[str, float]) -> list[str]:
    """eval/* metrics -> aligned text lines, one per N: 'N  fd_pixel  fid' (lower is better)."""
    kinds = sorted({k.split("/")[-2] for k in metrics if k.count("/") >= 1 and k.rsplit("/", 1)[-1].startswith("N")})
    steps = sorted({int(k.rsplit("/N", 1)[1]) for k in metrics if "/N" in k and k.rsplit("/N", 1)[1].isdigit()})
    if not kinds or not steps:
        return []
    head = f"{'N':>5}" + "".join(f"{k:>12}" for k in kinds)
    rows = [head]
    for n in steps:
        cells = []
        for k in kinds:
            v = next((val for key, val in metrics.items() if key.endswith(f"{k}/N{n}")), None)
            cells.append(f"{v:12.2f}" if v is not None else f"{'-':>12}")
        rows.append(f"{n:>5}" + "".join(cells))
    return rows
