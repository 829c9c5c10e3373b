"""The paper's comparison (ALGORITHM §6.7, §7.2) as one resumable protocol: every method, one table.

Order (an equal training budget per method: the base config's model, batch, steps, optimiser, EMA):
flow matching (also the teacher); shortcut, consistency training, live reflow and diffusion from
scratch; progressive and consistency distillation from the flow-matching checkpoint; (noise, sample)
pairs from the teacher (pairs.generate) and two-stage reflow on them. Each method trains through
launch.fit (Ray Train) as a child MLflow run of one parent run; the runs go one after another, or with
parallel=True as many at a time as the cluster fits: the five from scratch at once, then the three that
need the teacher (or its pairs) at once.

Evaluation is identical for every method and runs here on the driver from each final checkpoint
(compare_eval.py): the same samples, noise, N and reference, each method with its own sampler rule
(recorded), and the real-vs-real floor at that sample count. FD (pixel space) always; FID as well when
eval.fid_weights is set. With --tune a grid sweep of shortcut at the same budget adds a tuned row.

State: <out>/state.json lists the finished stages; with resume=True a stage listed there whose files
exist is skipped, so a crash or Ctrl-C continues where it stopped (a half-trained method resumes from
its latest Ray Train checkpoint: same storage path and run name). A resume with reevaluate=True whose
config differs only in eval.* keeps the trained methods and redoes the evaluation (compare_eval.supersede);
any other difference is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

from .compare_eval import evaluate_into, finish_supersede, floor, supersede
from .config import Config, ConfigError, apply_overrides

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "end-to-end" or "2-stage" (the paper's "type" column)
    label: str
    teacher: bool = False  # starts from / distils the flow-matching checkpoint
    pairs: bool = False  # trains on the teacher's (noise, sample) pairs


METHODS = (  # training order: the teacher first, then from scratch, then what needs the teacher
    Method("flow_matching", "end-to-end", "Flow matching"),
    Method("shortcut", "end-to-end", "Shortcut models"),
    Method("consistency", "end-to-end", "Consistency training"),
    Method("live_reflow", "end-to-end", "Live reflow"),
    Method("diffusion", "end-to-end", "Diffusion"),
    Method("progressive", "2-stage", "Progressive distillation", teacher=True),
    Method("consistency_distillation", "2-stage", "Consistency distillation", teacher=True),
    Method("reflow", "2-stage", "Reflow", pairs=True),
)
TUNED = Method("shortcut_tuned", "end-to-end", "Shortcut models, tuned")
"""With --tune: shortcut at the same budget, objective.bootstrap_every and ema.decay chosen by a Tune
sweep (tune.run_sweep, grid, FIFO) on an in-loop metric with other noise and another reference sample."""
TABLE_ORDER = ("diffusion", "flow_matching", "progressive", "consistency_distillation", "reflow",
               "consistency", "live_reflow", "shortcut", "shortcut_tuned")  # the paper's row order (§7.2)


@dataclass(frozen=True)
class Protocol:
    """What the comparison adds to a preset: pair generation and the sample strip."""

    pairs: int = 2048
    pair_steps: int = 128  # teacher Euler steps per pair (ALGORITHM §6.6 default: 128, EMA weights)
    strip: int = 6  # images per method and N in the sample-strip picture
    tune_space: tuple = ()
    """--tune: the grid (tune_space.parse_space syntax; every point trains the full budget); empty: the
    project's default sweep space for the budget (tune_space.default_space: the bootstrap_every values
    that give every level a row x the EMA decays whose horizon is at most max_steps/4), as a grid."""
    tune_n: int = 1  # --tune selects on eval/<fd_pixel or fid>/N<tune_n> (the project's sweep default: N=1)


PROTOCOLS = {"compare_digits_tiny": Protocol(pairs=128, pair_steps=8, strip=4,
                                             tune_space=("objective.bootstrap_every=grid(4,8)",)),
             "fashion_mnist_16px": Protocol(pairs=2048, pair_steps=32, strip=6)}


# -- state --------------------------------------------------------------------------------------------

def read_state(out: str) -> dict:
    path = os.path.join(out, STATE_FILE)
    if not os.path.exists(path):
        return {"done": {}}
    with open(path) as f:
        return json.load(f)


def write_state(out: str, state: dict) -> None:
    from .storage import atomic_write

    atomic_write(os.path.join(out, STATE_FILE), json.dumps(state, indent=1, sort_keys=True))


def is_done(state: dict, stage: str) -> bool:
    """Recorded as done and every file it recorded still exists."""
    rec = state["done"].get(stage)
    return rec is not None and all(os.path.exists(p) for p in rec.get("files", []))


def mark_done(out: str, state: dict, stage: str, files: list[str], **info) -> None:
    state["done"][stage] = {"files": files, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    write_state(out, state)


# -- configs ------------------------------------------------------------------------------------------

def method_sets(method: Method, out: str, name: str, parent_id: str, teacher: str = "", pairs: str = "") -> list[str]:
    """The --set overrides that turn the base config into this method's run (also its jobs.train command)."""
    sets = [f"objective.train_type={method.name}", f"train.storage_path={os.path.join(out, 'runs')}",
            f"train.run_name={method.name}", f"tracking.run_name={name}-{method.name}",
            f"tracking.parent_run_id={parent_id}", f"tracking.tags=compare={name},compare.method={method.name}"]
    if method.teacher:
        sets.append(f"objective.teacher_checkpoint={teacher}")
    if method.pairs:
        sets += ["data.source=parquet", f"data.uri={pairs}", "data.random_flip=false"]
    return sets


def train_command(preset: str, base_sets: list[str], sets: list[str]) -> str:
    args = [sys.executable, "-m", "jobs.train", "--preset", preset]
    for kv in [*base_sets, *sets]:
        args += ["--set", kv]
    return shlex.join(args)


def final_checkpoint(out: str, method: Method, max_steps: int) -> str:
    from .checkpoint import dir_name

    return os.path.join(out, "runs", method.name, dir_name(max_steps))


def train_method(base: Config, method: Method, sets: list[str], out: str, log=print) -> str:
    """Train (or resume) one method through launch.fit; returns its final checkpoint directory."""
    from .checkpoint import is_complete
    from .launch import fit, resolve_runtime
    from .tune import ensure_ray

    ensure_ray()  # RAY_ADDRESS, else a local Ray whose API address its processes know (see tune.init_local_ray)
    cfg = resolve_runtime(apply_overrides(base, sets))
    log(f"[compare] training {method.name} ({cfg.train.max_steps} steps)")
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"training {method.name} failed: {result.error}; rerun with --resume to continue")
    path = final_checkpoint(out, method, cfg.train.max_steps)
    if not is_complete(path):
        raise RuntimeError(f"{method.name} finished without a final checkpoint at {path}")
    return path


def _sets(method: Method, out: str, state: dict, pairs: str = "") -> list[str]:
    """`method_sets` of this comparison: its name and parent run, the flow-matching checkpoint once trained."""
    teacher = state["done"].get("train:flow_matching", {}).get("checkpoint", "")
    return method_sets(method, out, state["name"], state.get("parent_run_id", ""), teacher, pairs)


def _mark_trained(out: str, state: dict, method: Method, ckpt: str, sets: list[str], **info) -> None:
    mark_done(out, state, f"train:{method.name}", [ckpt], checkpoint=ckpt,
              command=train_command(state["preset"], state["sets"], sets), **info)


def train_parallel(base: Config, methods: tuple[Method, ...], out: str, state: dict, pairs: str = "",
                   log=print) -> None:
    """--parallel: train the methods not done yet at once, each `train_method` in a Ray task (as a Tune trial
    driver runs: no CPU of its own), as many at a time as the cluster fits next to Ray Data
    (tune_space.max_concurrent_trials). Each is marked done as it lands; a failure lets the others finish,
    then raises (--resume continues the failed one from its latest checkpoint)."""
    import ray

    from .tune import driver_resources, ensure_ray
    from .tune_space import max_concurrent_trials

    todo = [m for m in methods if not is_done(state, f"train:{m.name}")]
    if not todo:
        return
    ensure_ray()
    res = driver_resources()
    try:
        width = max_concurrent_trials(ray.cluster_resources(), base.train, 1.0, res.get("CPU", 0.0))
    except ConfigError:  # nothing fits the cluster as it is now (an autoscaler may add nodes): one at a time
        width = 1
    task = ray.remote(train_method).options(num_cpus=res.pop("CPU", 0.0), resources=res, max_retries=0)
    log(f"[compare] training {', '.join(m.name for m in todo)}: {min(width, len(todo))} at a time")
    running, errors = {}, []
    while todo or running:
        while todo and len(running) < width:
            m = todo.pop(0)
            sets = _sets(m, out, state, pairs if m.pairs else "")
            running[task.remote(base, m, sets, out)] = (m, sets, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        [ref], _ = ray.wait(list(running), num_returns=1)
        m, sets, started = running.pop(ref)
        try:
            ckpt = ray.get(ref)
        except Exception as e:  # the others go on; this one resumes with --resume
            errors.append(f"{m.name}: {e}")
            todo = []  # start nothing new after a failure
            continue
        _mark_trained(out, state, m, ckpt, sets, started=started)
        log(f"[compare] {m.name} trained: {ckpt}")
    if errors:
        raise RuntimeError("training failed: " + "; ".join(errors) + "; rerun with --resume to continue")


# -- the protocol -------------------------------------------------------------------------------------

def _parent(base: Config, state: dict):
    """The parent MLflow run (reopened on resume); (tracker or None, run id or "")."""
    if not base.tracking.enabled:
        return None, ""
    from .tracking import MlflowTracker

    tracker = MlflowTracker(base.tracking.tracking_uri, base.tracking.experiment)
    run_id = tracker.start(state["name"], {"compare": state["name"], "compare.role": "parent",
                                           "compare.preset": state["preset"]}, state.get("parent_run_id"))
    if run_id != state.get("parent_run_id"):
        tracker.log_params({**base.flat(), **{f"protocol.{k}": v for k, v in state["protocol"].items()}})
    return tracker, run_id


def _pairs(out: str, state: dict, protocol: Protocol, log) -> str:
    from .pairs import PairPlan, generate

    teacher = state["done"]["train:flow_matching"]["checkpoint"]
    path = os.path.join(out, "pairs")
    if not is_done(state, "pairs"):
        plan = PairPlan(teacher=teacher, count=protocol.pairs, steps=protocol.pair_steps, weights="ema")
        use_ray = bool(os.environ.get("RAY_ADDRESS"))  # on a cluster: Ray Data actors; else in-process
        log(f"[compare] {protocol.pairs} pairs from {teacher} ({protocol.pair_steps} Euler steps, EMA weights)")
        generate(plan, path, use_ray=use_ray, log=log)
        cmd = shlex.join([sys.executable, "-m", "jobs.generate_pairs", "--teacher", teacher, "--output", path,
                          "--count", str(protocol.pairs), "--steps", str(protocol.pair_steps), "--weights", "ema"]
                         + ([] if use_ray else ["--local"]))
        mark_done(out, state, "pairs", [os.path.join(path, "manifest.json")], command=cmd)
    return path


def _method(base: Config, method: Method, out: str, state: dict, protocol: Protocol, log) -> None:
    stage = f"train:{method.name}"
    sets = _sets(method, out, state, _pairs(out, state, protocol, log) if method.pairs else "")
    if not is_done(state, stage):
        _mark_trained(out, state, method, train_method(base, method, sets, out, log), sets)
    if not is_done(state, f"eval:{method.name}"):
        log(f"[compare] evaluating {method.name} at N = {list(base.eval.fid_steps)}")
        files = evaluate_into(base, method, state["done"][stage]["checkpoint"], out, protocol.strip)
        mark_done(out, state, f"eval:{method.name}", files)


def tune_base(base: Config, out: str, state: dict, protocol: Protocol) -> tuple[Config, list[str], str]:
    """The sweep's base config, the --set list that makes it and the selection metric: shortcut at the
    comparison's budget, one in-loop evaluation at the last step at N = tune_n with eval.seed + 1 (other
    noise than the table's) against the images the trial trained on first (not the table's reference)."""
    metric = f"eval/{'fid' if base.eval.fid_weights else 'fd_pixel'}/N{protocol.tune_n}"
    sets = ["objective.train_type=shortcut", f"train.storage_path={os.path.join(out, 'runs')}",
            f"train.eval_every={base.train.max_steps}", f"eval.fid_steps=[{protocol.tune_n}]",
            f"eval.seed={base.eval.seed + 1}", "eval.diagnostics=false",
            f"tracking.tags=compare={state['name']},compare.method={TUNED.name}"]
    return apply_overrides(base, sets), sets, metric


def _tuned(base: Config, out: str, state: dict, protocol: Protocol, log) -> None:
    """--tune: a grid sweep of shortcut at the same budget; the best trial's final checkpoint is
    evaluated exactly like every other method and labelled with the settings that won."""
    stage = f"tune:{TUNED.name}"
    if not is_done(state, stage):
        from .tune import run_sweep
        from .tune_space import default_space, parse_space

        cfg, sets, metric = tune_base(base, out, state, protocol)
        space = parse_space(protocol.tune_space, cfg) if protocol.tune_space else default_space(cfg)
        name = f"{state['name']}-tune"
        log("[compare] tuning shortcut: grid " + ", ".join(f"{k}={d.spec()}" for k, d in space.items())
            + f" on {metric}, {cfg.train.max_steps} steps per trial")
        res = run_sweep(cfg, name=name, space=space, num_samples=1, scheduler="fifo", search="grid",
                        metric=metric, resume=True, log=log)
        if not res.finished or not res.best_checkpoint:
            raise RuntimeError(f"the tuning sweep {name} did not finish (or no trial reported {metric}); "
                               f"rerun with --resume to continue it")
        won = {k: res.best_config.flat()[k] for k in space}
        trials = [{"params": t["params"], metric: t.get(metric), "status": t["status"]} for t in res.trials]
        cmd = shlex.join([sys.executable, "-m", "jobs.sweep", "--preset", state["preset"], "--name", name,
                          "--scheduler", "fifo", "--search", "grid", "--metric", metric]
                         + [a for kv in [*state["sets"], *sets] for a in ("--set", kv)]
                         + [a for k, d in space.items() for a in ("--space", f"{k}={dataclasses.replace(d, kind='grid').spec()}")])
        mark_done(out, state, stage, [], checkpoint=res.best_checkpoint, won=won, trials=trials,
                  metric=metric, sweep=res.path, command=cmd)
    if not is_done(state, f"eval:{TUNED.name}"):
        rec = state["done"][stage]
        label = TUNED.label + " (" + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in rec["won"].items()) + ")"
        log(f"[compare] evaluating {label} at N = {list(base.eval.fid_steps)}")
        files = evaluate_into(base, dataclasses.replace(TUNED, label=label), rec["checkpoint"], out, protocol.strip,
                               tuned={"won": rec["won"], "selection_metric": rec["metric"], "trials": rec["trials"]})
        mark_done(out, state, f"eval:{TUNED.name}", files)


def _floor(base: Config, out: str, state: dict, log) -> None:
    if is_done(state, "floor"):
        return
    log(f"[compare] real-vs-real floor at {base.eval.fid_samples} samples")
    path = os.path.join(out, "eval", "floor.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(floor(base), f, indent=1)
    mark_done(out, state, "floor", [path])


def _check_change(out: str, state: dict, preset: str, new: dict, reevaluate: bool) -> None:
    """A resume with another config: refused, except eval.* with reevaluate once every method is trained."""
    old = state["config"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed != ["eval"] or state.get("preset") != preset:
        raise ConfigError(f"{out} was started with another config (preset {state.get('preset')}, --set "
                          f"{state.get('sets')}; now {', '.join(changed)} differ): resume it with the same "
                          f"arguments, or choose another --output (only eval.* may change, with --reevaluate)")
    diff = ", ".join(f"eval.{k}: {old['eval'].get(k)!r} -> {v!r}" for k, v in sorted(new["eval"].items())
                     if old["eval"].get(k) != v)
    if not reevaluate:
        raise ConfigError(f"{out} was evaluated with other settings ({diff}): resume with the --set it was started "
                          f"with (state.json 'sets': {state.get('sets')}), or add --reevaluate to evaluate every "
                          f"trained method again with these")
    stages = [f"train:{m.name}" for m in METHODS] + ([f"tune:{TUNED.name}"] if state.get("tune") else [])
    unfinished = [st.split(":", 1)[1] for st in stages if not is_done(state, st)]
    if unfinished:
        raise ConfigError(f"--reevaluate needs every method trained; {', '.join(unfinished)} not yet: finish the "
                          f"comparison first (--resume with the --set it was started with: {state.get('sets')})")


def _start(preset: str, base_sets: list[str], out: str, resume: bool, argv: list[str],
           log=print, reevaluate: bool = False) -> tuple[Config, dict]:
    from .launch import resolve_runtime
    from .presets import get_preset

    base = resolve_runtime(apply_overrides(get_preset(preset), base_sets))
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, run_name=""))  # per method
    os.makedirs(out, exist_ok=True)
    state = read_state(out)
    if state["done"] and not resume:
        raise ConfigError(f"{out} already holds a comparison ({len(state['done'])} stage(s) done); pass --resume "
                          f"to continue it, or choose another --output")
    finish_supersede(out, state, write_state)  # a --reevaluate cut short between recording and moving
    new = json.loads(base.to_json())
    if state.get("config") and state["config"] != new:
        _check_change(out, state, preset, new, reevaluate)
        supersede(out, state, new, shlex.join([sys.executable, "-m", "jobs.compare", *argv]), write_state, log)
    protocol = PROTOCOLS.get(preset, Protocol())
    before = json.dumps(state, sort_keys=True)
    state.update(config=json.loads(base.to_json()), preset=preset, sets=list(base_sets), protocol=dataclasses.asdict(protocol),
                 name=state.get("name") or f"compare-{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                 command=state.get("command") or shlex.join([sys.executable, "-m", "jobs.compare", *argv]))
    if json.dumps(state, sort_keys=True) != before:  # a finished comparison is left untouched
        write_state(out, state)
    return base, state


def run_compare(preset: str, base_sets: list[str], out: str, resume: bool = False, argv: list[str] = (),
                log=print, tune: bool = False, parallel: bool = False, reevaluate: bool = False) -> dict:
    """Run (or finish) the comparison in `out`; returns the results dict (also <out>/results.json).
    tune: add the tuned shortcut row (a finished comparison resumed with tune=True gains it).
    reevaluate: a trained comparison resumed with other eval.* settings is evaluated again (else refused).
    parallel: train independent methods at once (`train_parallel`); the evaluation is the same."""
    from .compare_report import write_report

    out = os.path.abspath(out)
    base, state = _start(preset, list(base_sets), out, resume or reevaluate, list(argv), log, reevaluate)
    protocol = Protocol(**{**state["protocol"], "tune_space": tuple(state["protocol"]["tune_space"])})
    if tune and not state.get("tune"):
        state["tune"] = True
        state["done"].pop("report", None)  # the table gains a row
        write_state(out, state)
    methods = METHODS + ((TUNED,) if state.get("tune") else ())
    if is_done(state, "report"):
        log(f"[compare] {out}: every stage is done; nothing to do")
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)
    tracker, parent_id = _parent(base, state)
    state["parent_run_id"] = parent_id
    write_state(out, state)
    if tracker:  # the parent's params keep the first evaluation's settings; later ones are tagged
        tracker.set_tags({f"compare.evaluation.{i + 1}": json.dumps(e["changed"])
                          for i, e in enumerate(state.get("evaluations", []))})
    try:
        if parallel:  # from scratch at once; then what needs the teacher or its pairs, at once
            train_parallel(base, tuple(m for m in METHODS if not (m.teacher or m.pairs)), out, state, log=log)
            pairs = _pairs(out, state, protocol, log) if any(m.pairs for m in METHODS) else ""
            train_parallel(base, tuple(m for m in METHODS if m.teacher or m.pairs), out, state, pairs, log)
        for method in METHODS:
            _method(base, method, out, state, protocol, log)
        if state.get("tune"):
            _tuned(base, out, state, protocol, log)
        _floor(base, out, state, log)
        results, files = write_report(out, state, methods, TABLE_ORDER)  # rows of methods that ran
        if tracker:
            tracker.log_metrics({f"{m}/{k}": v for m, r in results["methods"].items()
                                 for k, v in r["metrics"].items()}, base.train.max_steps)
            for path in files:
                tracker.client.log_artifact(parent_id, path)
        mark_done(out, state, "report", files)
    except KeyboardInterrupt:
        tracker and tracker.end("KILLED")
        raise
    except BaseException:
        tracker and tracker.end("FAILED")
        raise
    tracker and tracker.end("FINISHED")
    log(f"[compare] done: {os.path.join(out, 'results.md')}")
    return results
