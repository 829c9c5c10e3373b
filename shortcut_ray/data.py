"""Ray Data input pipeline: config -> dataset URI, the training `ray.data.Dataset`, and each worker's
batch iterator. The shard format itself (and the built-in datasets) live in `shards`.

Decoded batch schema (what every Train worker sees, defined once in `decode_batch`):
`image` float32 (B, C, H, W) -- pixels scaled to [-1, 1], or latents sampled as
z = (mean + exp(logvar / 2) * noise) * latent_scale -- and `label` int64 (B,). Paired (reflow)
datasets add `x0` float32 (B, C, H, W), the stored noise whose teacher sample is `image`; their
iterators yield (x1, y, x0) instead of (x1, y): unpack any batch with `split_paired`.

The driver calls `resolve_dataset` (which may write a cached built-in dataset) and `build_dataset`;
Train workers only read their `ray.train.get_dataset_shard("train")` through `EpochStream` (or
`batches`). Ray is imported inside the functions that need it.
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from shortcut_ray.config import ConfigError, DataConfig
from shortcut_ray.shards import PIL_MODES, bytes_array, dataset_info, digits_dataset, fashion_mnist_dataset
from shortcut_ray.storage import filesystem, is_local_fs, join_uri


# -- config -> dataset ---------------------------------------------------------------------------

def check_matches(info: Mapping[str, Any], data_cfg: DataConfig, uri: str) -> None:
    """Refuse a dataset whose manifest disagrees with the config, saying which --set fixes it."""
    for key, what in (("kind", "kind"), ("image_size", "image side"), ("channels", "channels"),
                      ("num_classes", "number of classes")):
        have, want = info[key], getattr(data_cfg, key)
        if have != want:
            raise ConfigError(
                f"dataset {uri} has {what} {have!r} but data.{key}={want!r}; use `--set data.{key}={have}`"
                + (" (and a model.patch_size dividing it)" if key == "image_size" else "")
                + (f", or rewrite the data with jobs.prepare_data --image-size {want}"
                   if key == "image_size" and data_cfg.source == "parquet" else ""))
    if info.get("paired") and data_cfg.random_flip:
        raise ConfigError(f"dataset {uri} is a paired (reflow) dataset: flipping x1 without its noise x0 breaks "
                          f"the stored coupling; use `--set data.random_flip=false`")
    scale = info.get("latent_scale")  # the VAE's own scaling_factor (SD: 0.18215, SDXL: 0.13025)
    if info["kind"] == "latents" and scale and not math.isclose(scale, data_cfg.latent_scale, rel_tol=1e-4):
        raise ConfigError(f"dataset {uri} was encoded by {info.get('vae')} whose latent scale is {scale}, "
                          f"but data.latent_scale={data_cfg.latent_scale}; use `--set data.latent_scale={scale}`")


def resolve_dataset(data_cfg: DataConfig) -> str:
    """URI of the shards for a config, writing the built-in ones on first use; validated. Driver side."""
    if data_cfg.source == "digits":
        uri = digits_dataset(data_cfg.image_size, cache_dir=data_cfg.uri or None)
    elif data_cfg.source == "fashion_mnist":
        uri = fashion_mnist_dataset(data_cfg.uri, data_cfg.image_size)
    else:
        uri = data_cfg.uri
    check_matches(dataset_info(uri), data_cfg, uri)
    return uri


def decode_batch(batch: dict[str, np.ndarray], *, kind: str, channels: int, image_size: int,
                 random_flip: bool, latent_scale: float, latent_shape=None,
                 pair_dtype: str | None = None) -> dict[str, np.ndarray]:
    """Shard rows -> {"image": float32 (B, C, H, W), "label": int64 (B,)}; runs inside Ray Data tasks.

    pair_dtype (paired datasets): rows hold x0 / x1 arrays, decoded as they are (no flip, no latent
    sampling: x1 is already a model-space sample) to {"image": x1, "label", "x0"}."""
    rng = np.random.default_rng()  # fresh entropy per batch: new flips/latent noise every epoch
    n = len(batch["label"] if "label" in batch else batch[next(iter(batch))])
    if pair_dtype is not None:
        shape = (channels, image_size, image_size)
        label = np.asarray(batch["label"], np.int64) if "label" in batch else np.zeros(n, np.int64)
        return {"image": bytes_array(batch["x1"], pair_dtype, shape), "label": label,
                "x0": bytes_array(batch["x0"], pair_dtype, shape)}
    if kind == "pixels":
        from PIL import Image

        mode = PIL_MODES[channels]
        out = np.empty((n, image_size, image_size, channels), np.uint8)
        for i, data in enumerate(batch["image"]):
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im if im.mode == mode else im.convert(mode))
            if arr.shape[:2] != (image_size, image_size):
                raise ValueError(f"shard image is {arr.shape[:2]}, data.image_size is {image_size}; "
                                 f"the manifest and the shards disagree, re-run jobs.prepare_data")
            out[i] = arr.reshape(image_size, image_size, channels)
        x = out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0  # (B, C, H, W) in [-1, 1]
        if random_flip:  # ALGORITHM §3.4: random horizontal flip, train only
            flip = rng.random(n) < 0.5
            x[flip] = x[flip][..., ::-1]
    else:
        shape = tuple(latent_shape)

        def stack(col):
            return np.stack([np.frombuffer(b, np.float16).reshape(shape) for b in batch[col]]).astype(np.float32)

        mean, logvar = stack("mean"), stack("logvar")  # (B, C, H, W)
        if random_flip and "mean_flip" in batch:  # the flip happened before encoding (§3.4)
            flip = rng.random(n) < 0.5
            mean[flip], logvar[flip] = stack("mean_flip")[flip], stack("logvar_flip")[flip]
        # A fresh posterior sample each time, as latent_dist.sample() per step in the paper code (§3.4)
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        x = ((mean + np.exp(0.5 * logvar) * noise) * latent_scale).astype(np.float32)
    label = np.asarray(batch["label"], np.int64) if "label" in batch else np.zeros(n, np.int64)
    return {"image": x, "label": label}


def decoded_row_bytes(data_cfg: DataConfig) -> int:
    """Bytes of one decoded row: float32 (C, H, W)."""
    return 4 * data_cfg.channels * data_cfg.image_size ** 2


def build_dataset(data_cfg: DataConfig, uri: str, seed: int):
    """The training `ray.data.Dataset`: shards in a new file order every epoch, decoded to the batch
    schema and streamed in blocks of one decode batch.

    File order comes from FileShuffleConfig(seed) with reseed_after_execution, so each execution
    (epoch) reshuffles; the rows inside a shard are mixed further by `batches`' local shuffle buffer
    (RAY_NOTES §2, shuffling options). Nothing is materialised: each epoch re-reads and re-decodes
    (fresh flips, fresh latent noise). The output block size is set to one decode batch: with Ray's
    default 128 MiB target a decode task emitted its whole input as one block, so an epoch's first
    batch waited for the whole epoch's decode (bench/data_throughput.py measured it).
    """
    import ray.data

    info = dataset_info(uri)
    check_matches(info, data_cfg, uri)
    fs, root = filesystem(uri)
    if is_local_fs(fs):
        import pyarrow.fs as pafs

        read_fs = pafs.LocalFileSystem()
        paths = [os.path.join(root, s["file"]) for s in info["shards"]]
    else:  # fsspec FS: Ray wraps it in a pyarrow PyFileSystem (RAY_NOTES §2)
        read_fs = fs
        paths = [join_uri(uri, s["file"]) for s in info["shards"]]
    paired = bool(info.get("paired"))
    if paired:
        columns = ["x0", "x1"]
    elif data_cfg.kind == "pixels":
        columns = ["image"]
    else:
        columns = ["mean", "logvar"] + (["mean_flip", "logvar_flip"] if info["has_flip"] else [])
    if info.get("class_counts") is not None:
        columns.append("label")
    ds = ray.data.read_parquet(paths, filesystem=read_fs, shuffle=ray.data.FileShuffleConfig(seed=seed))
    ds = ds.select_columns(columns)  # pushed down into the read (`columns=` is deprecated in 2.60)
    # ~32 MB of float32 output per decode task keeps object-store blocks moderate at 256 px RGB.
    per_row = decoded_row_bytes(data_cfg) * (2 if paired else 1)
    rows = max(16, min(1024, (32 << 20) // per_row))
    ds = ds.map_batches(
        decode_batch, batch_format="numpy", batch_size=rows,
        fn_kwargs={"kind": data_cfg.kind, "channels": data_cfg.channels, "image_size": data_cfg.image_size,
                   "random_flip": data_cfg.random_flip, "latent_scale": data_cfg.latent_scale,
                   "latent_shape": info.get("latent_shape"),
                   "pair_dtype": info.get("pair_dtype", "float32") if paired else None})
    ds.context.target_max_block_size = max(1 << 20, rows * per_row)  # one block per decode batch: streams
    return ds


def split_paired(batch: tuple) -> tuple[Any, Any, Any]:
    """(x1, y, x0) of a batch from `batches` / `EpochStream.next()`; x0 is None for unpaired datasets.

    The one place that knows the batch tuple's layout: (x1, y) for ordinary datasets, (x1, y, x0) for
    paired (reflow) ones, x1 (B, C, H, W) the data/teacher sample, y (B,) labels, x0 (B, C, H, W) the
    stored noise that the teacher carried to x1 (ALGORITHM §6.6). `TrainState.step_on(*batch)` takes
    either form."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(f"a batch is (x1, y) or (x1, y, x0), got a tuple of {len(batch)}")


def batches(shard, local_batch: int, data_cfg: DataConfig, device=None) -> Iterator[tuple[Any, ...]]:
    """One epoch of (x (B, C, H, W) float32, y (B,) int64) torch tensors from a Ray `DataIterator`;
    paired datasets add x0 (B, C, H, W) float32: (x1, y, x0) (see `split_paired`).

    shard: `ray.train.get_dataset_shard("train")` (or one of `ds.streaming_split(n)`). The last partial
    batch is dropped so every rank does the same number of steps. device None means Ray's "auto": the
    Train worker's device inside Ray Train, CPU elsewhere.
    """
    it = shard.iter_torch_batches(
        batch_size=local_batch, drop_last=True,
        local_shuffle_buffer_size=data_cfg.shuffle_buffer or None,
        prefetch_batches=data_cfg.prefetch_batches,
        device="auto" if device is None else device,
        **({"pin_memory": True} if pins_batches(device) else {}))
    for b in it:
        yield (b["image"], b["label"], b["x0"]) if "x0" in b else (b["image"], b["label"])


def pins_batches(device=None) -> bool:
    """Pin host batches when they go to a GPU: Ray then copies them with non_blocking=True, so the
    host-to-device copy overlaps compute instead of blocking on pageable memory."""
    import torch

    if not torch.cuda.is_available():
        return False
    if device is None or device == "auto":  # Ray's "auto": the Train worker's device, else CPU
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker

        device = get_device() if _in_ray_train_worker() else "cpu"
    return torch.device(device).type == "cuda"


class EpochCache:
    """One worker's rows of the first epoch, kept in memory (on the batches' device); every later epoch
    is a new permutation of them in batches of `local_batch` (the last partial one dropped, as Ray
    Data's drop_last did), seeded by (seed, epoch). With `flip`, each row is mirrored with probability
    1/2 per epoch: the rows were flipped at random once in decode_batch, and a fair coin applied to a
    fairly flipped image leaves it fairly flipped, so the distribution is that of streaming.
    `add` returns False (and frees what it held) once the rows pass `limit_bytes`, or for unpaired
    latents, whose decode draws new posterior noise on every read (caching would freeze one draw)."""

    def __init__(self, local_batch: int, limit_bytes: int, seed: int, flip: bool, latents: bool):
        self.local_batch, self.limit, self.seed, self.flip, self.latents = local_batch, limit_bytes, seed, flip, latents
        self._parts: list[tuple] | None = []
        self._bytes = 0
        self.rows: tuple | None = None
        self.epoch = 0

    @property
    def sealed(self) -> bool:
        return self.rows is not None

    def add(self, batch: tuple) -> bool:
        if self.latents and len(batch) == 2:
            self._parts = None
            return False
        self._bytes += sum(t.numel() * t.element_size() for t in batch)
        if self._bytes > self.limit:
            self._parts = None
            return False
        self._parts.append(tuple(t.detach() for t in batch))
        return True

    def seal(self) -> bool:
        """The first epoch has ended: keep its rows and start the second epoch. False when it had none."""
        import torch

        if not self._parts:
            return False
        self.rows = tuple(torch.cat(cols) for cols in zip(*self._parts))
        self._parts = None
        self._new_epoch()
        return True

    def _new_epoch(self) -> None:
        import torch

        self.epoch += 1
        self._gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.epoch)
        self._order = torch.randperm(self.rows[0].shape[0], generator=self._gen)
        self._pos = 0

    def next(self):
        """The next batch of this epoch, or None at its end (the following call starts the next epoch)."""
        import torch

        b, n = self.local_batch, self.rows[0].shape[0]
        if self._pos + b > n:
            self._new_epoch()
            return None
        idx = self._order[self._pos:self._pos + b]
        self._pos += b
        out = [t[idx.to(t.device)] for t in self.rows]
        if self.flip:
            mirror = (torch.rand(b, generator=self._gen) < 0.5).to(out[0].device)
            out[0] = torch.where(mirror[:, None, None, None], out[0].flip(-1), out[0])
        return tuple(out)


class EpochStream:
    """Successive epochs of `batches`, read ahead by a background thread across epoch boundaries.

    Every epoch of a Ray Data shard is a new execution whose first batch takes seconds (executor
    start-up; the split coordinator only starts it once every rank has asked for the next epoch). A
    thread that drains epoch e into a bounded queue asks for epoch e+1 while the trainer still works
    through e's queued batches, so that start-up overlaps training instead of stalling it.
    `next()` returns (x, y), or None once at the end of each epoch. The queue holds at most
    data.readahead_mb MiB of batches (at least prefetch_batches) and the reader stays at most one
    epoch ahead, so Ray Data does no more work than inline reading, only earlier (running executions
    back to back took the CPU from a CPU trainer); readahead_mb = 0 reads inline, one epoch at a time.

    With data.cache_mb > 0 the first epoch is read inline and kept (`EpochCache`); when it fits, every
    later epoch comes from memory and Ray Data is not run again. That matters on small datasets: the
    digits run's epoch is 28 steps, and a Ray Data execution per epoch running beside a 2-thread CPU
    trainer halved its throughput (issue 14). A dataset over the budget streams every epoch as above.
    `seed` (with the epoch) orders the cached epochs; give each rank its own.
    """

    _END = object()

    def __init__(self, shard, local_batch: int, data_cfg: DataConfig, device=None, seed: int = 0,
                 rows_per_rank: int | None = None):
        self._args = (shard, local_batch, data_cfg, device)
        self._inline = None
        self._stop = threading.Event()
        self._thread = None
        self._readahead_after_epoch = False
        self._cache = None
        # rows_per_rank (from the manifest): a share known to exceed the budget streams from the start
        # instead of filling the budget (device memory on GPU) during the first epoch and then letting go
        fits = rows_per_rank is None or rows_per_rank * decoded_row_bytes(data_cfg) <= data_cfg.cache_mb << 20
        if data_cfg.cache_mb > 0 and fits:
            self._cache = EpochCache(local_batch, data_cfg.cache_mb << 20, seed,
                                     flip=data_cfg.random_flip and data_cfg.kind == "pixels",
                                     latents=data_cfg.kind == "latents")
        else:
            self._start_readahead()

    @property
    def cached(self) -> bool:
        """True once epochs come from memory (Ray Data is no longer read)."""
        return self._cache is not None and self._cache.sealed

    def _start_readahead(self) -> None:
        shard, local_batch, data_cfg, device = self._args
        if data_cfg.readahead_mb <= 0:
            return
        batch_bytes = decoded_row_bytes(data_cfg) * local_batch
        depth = max(data_cfg.prefetch_batches, 1, (data_cfg.readahead_mb << 20) // batch_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._ends, self._ends_queued = threading.Condition(), 0  # epoch ends queued, not yet taken
        self._thread = threading.Thread(target=self._fill, name="shortcut-ray-readahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                for b in batches(*self._args):
                    if not self._put(b):
                        return
                with self._ends:
                    self._ends_queued += 1
                if not self._put(self._END):
                    return
                with self._ends:  # at most one epoch ahead: never run Ray Data executions back to back
                    while self._ends_queued > 1 and not self._stop.is_set():
                        self._ends.wait(0.2)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        if self._cache is None:
            return self._next_streamed()
        if self._cache.sealed:
            return self._cache.next()
        b = self._next_streamed()
        if b is None:
            if not self._cache.seal():  # an empty epoch: nothing to cache
                self._cache = None
                self._start_readahead()
        elif not self._cache.add(b):  # over budget (or latents): stream every epoch from the next one on
            self._cache = None
            self._readahead_after_epoch = True
        return b

    def _next_streamed(self):
        if self._thread is None:  # inline: one epoch's generator at a time
            if self._inline is None:
                self._inline = batches(*self._args)
            b = next(self._inline, None)
            if b is None:
                self._inline = None
                if self._readahead_after_epoch:
                    self._readahead_after_epoch = False
                    self._start_readahead()
            return b
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            with self._ends:
                self._ends_queued -= 1
                self._ends.notify()
            return None
        return item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reading ahead. The thread ends at its next queue put, dropping (closing) its Ray
        iterator while Ray is still up; one blocked in Ray (e.g. on the next epoch's barrier, which
        a finished rank never joins) is left behind after timeout_s: it is a daemon."""
        self._stop.set()
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._thread is not None:
            self._thread.join(timeout_s)
