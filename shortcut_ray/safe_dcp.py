"""Load DCP checkpoints without running code from them.

torch.distributed.checkpoint (2.13) unpickles `<dir>/.metadata` with `pickle.load` and non-tensor
entries (optimiser param groups) with `torch.load(weights_only=False)`: a crafted checkpoint runs
arbitrary code the moment it is loaded (jobs.sample, jobs.evaluate, --resume, train.resume_from).
`SafeReader` unpickles the metadata through an allow-list of the classes a DCP checkpoint holds
(DCP's metadata dataclasses, torch.Size, dtypes, layouts, paths); `SafePlanner` reads non-tensor
entries with `weights_only=True` (tensor shards already are). Anything else is refused with
`UntrustedCheckpointError` before it is constructed.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

from .faults import PermanentError

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout by name, e.g. "torch.strided"
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class UntrustedCheckpointError(PermanentError):
    """The checkpoint holds something a DCP checkpoint never does (it could run code on load)."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UntrustedCheckpointError(
            f"refusing to load {self.where}: it refers to {module}.{name}, which a shortcut-ray (DCP) checkpoint "
            f"never holds, and unpickling it could run code. Load only checkpoints you trust; for weights "
            f"from elsewhere use the portable weights.safetensors export.")


def read_metadata(file, where: str):
    """Unpickle DCP metadata through the allow-list."""
    try:
        return _MetadataUnpickler(file, where).load()
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # truncated / not a pickle
        raise PermanentError(f"{where} is not a readable DCP metadata file ({type(e).__name__}: {e}); "
                             f"the checkpoint is incomplete or corrupt: use an earlier one") from None


class SafeReader(FileSystemReader):
    refused: PermanentError | None = None  # DCP turns reader errors into strings: keep the typed one

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = read_metadata(f, str(path))
            except PermanentError as e:
                self.refused = e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    refused: PermanentError | None = None

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = UntrustedCheckpointError(
                f"refusing to load entry {read_item.dest_index.fqn} of the checkpoint: {e}. Load only "
                f"checkpoints you trust.")
            raise self.refused from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every single-process save or load; here that mode is chosen (checkpoint.dcp_coordinated)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def load(state: dict, path: str, no_dist: bool) -> None:
    """dcp.load with the safe reader and planner."""
    import torch.distributed.checkpoint as dcp

    reader, planner = SafeReader(path), SafePlanner()
    try:
        with single_process_quiet():
            dcp.load(state, checkpoint_id=path, storage_reader=reader, planner=planner, no_dist=no_dist)
    except BaseException:  # DCP's CheckpointException is a BaseException
        refused = reader.refused or planner.refused
        if refused is not None:
            raise refused from None
        raise


def read_all(path: str) -> dict:
    """Every entry of a DCP checkpoint as one flat dict {"model.blocks.0.attn.qkv.weight": tensor,
    "optim.param_groups.0.params": [...], ...}, read through the safe reader and planner (`load`: refusals
    keep their type). Whole, in this process: for conversions of small and legacy checkpoints, not for the
    training path."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = SafeReader(path).read_metadata()
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
            for k, m in md.state_dict_metadata.items()}
    load(flat, path, no_dist=True)
    return flat
