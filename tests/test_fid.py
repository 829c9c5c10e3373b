"""Tests for shortcut_ray/fid.py: the FID protocol of ALGORITHM §5 and pitfall 19 of §8.

Fast CPU tests with tiny stand-in networks saved as TorchScript; the real Inception is only used
by the optional test at the end, which is skipped where its weights are absent (users, CI).
"""

import os
import socket
import sys
import types

import fsspec
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from shortcut_ray import fid
from shortcut_ray.fid import (FeatureStats, frechet_distance, gather_features, load_inception,
                              preprocess_for_inception, reference_stats_cache_key,
                              stats_from_batches)

REAL_WEIGHTS = "/work/shared/weights/fid_inception_v3.pt"
# The stand-in networks are saved with torch.jit, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class Probe(nn.Module):
    """Returns the first 2048 input values of each image: lets a test see what the network saw."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return x.flatten(1)[:, :2048]


class TinyNet(nn.Module):
    """A random (B,3,299,299) -> (B,2048) stand-in with parameters (for the fp16 and device paths)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=8)
        self.fc = nn.Linear(8 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(h.flatten(1))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    # Never touch the user's cache or the network from a test.
    monkeypatch.setenv(fid.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(fid.ENV_OFFLINE, "1")
    monkeypatch.delenv(fid.ENV_WEIGHTS, raising=False)


def _save_script(module: nn.Module, path) -> str:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


# ---------------------------------------------------------------- Frechet distance (§5)

def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d, eps = 16, 1e-6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps)))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariance_vs_eigendecomposition():
    rng = np.random.default_rng(1)
    d, eps = 24, 1e-6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # tr sqrtm(A B) = tr sqrtm(A^1/2 B A^1/2) for SPD A, B: eigh only, no scipy.linalg.sqrtm.
    w, v = np.linalg.eigh(s1 + eps * np.eye(d))
    a_half = v @ np.diag(np.sqrt(w)) @ v.T
    m = a_half @ (s2 + eps * np.eye(d)) @ a_half
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [400, 40])  # full-rank and rank-deficient (n < d) sample covariances
def test_frechet_distance_matches_scipy_sqrtm_reference(n):
    """The pytorch-fid / official computation: real part of scipy.linalg.sqrtm((S1+eps)(S2+eps))."""
    import scipy.linalg

    rng = np.random.default_rng(n)
    d, eps = 64, 1e-6
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    y = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.1
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm((s1 + eps * np.eye(d)) @ (s2 + eps * np.eye(d))))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # eps^2 I is near-singular
def test_offset_goes_inside_sqrtm_only():
    # Zero covariances: FD = -2 tr sqrtm(eps^2 I) = -2 d eps exactly when eps is only inside sqrtm.
    d = 8
    mu, zeros = np.ones(d), np.zeros((d, d))
    assert frechet_distance(mu, zeros, mu, zeros) == pytest.approx(-2 * d * 1e-6, rel=1e-9)
    assert frechet_distance(mu, zeros, mu, zeros, offset=0.0) == pytest.approx(0.0, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_covariance_unbiased():
    feats = np.random.default_rng(2).standard_normal((500, 32)) * 3 + 1
    s = FeatureStats.from_features(feats)
    assert s.n == 500
    np.testing.assert_allclose(s.sigma, np.cov(feats.T, ddof=1))
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-4
    shifted = FeatureStats.from_features(feats + 0.5)
    assert s.frechet_distance(shifted) == pytest.approx(32 * 0.25, rel=1e-4)


def test_frechet_distance_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same network"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- preprocessing (pitfall 19)

def _expected_input(x):
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    y = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    return y.clamp(-1, 1)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 28, 28), (1, 3, 400, 320)])
def test_preprocess_is_bilinear_299_no_antialias_then_clip(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1.5  # beyond [-1, 1]
    y = preprocess_for_inception(x)
    assert y.shape == (shape[0], 3, 299, 299)
    assert y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(y, _expected_input(x), rtol=0, atol=0)
    if shape[2] > 299:  # downsampling: an antialiased resize would differ
        aa = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        assert not torch.allclose(y, aa.clamp(-1, 1), atol=1e-3)


def test_grayscale_is_replicated_to_three_channels():
    y = preprocess_for_inception(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])


def test_input_range_maps_minus_one_one_linearly():
    tf_range = (-1.0, 0.9921875)  # the TF/fid-helper convention, opt-in
    for value, expected in [(-1.0, -1.0), (0.0, -0.00390625), (1.0, 0.9921875)]:
        y = preprocess_for_inception(torch.full((1, 3, 4, 4), value), tf_range)
        torch.testing.assert_close(y, torch.full_like(y, expected))
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(preprocess_for_inception(x), _expected_input(x), rtol=0, atol=0)


def test_extractor_feeds_the_network_exactly_the_preprocessed_images(tmp_path):
    ext = load_inception(_save_script(Probe(), tmp_path / "probe.pt"), batch_size=3)
    x = torch.rand(7, 1, 28, 28) * 2.4 - 1.2
    feats = ext(x)  # 7 images in batches of 3, 3, 1
    assert feats.shape == (7, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _expected_input(x).flatten(1)[:, :2048], rtol=0, atol=0)


def test_extractor_rejects_uint8_and_wrong_channels(tmp_path):
    ext = load_inception(_save_script(Probe(), tmp_path / "probe.pt"))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ext(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3"):
        ext(torch.zeros(1, 4, 8, 8))


# ---------------------------------------------------------------- loading weights

def test_fp16_torchscript_is_cast_to_float32(tmp_path):
    path = tmp_path / "tiny_fp16.pt"
    torch.manual_seed(0)
    net = TinyNet()
    ref = load_inception(_save_script(net, tmp_path / "tiny.pt"))
    torch.jit.save(torch.jit.script(net.half()), str(path))
    ext = load_inception(str(path))
    assert all(p.dtype == torch.float32 for p in ext.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = ref(x), ext(x)
    assert b.dtype == torch.float32
    assert ((a - b).norm() / a.norm()).item() < 1e-2
    assert ext.weights_id.startswith("tiny_fp16.pt:") and ext.weights_id != ref.weights_id


def test_fsspec_uri_is_copied_to_the_cache(tmp_path):
    local = _save_script(Probe(), tmp_path / "probe.pt")
    with open(local, "rb") as f, fsspec.open("memory://bucket/probe.pt", "wb") as g:
        g.write(f.read())
    ext = load_inception("memory://bucket/probe.pt")
    assert ext(torch.zeros(1, 3, 8, 8)).shape == (1, 2048)
    assert any(name.endswith("probe.pt") for name in os.listdir(tmp_path / "cache" / "copies"))


def test_env_var_names_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(fid.ENV_WEIGHTS, _save_script(Probe(), tmp_path / "probe.pt"))
    assert load_inception().weights_id.startswith("probe.pt:")


def test_offline_without_weights_says_what_to_pass():
    with pytest.raises(RuntimeError) as err:
        load_inception()
    assert "--set eval.fid_weights=" in str(err.value) and fid.ENV_WEIGHTS in str(err.value)


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.fid_weights"):
        load_inception(str(tmp_path / "nope.pt"))


def test_pytorch_fid_state_dict_through_the_optional_package(tmp_path, monkeypatch):
    # A fake `pytorch_fid.inception` with the real one's structure: InceptionV3([3], ...) builds
    # the net via module-level load_state_dict_from_url(FID_WEIGHTS_URL) and returns a list.
    class FakeInceptionV3(nn.Module):
        def __init__(self, output_blocks, resize_input=True, normalize_input=True):
            super().__init__()
            assert list(output_blocks) == [3] and not resize_input and not normalize_input
            self.body = TinyNet()
            self.body.load_state_dict(mod.load_state_dict_from_url("https://example/fid.pth"))

        def forward(self, x):
            return [self.body(x).view(x.shape[0], 2048, 1, 1)]

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when given a file")

    mod = types.ModuleType("pytorch_fid.inception")
    mod.InceptionV3, mod.load_state_dict_from_url = FakeInceptionV3, no_download
    pkg = types.ModuleType("pytorch_fid")
    pkg.inception = mod
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)
    torch.manual_seed(0)
    net = TinyNet()
    torch.save(net.state_dict(), tmp_path / "pt_inception-2015-12-05-test.pth")
    ext = load_inception(str(tmp_path / "pt_inception-2015-12-05-test.pth"))
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ext(x), net(x))
    assert mod.load_state_dict_from_url is no_download  # restored


# ---------------------------------------------------------------- stats, keys, gathering

@pytest.mark.parametrize("where", ["local", "memory"])
def test_stats_save_load_roundtrip(tmp_path, where):
    s = FeatureStats.from_features(np.random.default_rng(3).standard_normal((50, 6)))
    uri = str(tmp_path / "sub" / "ref.npz") if where == "local" else "memory://stats/ref.npz"
    s.save(uri)
    t = FeatureStats.load(uri)
    np.testing.assert_array_equal(t.mu, s.mu)
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert t.n == 50
    if where == "local":
        assert set(np.load(uri).files) == {"mu", "sigma", "n"}


def test_stats_from_batches_respects_max_images(tmp_path):
    ext = load_inception(_save_script(Probe(), tmp_path / "probe.pt"))
    data = [torch.rand(4, 1, 8, 8) * 2 - 1 for _ in range(3)]
    batches = [(x, torch.zeros(4)) for x in data]  # (images, labels) pairs are accepted
    s = stats_from_batches(ext, batches, max_images=10)
    expected = FeatureStats.from_features(ext(torch.cat(data)[:10]).double().numpy())
    assert s.n == 10
    np.testing.assert_allclose(s.mu, expected.mu)
    np.testing.assert_allclose(s.sigma, expected.sigma)


def test_cache_key_changes_with_every_input():
    base = reference_stats_cache_key("gs://b/fashion-mnist/train", 28, "fid_inception_v3.pt:a16e4d89c0ec")
    assert base.startswith("fidstats-train-28px-fid_inception_v3.pt-")
    assert base == reference_stats_cache_key("gs://b/fashion-mnist/train/", 28,
                                             "fid_inception_v3.pt:a16e4d89c0ec")
    others = [reference_stats_cache_key("gs://b/fashion-mnist/test", 28, "fid_inception_v3.pt:a16e4d89c0ec"),
              reference_stats_cache_key("gs://b/fashion-mnist/train", 32, "fid_inception_v3.pt:a16e4d89c0ec"),
              reference_stats_cache_key("gs://b/fashion-mnist/train", 28, "fid_inception_v3_fp16.pt:05ba"),
              reference_stats_cache_key("gs://b/fashion-mnist/train", 28, "fid_inception_v3.pt:a16e4d89c0ec",
                                        vae_roundtrip=True)]
    assert len({base, *others}) == 5


def test_gather_features_is_identity_without_process_group():
    x = torch.randn(3, 2048)
    assert gather_features(x) is x


def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = torch.full((rank + 1, 4), float(rank))  # uneven: rank r holds r + 1 rows
        torch.save(gather_features(local), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_features_uneven_counts_over_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: the children need not re-import torch (seconds on a busy 2-core machine).
    mp.start_processes(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    expected = torch.tensor([[0.0] * 4, [1.0] * 4, [1.0] * 4])
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"{rank}.pt"), expected)


# ---------------------------------------------------------------- the real network (optional)

@pytest.mark.skipif(not os.path.exists(REAL_WEIGHTS), reason="real FID weights not on this machine")
def test_real_inception_outputs_2048_features():
    ext = load_inception(REAL_WEIGHTS)
    feats = ext(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
