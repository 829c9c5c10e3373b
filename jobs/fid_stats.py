r"""Reference FID statistics (mu, sigma of InceptionV3 pool features) of a dataset, cached by dataset,
resolution and weights.

    python -m jobs.fid_stats --preset fashion_mnist_dit_s --fid-weights /path/fid_inception_v3.pt
    python -m jobs.fid_stats --preset digits --fid-weights gs://BUCKET/fid_inception_v3.pt --max-images 1797
    # then: python -m jobs.train ... --set eval.fid_ref_stats=<printed path>

Images come through the training pipeline's decode (Ray Data), without random flips, in [-1, 1]; the
same resize/clip/network as the generated samples (ALGORITHM §5). Raw images, not a VAE round trip.
"""

from __future__ import annotations

import argparse
import sys

from shortcut_ray.config import apply_overrides, override
from shortcut_ray.presets import get_preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--fid-weights", default="", help="InceptionV3 weights (path/URI); default: $SHORTCUT_FID_WEIGHTS "
                                                     "or the standard download")
    p.add_argument("--max-images", type=int, default=0, help="0 = the whole dataset")
    p.add_argument("--out", default="", help="where to write the .npz (default: the cache, keyed by dataset)")
    p.add_argument("--device", default="")
    args = p.parse_args(argv)
    import torch

    from shortcut_ray import data, storage
    from shortcut_ray.fid import load_inception, reference_stats_cache_key, stats_from_batches
    from shortcut_ray.launch import ensure_ray

    cfg = apply_overrides(get_preset(args.preset), args.set)
    if cfg.data.kind != "pixels":
        p.exit(2, "error: reference statistics are computed on images; point --set data.uri at the pixel shards\n")
    dcfg = override(cfg, {"data.random_flip": False}).data
    uri = data.resolve_dataset(dcfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = load_inception(args.fid_weights or None, device=device)
    key = reference_stats_cache_key(uri, dcfg.image_size, extractor.weights_id, max_images=args.max_images or None,
                                    vae_roundtrip=False)
    out = args.out or storage.join_uri(storage.cache_root(), f"fid_stats/{key}.npz")
    if not args.out and storage.exists(out):
        print(f"cached: {out}")
        return 0
    ensure_ray()
    ds = data.build_dataset(dcfg, uri, seed=0)
    batches = (b["image"] for b in ds.iter_torch_batches(batch_size=256))
    stats = stats_from_batches(extractor, batches, max_images=args.max_images or None, gather=False)
    stats.save(out)
    print(f"{stats.n} images of {uri} -> {out}\nuse: --set eval.fid_ref_stats={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
