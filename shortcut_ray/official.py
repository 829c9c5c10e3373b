"""The authors' JAX checkpoints (kvfrans/shortcut-models, commit 6010043) as ShortcutDiT weights.

An official checkpoint is one pickle written by train.py (`Checkpoint.save`, see
tests/data/official/README.md): {'train_state': {'params', 'params_ema', 'opt_state', 'step'},
'_timestamp'}, with nested dicts of float32 numpy arrays and optax NamedTuples. It carries no config,
so the shape is inferred from the parameter tree and the rest (heads, image size, train type,
conditioning) comes from a named recipe or flags.

    train_state, info = read_checkpoint("gs://bucket/celeba-dit-b/ckpt")    # no code from the file runs
    cfg = import_config(infer_shape(train_state["params"]), recipe="celebahq256_dit_b")
    model, ema, report = build_imported(cfg, train_state)                  # online and EMA weights

Safety: plain `pickle.load` runs whatever the file names. `read_checkpoint` uses a restricted
unpickler that resolves only the globals the format contains (numpy array/dtype reconstruction, the
three optax state records as plain namedtuples, and, for other JAX versions, jax arrays and flax
FrozenDicts rebuilt as numpy arrays / dicts without importing jax or flax); any other global is
refused before anything is called. Library layer: numpy, torch, fsspec only (no ray, no mlflow).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError, ModelConfig, override, parse_overrides
from .objectives.registry import ALIASES


class OfficialFormatError(ValueError):
    """The file is not an official checkpoint this importer can read; the message says why."""


# -- restricted unpickling -------------------------------------------------------------------------

def _frozen_dict(*args, **kwargs) -> dict:
    """flax.core.frozen_dict.FrozenDict(mapping) -> a plain dict."""
    return dict(*args, **kwargs)


def _reconstruct_jax_array(fun, args, arr_state, aval_state) -> np.ndarray:
    """jax._src.array._reconstruct_array: the value is fun(*args).__setstate__(arr_state), an ndarray."""
    if fun is not _multiarray()._reconstruct:
        raise OfficialFormatError(f"a pickled jax Array names {fun!r} as its constructor, expected numpy's "
                                  f"_reconstruct")
    arr = fun(*args)
    if not isinstance(arr, np.ndarray):
        raise OfficialFormatError(f"a pickled jax Array rebuilt as {type(arr).__name__}, expected a numpy array")
    arr.__setstate__(arr_state)
    return arr


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol-2 pickles use it for bytes; nothing but latin1 text -> bytes."""
    if encoding != "latin1" or not isinstance(text, str):
        raise OfficialFormatError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object returned for it. Nothing else can be named by the file."""
    multiarray = _multiarray()
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # optax state records (fields as in optax 0.1.x), rebuilt as plain namedtuples by NEWOBJ.
    records = {("optax._src.transform", "ScaleByAdamState"): "count mu nu",
               ("optax._src.base", "EmptyState"): "",
               ("optax._src.transform", "ScaleByScheduleState"): "count"}
    for (mod, name), fields in records.items():
        allowed[(mod, name)] = collections.namedtuple(name, fields)
    allowed[("jax._src.array", "_reconstruct_array")] = _reconstruct_jax_array
    allowed[("flax.core.frozen_dict", "FrozenDict")] = _frozen_dict
    allowed[("_codecs", "encode")] = _latin1
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise OfficialFormatError(
                f"refusing to load {module}.{name} from {self.source}: an official shortcut-models checkpoint "
                f"contains only numpy arrays/dtypes, optax state records, jax Arrays and flax FrozenDicts. "
                f"The file is not an official checkpoint or was tampered with; nothing in it was run.") from None


def unpickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` with the restricted unpickler (OfficialFormatError on any other global)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except OfficialFormatError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as e:
        raise OfficialFormatError(
            f"{source} ({len(data):,} bytes) is not a complete pickle: {type(e).__name__}: {e}. The file is "
            f"truncated or not an official checkpoint; download it again and compare its size") from e


def _resolve_file(fs, path: str) -> str:
    """train.py's local save is a directory <name>/ holding <name>.tmp; accept it or the file."""
    if not fs.isdir(path):
        return path
    base = path.rstrip("/").rsplit("/", 1)[-1]
    files = [f for f in fs.ls(path, detail=False) if fs.isfile(f)]
    named = [f for f in files if f.rstrip("/").rsplit("/", 1)[-1] == f"{base}.tmp"]
    if named or len(files) == 1:
        return (named or files)[0]
    raise OfficialFormatError(f"{path} is a directory without {base}.tmp or a single file; pass the pickle itself")


def read_checkpoint(uri: str) -> tuple[dict, dict]:
    """(train_state, file info {uri, file, bytes, sha256}) of an official checkpoint (path or fsspec URI)."""
    import hashlib

    from .storage import filesystem

    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no official checkpoint at {uri}")
    path = _resolve_file(fs, path)
    with fs.open(path, "rb") as f:
        data = f.read()
    obj = unpickle(data, uri)
    state = obj.get("train_state") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise OfficialFormatError(f"{uri} has no train_state['params'] (top level: {keys}); it is not a "
                                  f"checkpoint written by the official train.py")
    return state, {"uri": uri, "file": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'DiTBlock_0/Dense_0/kernel': leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


# -- the parameter tree --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TreeShape:
    """What the parameter tree fixes: everything but heads, image size and the train type."""

    hidden: int
    depth: int
    patch: int
    channels: int
    mlp_hidden: int
    num_classes: int

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.hidden


def param_table(s: TreeShape) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """THE official -> ours name mapping: (official path, our state-dict key, kind, official shape).

    kind: 'linear' (flax kernel (in, out) -> torch weight (out, in)), 'bias', 'conv' (HWIO -> OIHW),
    'embed' (as is). Keys are ShortcutDiT's current names; load_state_dict applies any key-conversion
    hooks the model defines. Official attention order is Dense_1 = k, Dense_2 = q, Dense_3 = v.
    """
    h, p, c = s.hidden, s.patch, s.channels
    rows: list[tuple[str, str, str, tuple[int, ...]]] = []

    def dense(official: str, ours: str, n_in: int, n_out: int) -> None:
        rows.append((f"{official}/kernel", f"{ours}.weight", "linear", (n_in, n_out)))
        rows.append((f"{official}/bias", f"{ours}.bias", "bias", (n_out,)))

    rows.append(("PatchEmbed_0/Conv_0/kernel", "x_embed.weight", "conv", (p, p, c, h)))
    rows.append(("PatchEmbed_0/Conv_0/bias", "x_embed.bias", "bias", (h,)))
    for i, ours in ((0, "t_embed"), (1, "k_embed")):
        dense(f"TimestepEmbedder_{i}/Dense_0", f"{ours}.mlp.0", 256, h)
        dense(f"TimestepEmbedder_{i}/Dense_1", f"{ours}.mlp.2", h, h)
    rows.append(("LabelEmbedder_0/Embed_0/embedding", "y_embed.weight", "embed", (s.num_classes + 1, h)))
    for b in range(s.depth):
        blk = f"DiTBlock_{b}"
        dense(f"{blk}/Dense_0", f"blocks.{b}.adaLN.1", h, 6 * h)
        for j, name in ((1, "k"), (2, "q"), (3, "v"), (4, "proj")):
            dense(f"{blk}/Dense_{j}", f"blocks.{b}.attn.{name}", h, h)
        dense(f"{blk}/MlpBlock_0/Dense_0", f"blocks.{b}.mlp.0", h, s.mlp_hidden)
        dense(f"{blk}/MlpBlock_0/Dense_1", f"blocks.{b}.mlp.2", s.mlp_hidden, h)
    dense("FinalLayer_0/Dense_0", "final.adaLN.1", h, 2 * h)
    dense("FinalLayer_0/Dense_1", "final.linear", h, p * p * c)
    return rows


# The official logvar head (ALGORITHM §1.1 item 7): computed, never used in a loss; not ported.
IGNORED = ("Embed_0/embedding",)


def _shape_of(flat: dict, path: str) -> tuple[int, ...]:
    if path not in flat:
        raise OfficialFormatError(f"the parameter tree has no {path}, which every official DiT has; "
                                  f"this is not an official shortcut-models DiT checkpoint")
    return tuple(np.shape(flat[path]))


def infer_shape(params: dict) -> TreeShape:
    """Hidden size, depth, patch, channels, MLP width and classes from the tree (ALGORITHM §1)."""
    flat = flatten(params)
    p, p2, c, h = _shape_of(flat, "PatchEmbed_0/Conv_0/kernel")
    depth = 0
    while f"DiTBlock_{depth}/Dense_0/kernel" in flat:
        depth += 1
    if depth == 0 or p != p2:
        raise OfficialFormatError(f"cannot read a DiT from this tree (patch kernel {(p, p2, c, h)}, {depth} "
                                  f"DiTBlock_i/Dense_0/kernel entries)")
    mlp_hidden = _shape_of(flat, "DiTBlock_0/MlpBlock_0/Dense_0/kernel")[1]
    rows = _shape_of(flat, "LabelEmbedder_0/Embed_0/embedding")[0]
    return TreeShape(hidden=h, depth=depth, patch=p, channels=c, mlp_hidden=mlp_hidden, num_classes=rows - 1)


def check_tree(params: dict, shape: TreeShape, what: str = "params") -> None:
    """Refuse a tree that does not match the model, naming the first mismatched parameter."""
    flat = flatten(params)
    table = param_table(shape)
    for official, ours, _, want in table:
        if official not in flat:
            raise OfficialFormatError(f"{what}: missing {official} (-> {ours}), expected shape {want}")
        got = tuple(np.shape(flat[official]))
        if got != want:
            raise OfficialFormatError(f"{what}: {official} (-> {ours}) expected shape {want}, got shape {got}")
        dtype = getattr(flat[official], "dtype", None)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            raise OfficialFormatError(f"{what}: {official} has dtype {dtype}, expected floating point")
    extra = sorted(set(flat) - {row[0] for row in table} - set(IGNORED))
    if extra:
        raise OfficialFormatError(f"{what}: {extra[0]} (shape {tuple(np.shape(flat[extra[0]]))}) has no place in "
                                  f"a depth-{shape.depth} ShortcutDiT ({len(extra)} unexpected entries)")


def state_dict_from_tree(params: dict, shape: TreeShape) -> dict[str, torch.Tensor]:
    """Our state dict (current key names, fp32) from an official `params` / `params_ema` tree."""
    flat = flatten(params)
    out = {}
    for official, ours, kind, _ in param_table(shape):
        arr = np.asarray(flat[official], dtype=np.float32)
        if kind == "linear":
            arr = arr.T
        elif kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
        out[ours] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


# -- config: the shape from the tree, the rest from a recipe or flags --------------------------------

TRAIN_TYPES = dict(ALIASES)  # official --model.train_type -> ours (others keep their name): the registry's aliases


def _tiny(train_type: str, num_classes: int, conditional: bool) -> Config:
    """The tiny fixtures of tests/data/official: hidden 64, depth 2, 4 heads, patch 2, 8x8x4 inputs."""
    from .presets import get_preset

    return override(get_preset("debug_cpu"), {
        "model.num_heads": 4, "data.image_size": 8, "data.channels": 4, "data.num_classes": num_classes,
        "objective.train_type": train_type, "objective.class_conditional": conditional,
        "eval.sample_steps": (1, 2, 4, 128), "eval.cfg_scale": 1.0 if conditional else 0.0})


def _preset(name: str):
    def make() -> Config:
        from .presets import get_preset

        return get_preset(name)
    return make


# Recipes: what the tree cannot tell (heads, image size, train type, conditioning, data, eval).
RECIPES = {
    "celebahq256_dit_b": _preset("celebahq256_dit_b"),    # README: CelebA-HQ 256, unconditional
    "imagenet256_dit_b": _preset("imagenet256_dit_b"),    # README: ImageNet 256, class-conditional
    "imagenet256_dit_xl": _preset("imagenet256_dit_xl"),
    "tiny_official": lambda: _tiny("shortcut", 10, True),
    "tiny_official_naive": lambda: _tiny("flow_matching", 1, False),
}


def _recipe(name: str, shape: TreeShape) -> Config:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)} or pass --heads, "
                          f"--image-size and --train-type")
    base = RECIPES[name]()
    have = {"model.hidden_size": base.model.hidden_size, "model.depth": base.model.depth,
            "model.patch_size": base.model.patch_size, "model.mlp_ratio": base.model.mlp_ratio,
            "data.channels": base.data.channels, "data.num_classes": base.data.num_classes}
    for key, tree_value in _tree_fields(shape).items():
        if have[key] != tree_value:
            raise ConfigError(f"recipe {name!r} has {key}={have[key]} but the checkpoint's tree has {tree_value}; "
                              f"pick the recipe of this checkpoint or no recipe (then give --heads, "
                              f"--image-size, --train-type)")
    return base


def _tree_fields(shape: TreeShape) -> dict[str, float]:
    return {"model.hidden_size": shape.hidden, "model.depth": shape.depth, "model.patch_size": shape.patch,
            "model.mlp_ratio": shape.mlp_ratio, "data.channels": shape.channels,
            "data.num_classes": shape.num_classes}


def import_config(shape: TreeShape, recipe: str = "", *, heads: int = 0, image_size: int = 0,
                  train_type: str = "", class_conditional: bool | None = None,
                  overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The Config of an imported model: the tree's shape + a recipe's (or the flags') other choices.

    Flags win over the recipe; `overrides` (`section.key=value`) are applied last but may not
    change what the tree fixed.
    """
    base = _recipe(recipe, shape) if recipe else None
    heads = heads or (base.model.num_heads if base else 0)
    image_size = image_size or (base.data.image_size if base else 0)
    train_type = TRAIN_TYPES.get(train_type, train_type) or (base.objective.train_type if base else "")
    missing = [flag for flag, v in (("--heads", heads), ("--image-size", image_size),
                                    ("--train-type", train_type)) if not v]
    if missing:
        raise ConfigError(f"the parameter tree does not say {', '.join(missing)}; pass them or a --recipe "
                          f"({', '.join(sorted(RECIPES))})")
    if int(shape.hidden * shape.mlp_ratio) != shape.mlp_hidden:
        raise OfficialFormatError(f"MLP width {shape.mlp_hidden} is not a ratio of hidden size {shape.hidden}")
    if class_conditional is None:
        class_conditional = base.objective.class_conditional if base else shape.num_classes > 1
    base = base or Config(preset="official_import")
    model = ModelConfig(hidden_size=shape.hidden, depth=shape.depth, num_heads=heads, patch_size=shape.patch,
                        mlp_ratio=shape.mlp_ratio)
    cfg = override(base, {
        **{f"model.{k}": v for k, v in dataclasses.asdict(model).items()},
        "data.image_size": image_size, "data.channels": shape.channels, "data.num_classes": shape.num_classes,
        "objective.train_type": train_type, "objective.class_conditional": class_conditional,
        "objective.bootstrap_cfg": base.objective.bootstrap_cfg and class_conditional,
        **parse_overrides(overrides)})  # the flags' `section.key=value` last
    flat = cfg.flat()
    for key, tree_value in _tree_fields(shape).items():
        if flat[key] != tree_value:
            raise ConfigError(f"--set {key}={flat[key]} contradicts the checkpoint's tree ({tree_value})")
    return cfg


# -- weights into ShortcutDiT ----------------------------------------------------------------------

def load_tree(model: torch.nn.Module, params: dict, shape: TreeShape, what: str) -> int:
    """Check `params` against the model's tree and load it (strict); returns the number of values."""
    check_tree(params, shape, what)
    sd = state_dict_from_tree(params, shape)
    model.load_state_dict(sd, strict=True)  # strict: any key the table misses is an error, not a default
    return sum(t.numel() for t in sd.values())


def build_imported(cfg: Config, train_state: dict) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(online model, EMA model, report) from an official train_state, for a Config from import_config."""
    from .model import build_model
    from .objectives import objective_class

    shape = infer_shape(train_state["params"])
    if not isinstance(train_state.get("params_ema"), dict):
        raise OfficialFormatError("train_state has no params_ema tree; official train.py always writes one")
    uses_k = objective_class(cfg.objective.train_type).uses_step_level  # the official ignore_dt
    model, ema = build_model(cfg, uses_step_level=uses_k), build_model(cfg, uses_step_level=uses_k)
    n_online = load_tree(model, train_state["params"], shape, "params")
    n_ema = load_tree(ema, train_state["params_ema"], shape, "params_ema")
    flat = flatten(train_state["params"])
    report = {"tensors_per_tree": len(param_table(shape)), "values_online": n_online, "values_ema": n_ema,
              "ignored": [f"{k} {tuple(np.shape(flat[k]))}" for k in IGNORED if k in flat],
              "official_step": int(np.asarray(train_state.get("step", -1))),
              "shape": dataclasses.asdict(shape), "model_params": sum(p.numel() for p in model.parameters()),
              "not_imported": "opt_state (a fresh AdamW starts at step 0)"}
    return model.eval(), ema.eval(), report
