"""storage.py on a real local filesystem and fsspec's memory:// (gs:// runs in tests/test_e2e.py)."""

import os
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

from shortcut_ray import storage


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(storage.ENV_CACHE_DEPRECATED, raising=False)


def _mem(name: str) -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}/{name}"


def test_filesystem_resolution(monkeypatch, tmp_path):
    fs, path = storage.filesystem(str(tmp_path))
    assert storage.is_local_fs(fs) and path == str(tmp_path)
    assert storage.filesystem("file://" + str(tmp_path))[1] == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.filesystem("~/x")[1] == str(tmp_path / "x")
    fs, path = storage.filesystem("memory://bucket/ds")
    assert "memory" in fs.protocol and path.endswith("bucket/ds")
    assert not storage.is_remote("file:///a") and not storage.is_remote("rel/path") and storage.is_remote("gs://b/p")
    monkeypatch.delenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:1")
    fs, path = storage.filesystem("gs://bucket/prefix/")
    assert path == "bucket/prefix" and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert type(fs).__module__ == "gcsfs.core"  # not the HNS-probing subclass (RAY_NOTES §2)


def test_pyarrow_filesystem(tmp_path):
    assert storage.pyarrow_filesystem(str(tmp_path / "runs")) == (None, str(tmp_path / "runs"))
    uri = _mem("runs")
    storage.atomic_write(uri + "/a.txt", "hi")
    fs, path = storage.pyarrow_filesystem(uri)
    assert isinstance(fs, pafs.PyFileSystem)
    with fs.open_input_stream(path + "/a.txt") as f:  # Ray reads run storage through this
        assert f.read() == b"hi"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_roundtrip(tmp_path, where):
    uri = str(tmp_path / "sub" / "f.bin") if where == "local" else _mem("sub/f.bin")
    storage.atomic_write(uri, b"\x00\x01")
    storage.atomic_write(uri, "text")  # replaces
    fs, path = storage.filesystem(uri)
    assert fs.cat_file(path) == b"text" and storage.exists(uri)
    if where == "local":
        assert os.listdir(tmp_path / "sub") == ["f.bin"]  # no temp file left


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "ckpt"
    with storage.atomic_dir(str(final)) as d:
        open(os.path.join(d, "a"), "w").close()
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(str(final)) as d:
            open(os.path.join(d, "b"), "w").close()
            raise RuntimeError("crash mid-write")
    assert os.listdir(final) == ["a"]  # the failed write left the old directory intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # and no temp directory behind


def test_local_copy_of_files_and_directories(tmp_path):
    local = tmp_path / "w.pt"
    local.write_bytes(b"w")
    assert storage.local_copy(str(local)) == str(local)  # local: no copy
    with pytest.raises(FileNotFoundError):
        storage.local_copy(str(tmp_path / "missing"))
    f_uri, d_uri = _mem("w.pt"), _mem("checkpoint_0000010")
    storage.atomic_write(f_uri, b"weights")
    storage.atomic_write(d_uri + "/state.json", "{}")
    storage.atomic_write(d_uri + "/sub/__0_0.distcp", b"x")
    f = storage.local_copy(f_uri)
    assert open(f, "rb").read() == b"weights" and f.startswith(str(tmp_path / "cache" / "copies"))
    d = storage.local_copy(d_uri)
    assert sorted(os.listdir(d)) == ["state.json", "sub"] and os.listdir(os.path.join(d, "sub")) == ["__0_0.distcp"]
    fsspec.filesystem("memory").rm(f_uri.removeprefix("memory://"))
    assert storage.local_copy(f_uri) == f  # cached: the source is not read again
    with pytest.raises(FileNotFoundError):
        storage.local_copy(_mem("nothing"))


def test_one_cache_root_with_deprecated_fallback(tmp_path, monkeypatch):
    assert storage.cache_root() == str(tmp_path / "cache")
    assert storage.cache_root("gs://b/cache") == "gs://b/cache"  # datasets may be cached remotely
    monkeypatch.delenv(storage.ENV_CACHE)
    monkeypatch.setenv(storage.ENV_CACHE_DEPRECATED, str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match=storage.ENV_CACHE):
        assert storage.cache_root() == str(tmp_path / "old")
    monkeypatch.setenv(storage.ENV_CACHE, "memory://cache")  # remote root: local copies go to the default
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.local_cache_dir("copies") == str(tmp_path / "home" / ".cache" / "shortcut_ray" / "copies")


def test_checkpoint_dir_gives_every_reader_its_own_download(tmp_path):
    """Ray's Checkpoint.as_directory() shares one download folder per node, and a reader that comes after the
    first download finished downloads again into the folder the first is reading (two ranks resuming from
    gs:// read a truncated DCP .metadata in CI). storage.checkpoint_dir: a private copy per reader, removed
    afterwards; a local checkpoint is read in place."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from shortcut_ray.storage import checkpoint_dir

    src = tmp_path / "checkpoint_0000010"
    src.mkdir()
    (src / ".metadata").write_bytes(b"x" * 1000)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())  # not a LocalFileSystem
    ckpt = Checkpoint("checkpoint_0000010", filesystem=remote)
    with ckpt.as_directory() as shared_a, ckpt.as_directory() as shared_b:
        assert shared_a == shared_b  # Ray's: the same folder for both readers (the second re-downloads into it)
    with checkpoint_dir(ckpt) as a, checkpoint_dir(ckpt) as b:
        assert a != b and str(src) not in (a, b)
        assert (Path(a) / ".metadata").read_bytes() == (Path(b) / ".metadata").read_bytes() == b"x" * 1000
    assert not Path(a).exists() and not Path(b).exists()
    with checkpoint_dir(Checkpoint(str(src))) as local:
        assert local == str(src)
    assert src.exists()
