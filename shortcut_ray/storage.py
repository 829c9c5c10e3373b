"""URIs: the one place that tells a local path from a remote object prefix. Ray-free, mlflow-free.

Every path in a Config (data.uri, train.storage_path, eval.fid_weights, checkpoints) may be a local
path, a file:// URL or any fsspec URI (gs://bucket/prefix, s3://..., memory://...). This module gives

    is_remote(uri)            True for anything but a local path / file:// URL
    filesystem(uri)           (fsspec filesystem, path inside it); gs:// through gcsfs (emulator aware)
    exists(uri), join_uri(uri, name), is_local_fs(fs)
    pyarrow_filesystem(uri)   (pyarrow filesystem or None, path) for Ray's storage_path / Checkpoint
    local_copy(uri)           a local path for a file or directory; remote ones are copied to the cache
    cache_root()              $SHORTCUT_RAY_CACHE (may be a URI), else ~/.cache/shortcut_ray
    atomic_write(path, data)  readers see all of a file or nothing (local temp file + rename, or one
                              object upload); atomic_dir(final) does the same for a directory
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings

ENV_CACHE = "SHORTCUT_RAY_CACHE"
ENV_CACHE_DEPRECATED = "SHORTCUT_CACHE_DIR"  # the FID loader's old name, still read (with a warning)
DEFAULT_CACHE = "~/.cache/shortcut_ray"


def is_remote(uri: str) -> bool:
    uri = os.fspath(uri)
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """Absolute local path of a local path or file:// URL (~ expanded)."""
    return os.path.abspath(os.path.expanduser(os.fspath(uri).removeprefix("file://")))


def join_uri(uri: str, name: str) -> str:
    return os.fspath(uri).rstrip("/") + "/" + name


def is_local_fs(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _gcs_filesystem():
    """gcsfs, pointed at $STORAGE_EMULATOR_HOST when set (tests, local dev; anonymous).

    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT defaults to "false" here (unless the user set it): gcsfs 2026.x
    otherwise probes the storage-control gRPC API on first use of each bucket, which cost minutes
    against the emulator and broke a later ray.init (RAY_NOTES §2).
    """
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() in ("false", "0", "no"):
        # The core class: `gcsfs.GCSFileSystem` is the HNS-probing subclass if gcsfs was imported
        # before the variable was set (e.g. by another library).
        from gcsfs.core import GCSFileSystem
    else:
        from gcsfs import GCSFileSystem
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and emulator != "default":
        if "://" not in emulator:
            emulator = "http://" + emulator
        return GCSFileSystem(endpoint_url=emulator, token="anon")
    return GCSFileSystem()


def filesystem(uri: str):
    """(fsspec filesystem, path inside it) for a local path or any fsspec URI."""
    uri = os.fspath(uri)
    if uri.startswith(("gs://", "gcs://")):
        return _gcs_filesystem(), uri.split("://", 1)[1].rstrip("/")
    if not is_remote(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), local_path(uri)
    import fsspec

    return fsspec.core.url_to_fs(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem or None, path) for Ray's storage_path / Checkpoint.

    gs:// goes through gcsfs wrapped in a pyarrow PyFileSystem: pyarrow's native GCS client ignores
    STORAGE_EMULATOR_HOST and hung against the emulator (RAY_NOTES §1d, §2).
    """
    if not is_remote(uri):
        return None, local_path(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# -- cache -------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | None = None) -> str:
    """Where built-in datasets, FID weights and copies of remote files go: `cache_dir`, else
    $SHORTCUT_RAY_CACHE (else the deprecated $SHORTCUT_CACHE_DIR), else ~/.cache/shortcut_ray.

    May be a URI: on a multi-node cluster datasets must be on shared storage (e.g. gs://bucket/cache),
    because Ray Data read tasks run on any node. Local copies then go to `local_cache_dir()`.
    """
    root = cache_dir or os.environ.get(ENV_CACHE)
    if not root and os.environ.get(ENV_CACHE_DEPRECATED):
        warnings.warn(f"${ENV_CACHE_DEPRECATED} is deprecated; set ${ENV_CACHE} instead", DeprecationWarning,
                      stacklevel=2)
        root = os.environ[ENV_CACHE_DEPRECATED]
    root = root or DEFAULT_CACHE
    return root if is_remote(root) else local_path(root)


def local_cache_dir(*parts: str) -> str:
    """A local directory under the cache root (the default local root when the cache root is remote)."""
    root = cache_root()
    path = os.path.join(local_path(DEFAULT_CACHE) if is_remote(root) else root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def local_copy(uri: str) -> str:
    """A local path holding the file or directory at `uri`. Local paths are returned as they are
    (FileNotFoundError if missing); remote ones are copied once into local_cache_dir("copies") and
    reused. The copy appears atomically, so concurrent ranks never see half of it."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        return path
    name = os.path.basename(uri.rstrip("/")) or "file"
    dest = os.path.join(local_cache_dir("copies"), f"{hashlib.sha1(uri.encode()).hexdigest()[:12]}-{name}")
    if os.path.exists(dest):
        return dest
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
    if not fs.isdir(path):
        tmp = f"{dest}.part-{os.getpid()}"
        fs.get(path, tmp)
        os.replace(tmp, dest)
        return dest
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    try:
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
        os.replace(tmp, dest)
    except OSError:
        if not os.path.isdir(dest):  # not another process's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- atomic writes -----------------------------------------------------------------------------------

def atomic_write(path_or_uri: str, data: bytes | str, fs=None) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Local files: a temp file beside it, fsync, rename. Object stores (GCS, S3) make a single-object
    upload visible atomically anyway. `fs`: the fsspec filesystem `path_or_uri` is a path in (else
    resolved from the URI). Parent directories are created.
    """
    if fs is None:
        fs, path_or_uri = filesystem(path_or_uri)
    data = data.encode() if isinstance(data, str) else data
    if not is_local_fs(fs):
        fs.pipe_file(path_or_uri, data)
        return
    os.makedirs(os.path.dirname(path_or_uri) or ".", exist_ok=True)
    tmp = f"{path_or_uri}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path_or_uri)


@contextlib.contextmanager
def checkpoint_dir(ckpt):
    """A local folder holding a Ray Train `Checkpoint` (duck-typed: .path, .filesystem, .to_directory): the
    folder itself on a local filesystem, else a download private to this process, removed afterwards.

    Not `Checkpoint.as_directory()`: its download is shared by the processes of a node, and a worker that
    arrives after the first download finished takes the free lock and downloads again into the folder the
    first is already reading, truncating DCP's .metadata under it (seen in CI: "EOFError: Ran out of input"
    when two ranks resumed from gs://)."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    tmp = tempfile.mkdtemp(prefix="shortcut-restore-")
    try:
        yield ckpt.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str):
    """Yield a temp directory beside `final_dir`; on success it replaces `final_dir` in one rename,
    on error it is removed. A reader never sees a half-written `final_dir`."""
    final_dir = local_path(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
