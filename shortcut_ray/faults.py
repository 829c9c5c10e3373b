"""Errors that retrying cannot fix, and how the driver reports them (Ray-free).

A `PermanentError` (bad config or data, a diverged run, a service unreachable at the start, an
untrusted checkpoint) is raised where the cause is known, with a message that says what to change.
Ray Train does not restart the worker group for it (ray_trainer.PermanentAwarePolicy), and the jobs
print `explain(exc)`: that message alone, not the `WorkerGroupError` traceback around it.
"""

from __future__ import annotations


class PermanentError(RuntimeError):
    """Retrying cannot fix this; the message says what to change."""


class DivergenceError(PermanentError):
    """The loss or the gradients became non-finite."""


def _children(exc: BaseException) -> list[BaseException]:
    kids = list(getattr(exc, "worker_failures", {}).values())  # ray.train.WorkerGroupError
    for attr in ("_base_exc", "controller_failure", "__cause__", "__context__"):  # Train V2 wrappers
        child = getattr(exc, attr, None)
        if isinstance(child, BaseException):
            kids.append(child)
    return kids


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception inside it (Ray's worker-failure wrappers, causes), outermost first."""
    seen, out, todo = set(), [], [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo.extend(_children(e))
    return out


def find_permanent(exc: BaseException) -> PermanentError | None:
    return next((e for e in causes(exc) if isinstance(e, PermanentError)), None)


def explain(exc: BaseException) -> str:
    """One paragraph for the user: a PermanentError's message, else the innermost cause as `Type: message`
    (its first lines; the full traceback stays in Ray's logs)."""
    perm = find_permanent(exc)
    if perm is not None:
        return str(perm)
    chain = causes(exc)
    root = next((e for e in reversed(chain) if not type(e).__module__.startswith("ray.")), chain[-1])
    text = str(root).strip().splitlines()
    body = " ".join(line.strip() for line in text[:6]) or repr(root)
    return f"{type(root).__name__}: {body} (full traceback in the Ray logs above)"
