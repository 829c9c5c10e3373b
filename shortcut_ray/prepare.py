"""Convert image collections into the shard format of `shortcut_ray.data`, with Ray Data decoding in parallel.

Inputs (any local path or fsspec URI):
  idx          an MNIST/Fashion-MNIST folder: {train,t10k}-images-idx3-ubyte[.gz] + -labels-idx1-ubyte[.gz]
  imagefolder  root/<class name>/**/<image>: classes are the sorted top-level folder names
  parquet      Parquet file(s) with an encoded-image column (bytes, or a {"bytes": ...} struct as
               Hugging Face datasets write it) and an optional label column (ints or class names)
Every image is converted to grayscale/RGB, centre-cropped to a square and resized (PIL bilinear,
antialiased when shrinking, ALGORITHM §3.4) -- IDX digits 1..4 px smaller than the target are padded
instead (`shards.fit_square`) -- and stored as PNG. The driver only streams the encoded rows into
`shards.write_shards`; unreadable images are reported by path and skipped (counted in the manifest)
or, with on_error="fail", stop the job.
The CLI is jobs/prepare_data.py.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Sequence

import numpy as np

from shortcut_ray import shards, storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MAX_LISTED_SKIPS = 1000  # manifest lists at most this many skipped paths (the count is exact)


class PrepareError(RuntimeError):
    """An input that cannot be converted; the message names the file and what to do."""


def center_crop_resize(im, size: int):
    """Centre square crop, then resize to size x size (PIL bilinear; antialiased when shrinking)."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return im if s == size else im.resize((size, size), Image.BILINEAR)


def encode_batch(batch: dict[str, np.ndarray], *, image_size: int, channels: int,
                 fs=None, label_map: dict | None = None) -> dict[str, np.ndarray]:
    """One Ray Data batch of inputs -> {"image": PNG bytes or b"", "label", "path", "error": "" or why}.

    Input columns: "path" always; then "raw" (uint8 HxW bytes, IDX) or "bytes" (an encoded file) or
    nothing (read "path" through `fs`). Errors are returned, not raised, so the driver can name the
    file and decide (skip or fail) without a Ray task retry or traceback in between.
    """
    from PIL import Image

    mode = shards.PIL_MODES[channels]
    paths = [str(p) for p in batch["path"]]
    labels = batch.get("label")
    out_img, out_lab, out_err = [], [], []
    for i, path in enumerate(paths):
        try:
            y = 0 if labels is None else labels[i]
            y = label_map[str(y)] if label_map is not None else int(y)
            if "raw" in batch:
                side = int(batch["side"][i])
                arr = np.frombuffer(batch["raw"][i], np.uint8).reshape(side, side)
                im = Image.fromarray(shards.fit_square(arr, image_size))
            else:
                if "bytes" in batch:
                    raw = batch["bytes"][i]
                    if isinstance(raw, dict):  # Hugging Face Image feature: {"bytes", "path"}
                        if raw.get("path"):
                            paths[i] = path = f"{path}::{raw['path']}"
                        raw = raw["bytes"]
                else:
                    raw = fs.cat_file(path)
                if not raw:
                    raise ValueError("empty file")
                with Image.open(io.BytesIO(raw)) as im0:
                    im0.load()  # decode fully here: truncated files fail now, not later
                    im = center_crop_resize(im0.convert(mode), image_size)
            out_img.append(shards.png_bytes(np.asarray(im.convert(mode))))
            out_lab.append(y)
            out_err.append("")
        except Exception as e:  # noqa: BLE001 -- any decode failure is reported per file
            out_img.append(b"")
            out_lab.append(-1)
            why = "not a readable image (unknown format or corrupt header)" \
                if type(e).__name__ == "UnidentifiedImageError" else str(e)
            out_err.append(f"{type(e).__name__}: {why}")
    return {"image": np.array(out_img, dtype=object), "label": np.array(out_lab, np.int64),
            "path": np.array(paths, dtype=object), "error": np.array(out_err, dtype=object)}


# -- sources: each returns (ray Dataset of inputs, meta for the manifest) ------------------------

def idx_source(src: str, split: str, shuffle: bool, seed: int):
    import pyarrow as pa
    import ray.data

    images_path, labels_path = shards.find_idx_pair(src, split)
    images, labels = shards.read_idx(images_path), shards.read_idx(labels_path)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or len(images) != len(labels):
        raise PrepareError(f"{images_path}: expected square (N, H, H) images matching {len(labels)} labels, "
                           f"got {images.shape}")
    order = np.random.default_rng(seed).permutation(len(images)) if shuffle else np.arange(len(images))
    images = images.astype(np.uint8)
    table = pa.table({"raw": [images[i].tobytes() for i in order],
                      "side": np.full(len(order), images.shape[1], np.int64),
                      "label": labels[order].astype(np.int64),
                      "path": [f"{images_path}[{i}]" for i in order]})
    blocks = [table.slice(lo, 4096) for lo in range(0, table.num_rows, 4096)]
    num_classes = int(labels.max()) + 1
    return ray.data.from_arrow(blocks), {"num_classes": num_classes, "source": images_path,
                                         "source_image_size": int(images.shape[1]), "split": split}


def imagefolder_source(src: str, shuffle: bool, seed: int):
    import ray.data

    fs, root = storage.filesystem(src)
    if not fs.isdir(root):
        raise PrepareError(f"{src} is not a folder; an ImageFolder input is root/<class>/<image files>")
    classes = sorted(p["name"].rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=True)
                     if p["type"] == "directory")
    if not classes:
        raise PrepareError(f"{src} has no class subfolders; expected root/<class>/<image files>")
    items = []
    for k, name in enumerate(classes):
        for path in sorted(fs.find(storage.join_uri(root, name))):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                items.append({"path": path, "label": k})
    if not items:
        raise PrepareError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {src}/<class>/")
    if shuffle:  # class folders are listed one after another; mix them before sharding
        perm = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in perm]
    return ray.data.from_items(items), {"num_classes": len(classes), "classes": classes, "source": src}


def parquet_source(src: str, image_column: str, label_column: str, shuffle: bool, seed: int):
    import ray.data

    fs, path = storage.filesystem(src)
    ds = ray.data.read_parquet(path if storage.is_local_fs(fs) else src, filesystem=None if storage.is_local_fs(fs) else fs,
                               include_paths=True)
    names = ds.schema().names
    if image_column not in names:
        raise PrepareError(f"{src} has no column {image_column!r} (columns: {names}); pass --image-column")
    meta: dict = {"source": src}
    rename = {image_column: "bytes"}
    label_map = None
    if label_column in names:
        rename[label_column] = "label"
        uniq = ds.unique(label_column)
        if all(isinstance(v, (int, np.integer)) for v in uniq):
            meta["num_classes"] = int(max(uniq)) + 1
        else:  # class names: index them in sorted order, like ImageFolder
            meta["classes"] = sorted(str(v) for v in uniq)
            meta["num_classes"] = len(meta["classes"])
            label_map = {name: i for i, name in enumerate(meta["classes"])}
    else:
        print(f"note: no label column {label_column!r} in {src}; writing an unconditional dataset (1 class)")
        meta["num_classes"] = 1
    ds = ds.select_columns([c for c in (image_column, label_column, "path") if c in names]).rename_columns(rename)
    if shuffle:
        ds = ds.random_shuffle(seed=seed)
    return ds, meta, label_map


# -- driver --------------------------------------------------------------------------------------

def prepare(fmt: str, src: str, out: str, image_size: int, channels: int | None = None,
            shard_size: int = 5000, on_error: str = "skip", split: str = "train",
            image_column: str = "image", label_column: str = "label",
            class_names: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
            log: Callable[[str], None] = print) -> dict:
    """Convert `src` (fmt idx|imagefolder|parquet) to pixel shards at `out`; return the manifest.

    Needs a running Ray (ray.init). Skipped files are logged through `log` and listed in the manifest.
    """
    import ray.data

    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    channels = channels or (1 if fmt == "idx" else 3)
    label_map = None
    if fmt == "idx":
        ds, meta = idx_source(src, split, shuffle, seed)
    elif fmt == "imagefolder":
        ds, meta = imagefolder_source(src, shuffle, seed)
    elif fmt == "parquet":
        ds, meta, label_map = parquet_source(src, image_column, label_column, shuffle, seed)
    else:
        raise ValueError(f"format must be idx, imagefolder or parquet, got {fmt!r}")
    if class_names:
        if len(class_names) != meta["num_classes"]:
            raise PrepareError(f"--class-names gives {len(class_names)} names, the data has "
                               f"{meta['num_classes']} classes")
        meta["classes"] = list(class_names)
    meta.update(kind="pixels", image_size=image_size, channels=channels, skipped=0, skipped_files=[])
    fs = storage.filesystem(src)[0] if fmt == "imagefolder" else None
    encoded = ds.map_batches(encode_batch, batch_format="numpy", batch_size=64,
                             fn_kwargs={"image_size": image_size, "channels": channels, "fs": fs,
                                        "label_map": label_map})

    def rows():
        for b in encoded.iter_batches(batch_format="numpy", batch_size=256):
            for img, y, path, err in zip(b["image"], b["label"], b["path"], b["error"]):
                if err:
                    if on_error == "fail":
                        raise PrepareError(f"cannot read image {path}: {err}. Fix or remove the file, or "
                                           f"pass --on-error skip to skip unreadable images")
                    log(f"skipped unreadable image {path}: {err}")
                    meta["skipped"] += 1
                    if len(meta["skipped_files"]) < _MAX_LISTED_SKIPS:
                        meta["skipped_files"].append({"path": str(path), "error": str(err)})
                    continue
                yield {"image": img, "label": int(y)}

    # Deterministic row order given the seed, so re-running gives the same shards and checksums.
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        # write_shards reads meta after consuming rows(), so the skip count lands in the manifest.
        manifest = shards.write_shards(rows(), out, shard_size, meta)
    finally:
        ctx.execution_options.preserve_order = old
    print(f"wrote {manifest['count']} images in {len(manifest['shards'])} shards to {out} "
          f"({manifest['skipped']} skipped)", file=sys.stderr)
    return manifest


def detect_format(src: str) -> str:
    """idx if the IDX files are there, parquet for *.parquet or a folder of them, else imagefolder."""
    fs, path = storage.filesystem(src)
    if path.endswith(".parquet"):
        return "parquet"
    for split in ("train", "test"):
        try:
            shards.find_idx_pair(src, split)
            return "idx"
        except FileNotFoundError:
            pass
    if fs.isdir(path) and fs.glob(storage.join_uri(path, "*.parquet")):
        return "parquet"
    return "imagefolder"
