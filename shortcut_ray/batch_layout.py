"""Batch layouts: which global batches the shortcut and live-reflow objectives accept over N workers.

The paper's code accepts batches whose B // bootstrap_every bootstrap rows cannot give every step level
a row, and then silently trains only d=1 (ALGORITHM §2.2, pitfall 9). `Config` refuses such layouts
with these checks, and the message names the nearest batch that works (`suggest_global_batch`).
"""

from __future__ import annotations

import typing

from .overrides import check

if typing.TYPE_CHECKING:
    from .config import ObjectiveConfig


def rows_per_level(obj: ObjectiveConfig, b_b: int) -> int:
    """Bootstrap rows each step level gets from b_b rows (half of them when bootstrap_dt_bias is on)."""
    return b_b // obj.num_levels if obj.bootstrap_dt_bias == 0 else (b_b // 2) // obj.num_levels


def bootstrap_batch(objective: ObjectiveConfig, global_batch: int) -> int:
    """B_b = B // bootstrap_every (ALGORITHM §2.1)."""
    return global_batch // objective.bootstrap_every


def validate_bootstrap_layout(obj: ObjectiveConfig, global_batch: int, world: int) -> None:
    """Refuse layouts the official code accepts but that silently drop step levels (§2.2, pitfall 9)."""
    b_b = bootstrap_batch(obj, global_batch)
    levels = obj.num_levels
    need = levels if obj.bootstrap_dt_bias == 0 else 2 * levels
    check(rows_per_level(obj, b_b) >= 1,
           f"train.global_batch={global_batch} with objective.bootstrap_every={obj.bootstrap_every} gives "
           f"{b_b} bootstrap rows, fewer than the {need} needed to give each of the {levels} step levels "
           f"at least one row (bootstrap_dt_bias={obj.bootstrap_dt_bias}); with this the paper's code "
           f"silently trains only d=1. Raise train.global_batch to at least "
           f"{suggest_global_batch(obj, max(global_batch, need * obj.bootstrap_every), world)} or lower "
           f"objective.bootstrap_every.")
    check(b_b % world == 0,
           f"the {b_b} bootstrap rows (train.global_batch // objective.bootstrap_every) must split evenly over "
           f"train.num_workers={world}; e.g. set train.global_batch={suggest_global_batch(obj, global_batch, world)}")
    check(not obj.bootstrap_cfg or obj.class_conditional,
           "objective.bootstrap_cfg needs class labels; set objective.class_conditional=true or bootstrap_cfg=false")


def suggest_global_batch(obj: ObjectiveConfig, global_batch: int, world: int) -> int:
    """The accepted global batch nearest to `global_batch` (the larger on a tie): divisible by the workers
    and, for shortcut / live reflow, a valid bootstrap / reflow layout."""
    def ok(b: int) -> bool:
        if b < 1 or b % world:
            return False
        b_b = bootstrap_batch(obj, b)  # the checks of the layout validators below that depend on b
        if obj.train_type == "live_reflow":
            return b_b >= 1 and b_b % world == 0
        if obj.train_type != "shortcut":
            return True
        return rows_per_level(obj, b_b) >= 1 and b_b % world == 0

    for delta in range(0, 1 << 13):
        for b in (global_batch + delta, global_batch - delta):
            if ok(b):
                return b
    return global_batch


def validate_reflow_layout(obj: ObjectiveConfig, global_batch: int, world: int) -> None:
    """Live reflow replaces B // bootstrap_every flow rows by reflow rows, dealt over the workers (§6.5)."""
    b_b = bootstrap_batch(obj, global_batch)
    check(b_b >= 1 and b_b % world == 0,
           f"live reflow needs train.global_batch // objective.bootstrap_every = {b_b} reflow rows to be >= 1 "
           f"and to split evenly over train.num_workers={world}; e.g. set "
           f"train.global_batch={suggest_global_batch(obj, global_batch, world)}")
