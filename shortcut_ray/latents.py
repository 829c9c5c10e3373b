"""Frozen VAE (diffusers AutoencoderKL) for latent-space runs: pixel shards -> latent shards, latents -> images.

ALGORITHM §3.4: the paper trains on SD-VAE (stabilityai/sd-vae-ft-mse) latents *sampled* from the
encoder posterior each step and multiplied by 0.18215, with the horizontal flip applied before
encoding. Caching the posterior (mean, logvar) of the image and of its flip, and sampling at load
time (`data.decode_batch`), is equivalent and encodes each image once. Stored as float16 bytes of
(C, H, W); logvar is already clamped to [-30, 20] by diffusers, well inside float16.

    vae = load_vae("stabilityai/sd-vae-ft-mse")          # or a local save_pretrained() folder
    encode_dataset("gs://b/celebahq-256", "gs://b/celebahq-256-sdvae", "stabilityai/sd-vae-ft-mse")
    images = decode(vae, z, latent_scale=0.18215)        # (B, 3, 256, 256) in [-1, 1]

Needs the optional extra: pip install 'shortcut-ray[latents]' (diffusers, safetensors).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch

from shortcut_ray import shards, storage

SD_VAE = "stabilityai/sd-vae-ft-mse"


def load_vae(name_or_path: str = SD_VAE, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen AutoencoderKL in eval mode (Hub id or local folder; the Hub needs network access)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("latent datasets need diffusers: pip install 'shortcut-ray[latents]'") from e
    vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype).to(device).eval()
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, logvar) of images x (B, 3, H, W) in [-1, 1]; each (B, C, H/f, W/f)."""
    p = next(vae.parameters())
    dist = vae.encode(x.to(p.device, p.dtype)).latent_dist
    return dist.mean, dist.logvar


@torch.no_grad()
def decode(vae, z: torch.Tensor, latent_scale: float = 0.18215) -> torch.Tensor:
    """Scaled latents z (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (divide by the scale first, §3.4)."""
    p = next(vae.parameters())
    return vae.decode(z.to(p.device, p.dtype) / latent_scale).sample.clamp(-1, 1).float()


def _fp16_bytes(t: torch.Tensor) -> list[bytes]:
    a = t.detach().to("cpu", torch.float16).numpy()
    return [np.ascontiguousarray(row).tobytes() for row in a]


class Encoder:
    """Ray Data callable class: PNG rows -> posterior rows of the image and its flip.

    One VAE per actor (loaded once in the constructor), on the GPU the actor was given, if any.
    """

    def __init__(self, vae_name: str, flip: bool = True):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_vae(vae_name, self.device)
        self.flip = flip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        imgs = []
        for b in batch["image"]:
            with Image.open(io.BytesIO(b)) as im:
                imgs.append(np.asarray(im.convert("RGB")))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        mean, logvar = encode_posterior(self.vae, x)
        out = {"mean": _fp16_bytes(mean), "logvar": _fp16_bytes(logvar)}
        if self.flip:  # flip before encoding (§3.4): the VAE is not flip-equivariant
            mean_f, logvar_f = encode_posterior(self.vae, x.flip(-1))
            out.update(mean_flip=_fp16_bytes(mean_f), logvar_flip=_fp16_bytes(logvar_f))
        out = {k: np.array(v, dtype=object) for k, v in out.items()}
        out["label"] = np.asarray(batch["label"], np.int64)
        return out


def encode_dataset(pixel_uri: str, out_uri: str, vae_name: str = SD_VAE, batch_size: int = 32,
                   shard_size: int = 5000, flip: bool = True, concurrency: int = 1,
                   num_gpus: float | None = None) -> dict:
    """Encode RGB pixel shards at pixel_uri into latent shards at out_uri; return the manifest.

    Runs on Ray Data (needs ray.init): `concurrency` VAE actors, each with `num_gpus` (default: 1 when
    the cluster has GPUs, else 0). The driver streams the rows into `shards.write_shards`.
    """
    import ray
    import ray.data

    info = shards.dataset_info(pixel_uri)
    if info["kind"] != "pixels" or info["channels"] != 3:
        raise ValueError(f"{pixel_uri} holds {info['kind']} with {info['channels']} channels; the VAE "
                         f"encodes RGB pixel shards (jobs.prepare_data --channels 3)")
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    fs, root = storage.filesystem(pixel_uri)
    paths = [storage.join_uri(root if storage.is_local_fs(fs) else pixel_uri, s["file"]) for s in info["shards"]]
    ds = ray.data.read_parquet(paths, filesystem=None if storage.is_local_fs(fs) else fs)
    enc = ds.map_batches(Encoder, fn_constructor_kwargs={"vae_name": vae_name, "flip": flip},
                         batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
                         num_gpus=num_gpus)
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(vae_name)
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    side = info["image_size"] // down
    shape = [int(cfg["latent_channels"]), side, side]

    def rows():
        for b in enc.iter_batches(batch_format="numpy", batch_size=256):
            for i in range(len(b["label"])):
                yield {k: b[k][i] for k in b}

    return shards.write_shards(rows(), out_uri, shard_size, {
        "kind": "latents", "image_size": side, "channels": shape[0], "num_classes": info["num_classes"],
        "classes": info["classes"], "latent_shape": shape, "vae": vae_name,
        "latent_scale": float(cfg.get("scaling_factor") or 0.18215),
        "source": pixel_uri, "source_image_size": info["image_size"]})


@functools.lru_cache(maxsize=2)
def _cached_vae(name_or_path: str, device: str):
    return load_vae(name_or_path, device=device)


def decode_for_display(z: torch.Tensor, data_cfg) -> np.ndarray:
    """Model outputs (scaled latents) -> images in [-1, 1] as (B, 3, H*8, W*8) numpy, for grids and FID."""
    vae = _cached_vae(data_cfg.vae, str(z.device))
    with torch.no_grad():
        out = torch.cat([decode(vae, z[i:i + 32].float(), data_cfg.latent_scale) for i in range(0, z.shape[0], 32)])
    return out.clamp(-1, 1).cpu().numpy()
