r"""Sample images from a checkpoint at any step count and guidance scale.

    python -m jobs.sample runs/digits-shortcut-.../checkpoint_0001500 --steps 1,4,128 --out samples/
    python -m jobs.sample gs://BUCKET/runs/RUN/checkpoint_0020000 --steps 1 --n 64 --cfg-scale 1.5 --labels 3
    python -m jobs.sample CKPT --steps 3 --images     # one PNG per sample instead of a grid
    python -m jobs.sample CKPT --steps 1,128 --raw    # N{n}.npy in model space (latents not decoded)
    python -m jobs.sample CKPT/weights.safetensors --steps 1,4   # the portable export (no pickle)

The same noise (--seed) is used for every step count, so grids at different N compare sample by
sample. Any integer N in 1..M is accepted (non-powers of two use the rule in shortcut_ray/sampler.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from shortcut_ray.checkpoint import load_for_inference, local_copy  # PermanentError when missing
from shortcut_ray.faults import PermanentError
from shortcut_ray.objectives import for_sampling
from shortcut_ray.sampler import fixed_noise, sample
from shortcut_ray.figures import image_grid
from shortcut_ray.shards import png_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or URI (…/checkpoint_NNNNNNN; remote ones are copied to the cache)")
    p.add_argument("--steps", default="1,2,4,8,16,32,64,128", help="comma-separated step counts N")
    p.add_argument("--n", type=int, default=64, help="samples per step count")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance w (1 = conditional, 0 = unconditional)")
    p.add_argument("--labels", default="", help="comma-separated class ids cycled over samples (default: all classes)")
    p.add_argument("--weights", default="auto", choices=("auto", "online", "ema"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="samples")
    p.add_argument("--images", action="store_true", help="write one PNG per sample instead of a grid")
    p.add_argument("--raw", action="store_true", help="write N{n}.npy, the (B, C, H, W) samples in model space "
                                                      "(latents undecoded, any channel count), instead of PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        model, cfg, meta = load_for_inference(local_copy(args.checkpoint), args.weights)
    except PermanentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.to(args.device)
    d = cfg.data
    noise = fixed_noise((args.n, d.channels, d.image_size, d.image_size), args.seed, args.device)
    classes = [int(c) for c in args.labels.split(",") if c] or list(range(d.num_classes))
    if not cfg.objective.class_conditional:
        classes = [d.num_classes]
    y = torch.tensor([classes[i % len(classes)] for i in range(args.n)], device=args.device)
    os.makedirs(args.out, exist_ok=True)
    for n in (int(s) for s in args.steps.split(",")):
        x = sample(model, noise, y, n, args.cfg_scale, d.num_classes, cfg.objective.denoise_timesteps,
                   objective=for_sampling(cfg)).cpu()
        if args.raw:
            np.save(os.path.join(args.out, f"N{n:03d}.npy"), x.numpy())
            print(f"wrote {os.path.join(args.out, f'N{n:03d}.npy')} {tuple(x.shape)} (N={n}, w={args.cfg_scale})")
            continue
        if d.kind == "latents":
            from shortcut_ray.latents import decode_for_display

            images = decode_for_display(x, d)
        else:
            images = x.numpy()
        if args.images:
            for i, img in enumerate(images):
                with open(os.path.join(args.out, f"N{n:03d}_{i:05d}.png"), "wb") as f:
                    f.write(png_bytes(image_grid(img[None], 1)[1:-1, 1:-1]))
        else:
            path = os.path.join(args.out, f"N{n:03d}.png")
            with open(path, "wb") as f:
                f.write(png_bytes(image_grid(images, int(np.ceil(np.sqrt(args.n))))))
            print(f"wrote {path} (step {meta['step']}, {meta['weights']} weights, N={n}, w={args.cfg_scale})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
