"""Shard format, built-in datasets, IDX reading, config validation, and the real Ray Data pipeline.

The fast tests need no Ray. The `slow` ones share one local Ray (`ray.init(num_cpus=2)`, dashboard on,
RAY_NOTES §1 misc) for the module and read real shards through read_parquet -> decode -> batches.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shortcut_ray import data, shards
from shortcut_ray.config import ConfigError, DataConfig


def write_idx(path, arr: np.ndarray, gz: bool) -> str:
    """An IDX file as MNIST ships them: 0 0 dtype ndim, big-endian u32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    raw = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = str(path)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return path


def png_array(b: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(b)) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def digits_uri(tmp_path_factory) -> str:
    return shards.digits_dataset(16, cache_dir=str(tmp_path_factory.mktemp("cache")))


# -- no Ray --------------------------------------------------------------------------------------

def test_digits_shards_roundtrip(digits_uri):
    info = shards.dataset_info(digits_uri)
    assert (info["count"], info["num_classes"], info["image_size"], info["channels"]) == (1797, 10, 16, 1)
    assert info["kind"] == "pixels" and info["skipped"] == 0 and sum(info["class_counts"]) == 1797
    assert len(info["shards"]) == 4 and sum(s["rows"] for s in info["shards"]) == 1797
    labels = []
    for s in info["shards"]:
        path = os.path.join(digits_uri, s["file"])
        raw = open(path, "rb").read()
        assert hashlib.sha256(raw).hexdigest() == s["sha256"] and len(raw) == s["bytes"]
        t = pq.read_table(path)
        assert t.schema.field("image").type == "binary" and t.schema.field("label").type == "int64"
        labels += t.column("label").to_pylist()
    assert np.bincount(labels).tolist() == info["class_counts"]
    img = png_array(pq.read_table(os.path.join(digits_uri, "part-00000.parquet")).column("image")[0].as_py())
    assert img.shape == (16, 16) and img.dtype == np.uint8 and img.max() > 200
    assert shards.verify_shards(digits_uri)["count"] == 1797
    # Cached: a second call reuses the shards instead of rewriting them.
    mtime = os.path.getmtime(os.path.join(digits_uri, shards.MANIFEST))
    assert shards.digits_dataset(16, cache_dir=os.path.dirname(digits_uri)) == digits_uri
    assert os.path.getmtime(os.path.join(digits_uri, shards.MANIFEST)) == mtime


def test_rewrite_drops_stale_shards_and_missing_manifest_is_refused(tmp_path):
    uri = str(tmp_path / "ds")
    meta = {"kind": "pixels", "image_size": 2, "channels": 1, "num_classes": 3}
    img = shards.png_bytes(np.zeros((2, 2), np.uint8))
    shards.write_shards([{"image": img, "label": i % 3} for i in range(5)], uri, 2, meta)
    assert sorted(os.listdir(uri)) == ["manifest.json", "part-00000.parquet", "part-00001.parquet",
                                       "part-00002.parquet"]
    m = shards.write_shards({"image": [img] * 2, "label": np.array([0, 2])}, uri, 2, meta)
    assert sorted(os.listdir(uri)) == ["manifest.json", "part-00000.parquet"]
    assert m["count"] == 2 and m["class_counts"] == [1, 0, 1]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        shards.write_shards({"image": [img], "label": [3]}, uri, 2, meta)
    # The failed write removed the old manifest first: readers refuse the half-written directory.
    with pytest.raises(FileNotFoundError, match="jobs.prepare_data"):
        shards.dataset_info(uri)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    got = shards.read_idx(write_idx(tmp_path / "im", imgs, gz))
    assert got.shape == (5, 28, 28) and got.dtype == np.uint8 and np.array_equal(got, imgs)
    assert np.array_equal(shards.read_idx(write_idx(tmp_path / "lb", labels, gz)), labels)
    wide = np.array([[1, -2], [70000, 4]], np.int32)  # multi-byte types are big-endian on disk
    assert np.array_equal(shards.read_idx(write_idx(tmp_path / "w", wide, gz)), wide)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        shards.read_idx(str(tmp_path / "x"))
    good = open(write_idx(tmp_path / "t", np.zeros((4, 3, 3), np.uint8), gz=False), "rb").read()
    (tmp_path / "t").write_bytes(good[:-5])
    with pytest.raises(ValueError, match="truncated"):
        shards.read_idx(str(tmp_path / "t"))


def test_fashion_mnist_pads_28_to_32(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    imgs = np.full((6, 28, 28), 200, np.uint8)
    write_idx(src / "train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), gz=True)
    uri = shards.fashion_mnist_dataset(str(src), image_size=32, cache_dir=str(tmp_path / "cache"))
    info = shards.dataset_info(uri)
    assert info["count"] == 6 and info["classes"][9] == "Ankle boot" and info["source_image_size"] == 28
    img = png_array(pq.read_table(os.path.join(uri, "part-00000.parquet")).column("image")[0].as_py())
    assert img.shape == (32, 32)
    assert (img[2:30, 2:30] == 200).all() and img[:2].max() == 0 and img[:, :2].max() == 0  # 2 px of background
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST IDX files not found"):
        shards.fashion_mnist_dataset(str(tmp_path / "nowhere"), split="test", cache_dir=str(tmp_path / "cache"))


def test_resolve_dataset_mismatch_says_which_setting(digits_uri):
    ok = DataConfig(source="parquet", uri=digits_uri)
    assert data.resolve_dataset(ok) == digits_uri
    for field, bad, fix in (("image_size", 32, "--set data.image_size=16"),
                            ("channels", 3, "--set data.channels=1"),
                            ("num_classes", 100, "--set data.num_classes=10"),
                            ("kind", "latents", "--set data.kind=pixels")):
        with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
            data.resolve_dataset(DataConfig(source="parquet", uri=digits_uri, **{field: bad}))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        data.resolve_dataset(DataConfig(source="parquet", uri=os.path.dirname(digits_uri)))


def test_decode_pixels_scales_and_flips():
    img = np.zeros((4, 4), np.uint8)
    img[:, 0] = 255  # bright left column: a flip moves it to the right
    batch = {"image": np.array([shards.png_bytes(img)] * 64, dtype=object), "label": np.arange(64)}
    out = data.decode_batch(batch, kind="pixels", channels=1, image_size=4, random_flip=True, latent_scale=1.0)
    x = out["image"]
    assert x.shape == (64, 1, 4, 4) and x.dtype == np.float32 and out["label"].dtype == np.int64
    assert x.min() == -1.0 and x.max() == 1.0
    left = x[:, 0, :, 0].mean(axis=1) == 1.0
    right = x[:, 0, :, 3].mean(axis=1) == 1.0
    assert (left ^ right).all() and 5 < left.sum() < 59  # each row one way or the other, both happen


def test_decode_latents_samples_posterior_and_picks_flip():
    shape = (4, 2, 2)
    mean = np.arange(16, dtype=np.float16).reshape(shape)
    tiny = np.full(shape, -30.0, np.float16)  # std e^-15: the sample is the mean
    col = lambda a: np.array([a.tobytes()] * 200, dtype=object)  # noqa: E731
    batch = {"mean": col(mean), "logvar": col(tiny), "mean_flip": col(-mean), "logvar_flip": col(tiny),
             "label": np.zeros(200, np.int64)}
    kw = dict(kind="latents", channels=4, image_size=2, latent_scale=0.5, latent_shape=list(shape))
    z = data.decode_batch(batch, random_flip=True, **kw)["image"]
    assert z.shape == (200, 4, 2, 2) and z.dtype == np.float32
    plain = np.all(np.isclose(z, 0.5 * mean, atol=1e-4), axis=(1, 2, 3))
    flipped = np.all(np.isclose(z, -0.5 * mean, atol=1e-4), axis=(1, 2, 3))
    assert (plain ^ flipped).all() and 40 < flipped.sum() < 160
    z = data.decode_batch(batch, random_flip=False, **kw)["image"]
    assert np.allclose(z, 0.5 * mean, atol=1e-4)
    batch["logvar"] = col(np.zeros(shape, np.float16))  # unit variance: noise with std latent_scale
    z = data.decode_batch(batch, random_flip=False, **kw)["image"]
    assert 0.45 < (z - 0.5 * mean).std() < 0.55


# -- real Ray Data -------------------------------------------------------------------------------

class FakeShard:
    """Stands in for a Ray DataIterator: `epochs` epochs of `n` batches whose label is (epoch, index);
    records how many batches the consumer had taken when each epoch's iteration began."""

    def __init__(self, n: int, fail_in_epoch: int | None = None):
        self.n, self.fail_in_epoch = n, fail_in_epoch
        self.epoch, self.consumed, self.started_at = 0, 0, []

    def iter_torch_batches(self, batch_size, drop_last, local_shuffle_buffer_size, prefetch_batches, device):
        import torch

        e = self.epoch
        self.epoch += 1
        self.started_at.append(self.consumed)
        for i in range(self.n):
            if e == self.fail_in_epoch:
                raise RuntimeError("shard read failed")
            yield {"image": torch.full((batch_size, 1, 2, 2), float(i)), "label": torch.tensor([e * 100 + i])}


def _take_epochs(stream, shard, epochs: int) -> list:
    out = []
    while len(out) < epochs:
        epoch = []
        while (b := stream.next()) is not None:
            shard.consumed += 1
            epoch.append(int(b[1]))
        out.append(epoch)
    return out


@pytest.mark.parametrize("readahead_mb", [0, 1])
def test_epoch_stream_yields_each_epoch_then_none(readahead_mb):
    shard = FakeShard(5)
    cfg = DataConfig(image_size=2, channels=1, readahead_mb=readahead_mb, cache_mb=0)
    stream = data.EpochStream(shard, 1, cfg)
    assert _take_epochs(stream, shard, 3) == [[e * 100 + i for i in range(5)] for e in range(3)]
    stream.close()


def test_epoch_stream_starts_the_next_epoch_while_this_one_is_consumed():
    shard = FakeShard(10)
    ahead = data.EpochStream(shard, 1, DataConfig(image_size=2, channels=1, readahead_mb=1, cache_mb=0))
    assert ahead.next() is not None
    deadline = time.monotonic() + 30
    while len(shard.started_at) < 2:  # epoch 1 begins while the trainer has taken 1 of epoch 0's 10 batches
        assert time.monotonic() < deadline, "the read-ahead thread never started the next epoch"
        time.sleep(0.01)
    assert shard.started_at[1] == 0  # (the fake counts only what _take_epochs consumed)
    time.sleep(0.5)
    assert len(shard.started_at) == 2  # never more than one epoch ahead
    assert all(ahead.next() is not None for _ in range(9))  # the rest of epoch 0 ...
    assert len(shard.started_at) == 2
    assert ahead.next() is None  # ... and its end
    deadline = time.monotonic() + 30
    while len(shard.started_at) < 3:  # the trainer is in epoch 1 now: epoch 2 may be read
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ahead.close()
    # Inline (readahead 0): the next epoch begins only once this one is exhausted.
    shard = FakeShard(10)
    inline = data.EpochStream(shard, 1, DataConfig(image_size=2, channels=1, readahead_mb=0, cache_mb=0))
    _take_epochs(inline, shard, 1)
    assert shard.started_at == [0]
    inline.next()
    assert shard.started_at == [0, 10]


def test_epoch_stream_is_bounded_and_reraises_reader_errors():
    # 1 MiB of (1024, 1, 16, 16) float32 batches (1 MiB each): the queue holds prefetch_batches = 2.
    shard = FakeShard(50)
    cfg = DataConfig(image_size=16, channels=1, readahead_mb=1, prefetch_batches=2, cache_mb=0)
    stream = data.EpochStream(shard, 1024, cfg)
    deadline = time.monotonic() + 30
    while stream._queue.qsize() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    # Full: the reader holds one more batch, waiting to put it; nothing else is read ahead.
    assert stream._queue.maxsize == 2 and stream._queue.qsize() == 2 and shard.started_at == [0]
    assert _take_epochs(stream, shard, 1) == [list(range(50))]  # and nothing was lost
    stream.close()
    shard = FakeShard(3, fail_in_epoch=1)
    stream = data.EpochStream(shard, 1, DataConfig(image_size=2, channels=1, readahead_mb=1, cache_mb=0))
    assert _take_epochs(stream, shard, 1) == [[0, 1, 2]]
    with pytest.raises(RuntimeError, match="shard read failed"):
        stream.next()
    stream.close()


class RowShard:
    """A DataIterator over `rows` distinct rows (image (C, S, S) whose pixels encode the row id and a
    left-right asymmetry; label = row id), in order, batches of batch_size with drop_last; counts epochs."""

    def __init__(self, rows: int, size: int = 2, paired: bool = False):
        import torch

        self.rows, self.paired, self.epochs = rows, paired, 0
        ramp = torch.arange(size, dtype=torch.float32)  # asymmetric along the last axis: a flip shows
        self.images = torch.arange(rows, dtype=torch.float32)[:, None, None, None] * 100 + ramp.expand(1, size, size)

    def iter_torch_batches(self, batch_size, drop_last, local_shuffle_buffer_size, prefetch_batches, device):
        import torch

        self.epochs += 1
        for i in range(0, self.rows - batch_size + 1, batch_size):
            b = {"image": self.images[i:i + batch_size].clone(), "label": torch.arange(i, i + batch_size)}
            if self.paired:
                b["x0"] = -b["image"]
            yield b


def _epoch_batches(stream) -> list:
    out = []
    while (b := stream.next()) is not None:
        out.append(b)
    return out


def test_epoch_cache_reads_ray_data_once_then_permutes_in_memory():
    import torch

    shard = RowShard(10)
    cfg = DataConfig(image_size=2, channels=1, random_flip=False, readahead_mb=1, cache_mb=1)
    stream = data.EpochStream(shard, 3, cfg, seed=7)
    first = _epoch_batches(stream)
    assert [b[1].tolist() for b in first] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # epoch 0: Ray Data's order
    assert stream.cached and stream._thread is None and shard.epochs == 1
    orders = []
    for _ in range(3):
        epoch = _epoch_batches(stream)
        assert len(epoch) == 3 and all(b[0].shape == (3, 1, 2, 2) and b[1].shape == (3,) for b in epoch)
        labels = torch.cat([b[1] for b in epoch])
        assert sorted(labels.tolist()) == list(range(9))  # the rows epoch 0 yielded, each once
        for x, y in epoch:  # rows stay whole: image and label move together, unflipped
            assert torch.equal(x, shard.images[y])
        orders.append(labels.tolist())
    assert shard.epochs == 1  # Ray Data was never read again
    assert len({tuple(o) for o in orders}) == 3  # a new order every epoch
    again = data.EpochStream(RowShard(10), 3, cfg, seed=7)
    _epoch_batches(again)
    assert torch.cat([b[1] for b in _epoch_batches(again)]).tolist() == orders[0]  # seeded
    other = data.EpochStream(RowShard(10), 3, cfg, seed=8)
    _epoch_batches(other)
    assert torch.cat([b[1] for b in _epoch_batches(other)]).tolist() != orders[0]


def test_epoch_cache_flips_rows_afresh_each_epoch_and_keeps_pairs():
    import torch

    shard = RowShard(400)
    stream = data.EpochStream(shard, 50, DataConfig(image_size=2, channels=1, random_flip=True), seed=1)
    _epoch_batches(stream)
    flips = []
    for _ in range(2):
        flipped = torch.zeros(400, dtype=torch.bool)
        for x, y in _epoch_batches(stream):
            same, mirrored = (x == shard.images[y]).flatten(1).all(1), (x == shard.images[y].flip(-1)).flatten(1).all(1)
            assert (same ^ mirrored).all()  # each row is the original or its mirror image, nothing else
            flipped[y] = mirrored
        assert 140 < flipped.sum() < 260  # a fair coin per row
        flips.append(flipped)
    assert not torch.equal(flips[0], flips[1])  # drawn again each epoch
    pairs = RowShard(6, paired=True)  # paired (reflow) rows: x0 stays with its x1, never flipped
    stream = data.EpochStream(pairs, 2, DataConfig(image_size=2, channels=1, random_flip=False, kind="latents"))
    _epoch_batches(stream)
    assert stream.cached
    for x1, y, x0 in _epoch_batches(stream):
        assert torch.equal(x0, -x1) and torch.equal(x1, pairs.images[y])


def test_epoch_cache_over_budget_or_latents_streams_every_epoch():
    shard = RowShard(1100, size=16)  # 1 KiB per row: 1.07 MiB, over a 1 MiB budget
    stream = data.EpochStream(shard, 100, DataConfig(image_size=16, channels=1, random_flip=False, cache_mb=1,
                                                     readahead_mb=1))
    assert len(_epoch_batches(stream)) == 11 and not stream.cached
    assert stream._thread is not None  # streaming from epoch 1 on, read ahead as without a cache
    assert len(_epoch_batches(stream)) == 11 and shard.epochs >= 2
    stream.close()
    shard = RowShard(1100, size=16)  # the manifest says it cannot fit: streamed (read ahead) from the start
    stream = data.EpochStream(shard, 100, DataConfig(image_size=16, channels=1, random_flip=False, cache_mb=1,
                                                     readahead_mb=1), rows_per_rank=1100)
    assert stream._cache is None and stream._thread is not None
    stream.close()
    assert data.EpochStream(RowShard(10), 5, DataConfig(image_size=16, channels=1), rows_per_rank=1000)._cache
    shard = RowShard(10)  # unpaired latents: decode draws new noise per read, so never cached
    stream = data.EpochStream(shard, 5, DataConfig(image_size=2, channels=1, kind="latents", readahead_mb=0))
    for _ in range(3):
        assert len(_epoch_batches(stream)) == 2
    assert shard.epochs == 3 and not stream.cached


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # address="local": a fresh instance, never a stale ray_current_cluster; dashboard stays on.
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_read_decode_batches(ray_session, digits_uri):
    cfg = DataConfig(source="parquet", uri=digits_uri, shuffle_buffer=128)
    ds = data.build_dataset(cfg, digits_uri, seed=0)
    n, labels = 0, []
    for x, y in data.batches(ds.iterator(), 64, cfg):
        assert x.shape == (64, 1, 16, 16) and str(x.dtype) == "torch.float32" and str(y.dtype) == "torch.int64"
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.device.type == "cpu"
        n += len(y)
        labels += y.tolist()
    assert n == 1797 // 64 * 64  # drop_last
    assert set(labels) == set(range(10))
    assert x.min() == -1.0 and x.max() == 1.0


@pytest.mark.slow
def test_decode_streams_in_blocks_of_one_decode_batch(ray_session, tmp_path):
    # One shard of 4096 16x16 images = 4 MiB decoded, 4 decode batches of 1024 rows. With Ray's default
    # 128 MiB target block size the decode task emitted it as one block, so a worker's first batch of
    # an epoch waited for the whole shard's decode.
    uri = str(tmp_path / "one-shard")
    img = shards.png_bytes(np.zeros((16, 16), np.uint8))
    shards.write_shards({"image": [img] * 4096, "label": np.zeros(4096, np.int64)}, uri, 4096,
                        {"kind": "pixels", "image_size": 16, "channels": 1, "num_classes": 1})
    cfg = DataConfig(source="parquet", uri=uri, image_size=16, num_classes=1)
    blocks = data.build_dataset(cfg, uri, seed=0).materialize()
    assert blocks.count() == 4096 and blocks.num_blocks() >= 3


@pytest.mark.slow
def test_epoch_split_over_two_consumers_visits_each_row_once(ray_session, tmp_path):
    # 64 rows with unique labels (= row ids) in 8 shards, so the split is checkable exactly.
    uri = str(tmp_path / "ids")
    rows = [{"image": shards.png_bytes(np.full((4, 4), i * 4, np.uint8)), "label": i} for i in range(64)]
    shards.write_shards(rows, uri, 8, {"kind": "pixels", "image_size": 4, "channels": 1, "num_classes": 64})
    cfg = DataConfig(source="parquet", uri=uri, image_size=4, num_classes=64, random_flip=False, shuffle_buffer=16)
    splits = data.build_dataset(cfg, uri, seed=1).streaming_split(2, equal=True)
    orders = []
    for _epoch in range(2):
        got: dict[int, list[int]] = {}

        def consume(rank, it):
            try:
                ids = []
                for x, y in data.batches(it, 8, cfg):
                    # The image is the label: decode kept rows intact.
                    assert np.allclose(x[:, 0, 0, 0].numpy(), y.numpy() * 4 / 127.5 - 1, atol=1e-6)
                    ids += y.tolist()
                got[rank] = ids
            except BaseException as e:  # re-raised in the test thread below
                got[rank] = e

        threads = [threading.Thread(target=consume, args=(r, it)) for r, it in enumerate(splits)]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        for r in (0, 1):
            if isinstance(got.get(r), BaseException):
                raise got[r]
        assert len(got[0]) == len(got[1]) == 32
        assert sorted(got[0] + got[1]) == list(range(64))
        orders.append(got[0] + got[1])
    assert orders[0] != orders[1]  # file order reshuffled per epoch + local shuffle


@pytest.mark.slow
@pytest.mark.services
def test_gcs_shards_through_ray(ray_session, tmp_path, monkeypatch):
    from tests.services import DEFAULT_GCS_EMULATOR_BIN, gcs_emulator

    if not os.path.exists(os.environ.get("GCS_EMULATOR_BIN", DEFAULT_GCS_EMULATOR_BIN)):
        pytest.skip("gcp-storage-emulator not installed (python3 -m venv .venv-gcs && "
                    ".venv-gcs/bin/pip install gcp-storage-emulator)")
    with gcs_emulator(tmp_path) as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", str(endpoint))
        uri = "gs://testbucket/datasets/tiny"
        rows = {"image": [shards.png_bytes(np.full((4, 4), 9 * i, np.uint8)) for i in range(24)],
                "label": np.arange(24) % 3}
        shards.write_shards(rows, uri, 10, {"kind": "pixels", "image_size": 4, "channels": 1, "num_classes": 3})
        assert shards.verify_shards(uri)["count"] == 24
        cfg = DataConfig(source="parquet", uri=uri, image_size=4, num_classes=3, shuffle_buffer=0)
        assert data.resolve_dataset(cfg) == uri
        ys = [y for _, y in data.batches(data.build_dataset(cfg, uri, seed=0).iterator(), 4, cfg)]
        assert sorted(int(v) for b in ys for v in b) == sorted((np.arange(24) % 3).tolist())
