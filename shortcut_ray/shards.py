"""The shard format (the one on-disk schema of the project) and the built-in datasets. Ray-free.

Shard format (written by `write_shards`, read by `data.build_dataset`). A dataset is a directory or
object prefix -- a local path or any fsspec URI
(gs://bucket/prefix, s3://..., memory://...) -- holding

    part-00000.parquet, part-00001.parquet, ...   the rows
    manifest.json                                  written last: its presence means "complete"

Pixel datasets (kind "pixels"): columns `image` (binary: PNG bytes of a uint8 grayscale "L" or RGB
image of image_size x image_size) and `label` (int64 in [0, num_classes)).
Latent datasets (kind "latents", ALGORITHM §3.4): `mean`, `logvar` (binary: float16 bytes of a
C-order (C, H, W) array, the VAE posterior of the image), optionally `mean_flip`, `logvar_flip`
(the posterior of the horizontally flipped image) and `label`.
Paired datasets (two-stage reflow, ALGORITHM §6.6; written by `pairs.generate`, manifest
"paired": true, kind "pixels" or "latents" = the space of the teacher that generated them): columns
`x0` (the noise) and `x1` (the teacher's sample from that noise), both binary: `pair_dtype` (float32 or
float16) bytes of a C-order (C, H, W) array in model space (pixels in about [-1, 1]; latents already
scaled, used as they are), and `label` (the class the teacher was conditioned on). Row i of the dataset
is row i of the generation plan. Extra manifest keys: "pair_dtype", "teacher" {"checkpoint", "step",
"train_type", ...}, "sampler" {"steps", "weights", "cfg_scale", "seed", "labels", "precision"},
"plan_id". While generating, `_pairs_progress/part-XXXXX.json` records each finished shard (resume).
data.py decodes them to (x1, y, x0) batches; see `data.split_paired`.
manifest.json: {"format", "version", "kind", "image_size" (latent side for latents), "channels",
"num_classes", "classes" (names), "count", "class_counts", "skipped", "skipped_files",
"latent_shape" ([C, H, W] or null), "has_flip", "shards": [{"file", "rows", "bytes", "sha256"}],
plus whatever provenance the writer adds ("source", "source_image_size", "vae", ...)}.

`digits_dataset` / `fashion_mnist_dataset` write the built-in datasets once into a cache and return
their URI; `read_idx` reads MNIST-format IDX files from any fsspec URI.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .storage import atomic_write, cache_root, filesystem, join_uri

MANIFEST = "manifest.json"
FORMAT = "shortcut-ray-shards"
VERSION = 1
PIXEL_COLUMNS = ("image", "label")
LATENT_COLUMNS = ("mean", "logvar", "mean_flip", "logvar_flip", "label")
PAIRED_COLUMNS = ("x0", "x1", "label")
PAIR_DTYPES = ("float32", "float16")
FASHION_MNIST_FALLBACK = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# -- writing -------------------------------------------------------------------------------------

def _column_chunks(rows, columns: tuple[str, ...], shard_size: int) -> Iterator[dict[str, list]]:
    """Yield {column: values} chunks of shard_size rows from a column mapping or an iterable of rows."""
    if isinstance(rows, Mapping):
        unknown = set(rows) - set(columns)
        if unknown:
            raise ValueError(f"unknown shard columns {sorted(unknown)}; the shard format has {list(columns)}")
        n = {len(v) for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"shard columns have different lengths: { {k: len(v) for k, v in rows.items()} }")
        (total,) = n
        for lo in range(0, total, shard_size):
            yield {k: list(v[lo:lo + shard_size]) for k, v in rows.items()}
        return
    chunk: dict[str, list] = {}
    for row in rows:
        if not chunk:
            unknown = set(row) - set(columns)
            if unknown:
                raise ValueError(f"unknown shard columns {sorted(unknown)}; the shard format has {list(columns)}")
            chunk = {k: [] for k in row}
        for k in chunk:
            chunk[k].append(row[k])
        if len(next(iter(chunk.values()))) == shard_size:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


def _layout(meta: Mapping[str, Any], shard_size: int) -> tuple[str, int, tuple, tuple]:
    """(kind, num_classes, columns, required columns) of a write, after checking meta."""
    for key in ("kind", "image_size", "channels", "num_classes"):
        if key not in meta:
            raise ValueError(f"write_shards meta needs {key!r}; got keys {sorted(meta)}")
    kind, num_classes = meta["kind"], int(meta["num_classes"])
    if kind == "pixels":
        columns, required = PIXEL_COLUMNS, ("image", "label")
    elif kind == "latents":
        columns, required = LATENT_COLUMNS, ("mean", "logvar")
        if not meta.get("latent_shape"):
            raise ValueError("latent shards need meta['latent_shape'] = [C, H, W]")
    else:
        raise ValueError(f"meta['kind'] must be 'pixels' or 'latents', got {kind!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return kind, num_classes, columns, required


def _manifest(meta: dict, kind: str, num_classes: int, shards: list, class_counts, seen_cols) -> dict:
    """manifest.json of written shards; `meta` read after the rows were consumed (a rows generator may
    have filled in skipped / skipped_files)."""
    if kind == "latents":
        c, h, w = (int(v) for v in meta["latent_shape"])
        if (meta["channels"], meta["image_size"]) != (c, h) or h != w:
            raise ValueError(f"latent_shape {meta['latent_shape']} disagrees with channels/image_size "
                             f"{meta['channels']}/{meta['image_size']} (latents must be square)")
    manifest = {
        "format": FORMAT, "version": VERSION,
        "kind": kind, "image_size": int(meta["image_size"]), "channels": int(meta["channels"]),
        "num_classes": num_classes,
        "classes": list(meta.get("classes") or [str(i) for i in range(num_classes)]),
        "count": int(sum(s["rows"] for s in shards)),
        "class_counts": class_counts.tolist() if "label" in (seen_cols or ()) else None,
        "skipped": int(meta.get("skipped", 0)),
        "skipped_files": list(meta.get("skipped_files", [])),
        "latent_shape": list(meta["latent_shape"]) if kind == "latents" else None,
        "has_flip": bool(seen_cols and {"mean_flip", "logvar_flip"} <= seen_cols),
        "shards": shards,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update({k: v for k, v in meta.items() if k not in manifest})
    return manifest


def write_shards(rows_iter_or_arrays, uri: str, shard_size: int, meta: Mapping[str, Any]) -> dict:
    """Write rows as Parquet shards + manifest.json at `uri`; return the manifest.

    rows_iter_or_arrays: a mapping {column: sequence} or an iterable of row dicts, with the columns of
    the shard format (module docstring). meta must give kind, image_size, channels, num_classes
    (latents: latent_shape); optional classes, skipped, skipped_files and any provenance keys. meta is
    read again after the rows are consumed, so a generator may count skipped rows into it as it goes.
    An old manifest is removed first and the new one written last, so a crash mid-write leaves a
    directory that readers refuse rather than a mix of old and new shards.
    """
    import pyarrow as pa

    kind, num_classes, columns, required = _layout(meta, shard_size)

    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(join_uri(root, MANIFEST)):
        fs.rm(join_uri(root, MANIFEST))
    types = {c: pa.binary() for c in columns}
    types["label"] = pa.int64()
    shards, class_counts, seen_cols = [], np.zeros(num_classes, np.int64), None
    for chunk in _column_chunks(rows_iter_or_arrays, columns, shard_size):
        missing = [c for c in required if c not in chunk]
        if missing:
            raise ValueError(f"{kind} shards need columns {list(required)}; missing {missing}")
        if seen_cols is not None and set(chunk) != seen_cols:
            raise ValueError(f"rows have inconsistent columns: {sorted(seen_cols)} vs {sorted(chunk)}")
        seen_cols = set(chunk)
        if "label" in chunk:
            labels = np.asarray(chunk["label"], dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"labels must be in [0, {num_classes}), got range "
                                 f"[{labels.min()}, {labels.max()}]; fix meta['num_classes']")
            class_counts += np.bincount(labels, minlength=num_classes)
            chunk["label"] = labels
        table = pa.table({c: pa.array(chunk[c], type=types[c]) for c in columns if c in chunk})
        shards.append(put_table(fs, root, shard_name(len(shards)), table))
    if not shards:
        raise ValueError(f"no rows to write to {uri}")
    keep = {s["file"] for s in shards}
    for stale in fs.glob(join_uri(root, "part-*.parquet")):  # left over from an earlier, larger write
        if stale.rsplit("/", 1)[-1] not in keep:
            fs.rm(stale)

    manifest = _manifest(dict(meta), kind, num_classes, shards, class_counts, seen_cols)
    write_manifest(fs, root, manifest)
    return manifest


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def put_table(fs, root: str, name: str, table) -> dict:
    """Write one Parquet shard atomically (storage.atomic_write); returns its manifest entry."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    atomic_write(join_uri(root, name), data, fs=fs)
    return {"file": name, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(fs, root: str, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json last (its presence marks the dataset complete)."""
    atomic_write(join_uri(root, MANIFEST), json.dumps(manifest, indent=1).encode(), fs=fs)


def array_bytes(x: np.ndarray, dtype: str) -> list[bytes]:
    """(N, C, H, W) array -> N C-order byte strings of `dtype` (paired columns x0 / x1)."""
    return [row.tobytes() for row in np.ascontiguousarray(x, dtype=np.dtype(dtype))]


def bytes_array(col, dtype: str, shape) -> np.ndarray:
    """Inverse of `array_bytes`: N byte strings -> float32 (N, *shape)."""
    return np.stack([np.frombuffer(b, np.dtype(dtype)).reshape(shape) for b in col]).astype(np.float32)


def dataset_info(uri: str) -> dict:
    """The manifest of the shards at `uri` (module docstring); a clear error when there is none."""
    fs, root = filesystem(uri)
    path = join_uri(root, MANIFEST)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST} at {uri}: not a shortcut-ray dataset, or its writer did not finish. Write one "
            f"with `python -m jobs.prepare_data --input SRC --output {uri} --image-size N`")
    with fs.open(path, "rb") as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format={info.get('format')!r})")
    return info


def verify_shards(uri: str) -> dict:
    """Re-hash every shard against the manifest; return the manifest or raise naming the bad shard."""
    info = dataset_info(uri)
    fs, root = filesystem(uri)
    for s in info["shards"]:
        digest = hashlib.sha256(fs.cat_file(join_uri(root, s["file"]))).hexdigest()
        if digest != s["sha256"]:
            redo = "jobs.generate_pairs (it regenerates bad shards)" if info.get("paired") else "jobs.prepare_data"
            raise ValueError(f"{join_uri(uri, s['file'])}: sha256 {digest} != manifest {s['sha256']}; "
                             f"the shard changed after writing, re-run {redo}")
    return info


def _exists(uri: str) -> bool:
    fs, root = filesystem(uri)
    return fs.exists(join_uri(root, MANIFEST))


# -- built-in datasets ---------------------------------------------------------------------------

def png_bytes(arr: np.ndarray) -> bytes:
    """PNG of a uint8 (H, W) or (H, W, C) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def fit_square(arr: np.ndarray, size: int, background: int = 0) -> np.ndarray:
    """Bring a square uint8 (H, W[, C]) image to size x size.

    1..4 px larger than the source: pad with `background` (28 -> 32 puts 2 px on each side, the usual
    MNIST-in-32 layout, no interpolation blur). Otherwise bilinear resize (PIL antialiases when
    shrinking).
    """
    from PIL import Image

    h = arr.shape[0]
    if h == size:
        return arr
    if 0 < size - h <= 4:
        lo = (size - h) // 2
        pad = [(lo, size - h - lo), (lo, size - h - lo)] + [(0, 0)] * (arr.ndim - 2)
        return np.pad(arr, pad, constant_values=background)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))


def digits_dataset(image_size: int = 16, cache_dir: str | None = None) -> str:
    """scikit-learn's bundled digits (1,797 8x8 images, values 0..16) as pixel shards; returns the URI.

    Upsampled bilinearly to image_size and written once as 4 shards to
    <cache_root(cache_dir)>/digits-{image_size}; later calls reuse it when its manifest exists.
    """
    uri = join_uri(cache_root(cache_dir), f"digits-{image_size}")
    if _exists(uri):
        return uri
    write_digits(uri, image_size)
    return uri


def write_digits(uri: str, image_size: int = 16) -> dict:
    """Write the digits shards to `uri` (any fsspec URI); returns the manifest."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    rows = {"image": [png_bytes(fit_square(im, image_size)) for im in imgs],
            "label": d.target.astype(np.int64)}
    return write_shards(rows, uri, shard_size=math.ceil(len(imgs) / 4), meta={
        "kind": "pixels", "image_size": image_size, "channels": 1, "num_classes": 10,
        "source": "sklearn.datasets.load_digits (8x8, 0..16 scaled to 0..255, bilinear upsample)",
        "source_image_size": 8})


def read_idx(path_or_uri: str) -> np.ndarray:
    """An IDX file (the MNIST/Fashion-MNIST format), gzipped or plain, from a path, fsspec URI or URL."""
    fs, path = filesystem(path_or_uri)
    raw = fs.cat_file(path)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise ValueError(f"{path_or_uri} is not an IDX file (magic bytes {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[raw[2]])
    offset = 4 + 4 * ndim
    n = math.prod(dims)
    if len(raw) - offset != n * dtype.itemsize:
        raise ValueError(f"{path_or_uri}: header says {dims} x {dtype} = {n * dtype.itemsize} bytes, "
                         f"file has {len(raw) - offset}; truncated or corrupt download")
    return np.frombuffer(raw, dtype, count=n, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_pair(src: str, split: str) -> tuple[str, str]:
    """Paths of `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` under src."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    found = []
    for what in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{what}.gz", f"{prefix}-{what}"):
            fs, root = filesystem(src)
            try:
                if fs.exists(join_uri(root, name)):
                    found.append(join_uri(src, name))
                    break
            except (OSError, ValueError):  # an unreachable URL counts as "not here"
                pass
    if len(found) != 2:
        raise FileNotFoundError(f"no {prefix}-images-idx3-ubyte[.gz] + {prefix}-labels-idx1-ubyte[.gz] in {src}")
    return found[0], found[1]


def fashion_mnist_dataset(src: str, image_size: int = 32, split: str = "train",
                          cache_dir: str | None = None) -> str:
    """Fashion-MNIST IDX files -> pixel shards at <cache_root>/fashion_mnist-{split}-{image_size}; the URI.

    src: a folder path, fsspec URI or http(s) URL holding the four IDX files (gzipped or not); if they
    are not there, /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist) is tried.
    28x28 is padded with the black background to 32 (2 px each side) and resized to other sizes.
    """
    uri = join_uri(cache_root(cache_dir), f"fashion_mnist-{split}-{image_size}")
    if _exists(uri):
        return uri
    tried = []
    for cand in [c for c in (src, FASHION_MNIST_FALLBACK) if c]:
        try:
            images_path, labels_path = find_idx_pair(cand, split)
            break
        except FileNotFoundError as e:
            tried.append(str(e))
    else:
        raise FileNotFoundError(
            "Fashion-MNIST IDX files not found (" + "; ".join(tried) + "). Set data.uri to a folder or URL "
            "with train/t10k-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz (e.g. `apt install "
            "dataset-fashion-mnist`, or the files from github.com/zalandoresearch/fashion-mnist)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{images_path}: expected (N, 28, 28) images matching {len(labels)} labels, got {images.shape}")
    rows = {"image": [png_bytes(fit_square(im, image_size)) for im in images.astype(np.uint8)],
            "label": labels.astype(np.int64)}
    write_shards(rows, uri, shard_size=10_000, meta={
        "kind": "pixels", "image_size": image_size, "channels": 1, "num_classes": 10,
        "classes": list(FASHION_MNIST_CLASSES), "source": images_path, "source_image_size": images.shape[1],
        "split": split})
    return uri
