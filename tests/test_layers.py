"""The three layers of DESIGN §1, imports pointing one way: maths <- engine <- Ray glue.

maths  (model, objective(s), sampler, ema, optim; config, batch_layout, overrides, presets): neither ray nor mlflow, nor the engine
engine (train_step, checkpoint, distributed, fid, evaluation, storage, shards, teacher, official): no ray, no
       mlflow
glue   (everything else: data, worker, launch, tune, tracking, jobs, ...): only tracking.py imports mlflow

Checked twice: an AST scan of every import statement (also the lazy ones inside functions, which a
plain import never runs), and a fresh interpreter that imports each layer and looks at sys.modules
(which also catches what a dependency pulls in transitively).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATHS = {"model", "objective", "objectives", "sampler", "ema", "optim", "config", "batch_layout", "overrides", "presets"}
ENGINE = {"train_step", "checkpoint", "distributed", "fid", "evaluation", "storage", "shards", "teacher", "official"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package and the jobs."""
    files = sorted((ROOT / "shortcut_ray").rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py"))
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _layer(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "shortcut_ray" or len(parts) == 1:
        return "glue"
    return "maths" if parts[1] in MATHS else "engine" if parts[1] in ENGINE else "glue"


def _imports(name: str, path: Path) -> set[str]:
    """Absolute dotted names of everything `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from . import storage`
    return out


def _top(imports: set[str]) -> set[str]:
    return {i.split(".")[0] for i in imports}


MODULES = _modules()
MODULES_TOP = {n.split(".")[1] for n in MODULES if n.startswith("shortcut_ray.")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_one_way(name):
    imports = _imports(name, MODULES[name])
    layer = _layer(name)
    if name != "shortcut_ray.tracking":
        assert "mlflow" not in _top(imports), f"{name} imports mlflow: only shortcut_ray/tracking.py may"
    if layer in ("maths", "engine"):
        assert "ray" not in _top(imports), f"{name} ({layer} layer) imports ray; move that code to the glue"
    if layer == "maths":
        ours = {i for i in imports if i.startswith("shortcut_ray.") and i.split(".")[1] in MODULES_TOP}
        bad = {i for i in ours if _layer(i) != "maths"}
        assert not bad, f"{name} (maths layer) imports {sorted(bad)} from a higher layer"



@pytest.mark.parametrize("layer,forbidden", [("maths", ("ray", "mlflow")), ("engine", ("ray", "mlflow"))])
def test_importing_a_layer_loads_neither_ray_nor_mlflow(layer, forbidden):
    names = [n for n in MODULES if _layer(n) == layer]
    code = (f"import sys; import {', '.join(names)}; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_scan_sees_lazy_imports(tmp_path):
    """The AST scan would catch an import hidden inside a function (a plain import test would not)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.train\n    from .tracking import MlflowTracker\n")
    assert _imports("shortcut_ray.m", f) >= {"ray.train", "shortcut_ray.tracking", "shortcut_ray.tracking.MlflowTracker"}
