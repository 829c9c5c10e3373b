"""Frozen-VAE latents with a tiny randomly initialised diffusers AutoencoderKL (no download).

Checks the posterior/flip rows, the decode scaling, and (slow) pixel shards -> Ray Data VAE actors ->
latent shards -> the training pipeline's sampled latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shortcut_ray import data, shards
from shortcut_ray.config import ConfigError, DataConfig

diffusers = pytest.importorskip("diffusers", reason="latents need the optional extra: pip install 'shortcut-ray[latents]'")
latents = pytest.importorskip("shortcut_ray.latents")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=16)  # downsampling 2: 16 px -> 8x8x4
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


def test_encode_flip_and_decode_scaling(vae_dir):
    vae = latents.load_vae(vae_dir)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, logvar = latents.encode_posterior(vae, x)
    assert mean.shape == logvar.shape == (3, 4, 8, 8)
    enc = latents.Encoder(vae_dir)
    rows = enc({"image": np.array([shards.png_bytes(((a.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
                                   for a in x], dtype=object), "label": np.array([0, 1, 2])})
    assert set(rows) == {"mean", "logvar", "mean_flip", "logvar_flip", "label"}
    m0 = np.frombuffer(rows["mean"][0], np.float16).reshape(4, 8, 8)
    assert np.allclose(m0, mean[0].numpy(), atol=2e-2)  # PNG quantisation + fp16
    mf = np.frombuffer(rows["mean_flip"][0], np.float16).reshape(4, 8, 8)
    assert not np.allclose(mf, m0, atol=1e-2)  # flipped *before* encoding, not a flipped latent
    # decode divides by the scale first: decode(z * s, s) == vae.decode(z)
    z = torch.randn(2, 4, 8, 8)
    ref = vae.decode(z).sample.clamp(-1, 1)
    assert torch.allclose(latents.decode(vae, z * 0.18215, latent_scale=0.18215), ref, atol=1e-5)


@pytest.mark.slow
def test_encode_dataset_through_ray_and_train_pipeline(vae_dir, tmp_path):
    import ray

    rng = np.random.default_rng(0)
    pix = str(tmp_path / "pix")
    shards.write_shards({"image": [shards.png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(12)],
                       "label": np.arange(12) % 2}, pix, 5,
                      {"kind": "pixels", "image_size": 16, "channels": 3, "num_classes": 2})
    out = str(tmp_path / "lat")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        m = latents.encode_dataset(pix, out, vae_dir, batch_size=4, shard_size=8)
        assert (m["count"], m["latent_shape"], m["has_flip"], m["image_size"], m["channels"]) == (12, [4, 8, 8], True, 8, 4)
        assert m["class_counts"] == [6, 6] and shards.verify_shards(out)["kind"] == "latents"
        cfg = DataConfig(source="parquet", uri=out, kind="latents", image_size=8, channels=4, num_classes=2,
                         shuffle_buffer=0)
        assert data.resolve_dataset(cfg) == out
        with pytest.raises(ConfigError, match=r"--set data\.latent_scale=0\.18215"):
            data.resolve_dataset(DataConfig(source="parquet", uri=out, kind="latents", image_size=8,
                                            channels=4, num_classes=2, latent_scale=0.13025))
        got = [(x, y) for x, y in data.batches(data.build_dataset(cfg, out, seed=0).iterator(), 4, cfg)]
        assert len(got) == 3 and all(x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 for x, _ in got)
        assert sorted(int(v) for _, y in got for v in y) == [0] * 6 + [1] * 6
    finally:
        ray.shutdown()


def test_decode_for_display_uses_the_configured_vae(vae_dir):
    cfg = DataConfig(source="parquet", uri="unused", kind="latents", image_size=8, channels=4, vae=vae_dir)
    z = torch.randn(3, 4, 8, 8)
    images = latents.decode_for_display(z, cfg)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    ref = latents.decode(latents.load_vae(vae_dir), z, cfg.latent_scale).numpy()
    np.testing.assert_allclose(images, ref, atol=1e-5)
