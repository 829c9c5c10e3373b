"""python -m jobs.prepare_data --input SRC --output URI --image-size 64 [--format auto|idx|imagefolder|parquet]

Converts images into the project's shard format (Parquet `part-XXXXX.parquet` + `manifest.json`, see
shortcut_ray/data.py) at any local path or fsspec URI (gs://bucket/prefix ...). SRC is an MNIST /
Fashion-MNIST IDX folder, an ImageFolder tree (root/<class>/<images>) or Parquet with an encoded-image
column. Images are centre-cropped and resized to --image-size by Ray Data tasks in parallel; on a
cluster: `ray job submit --working-dir . -- python -m jobs.prepare_data ...`.
Unreadable images are reported by path and skipped (counted in the manifest), or with
`--on-error fail` stop the job with a non-zero exit. Examples:

    python -m jobs.prepare_data --input /usr/share/datasets/fashion-mnist --output gs://b/fmnist-32 --image-size 32
    python -m jobs.prepare_data --input ~/celeba_hq/ --output gs://b/celebahq-256 --image-size 256 --channels 3
    python -m jobs.prepare_data --input hf_train.parquet --output ./data/pets-64 --image-size 64 --label-column label
"""

from __future__ import annotations

import argparse
import os
import sys

from shortcut_ray import prepare


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare_data",
                                description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--input", required=True, help="IDX folder, ImageFolder root, or Parquet file/folder (path or URI)")
    p.add_argument("--output", required=True, help="where the shards go: a local dir or fsspec URI (gs://...)")
    p.add_argument("--image-size", type=int, required=True, help="side of the square output images")
    p.add_argument("--format", default="auto", choices=("auto", "idx", "imagefolder", "parquet", "digits"),
                   help="digits: scikit-learn's bundled digits (--input is ignored; use --input sklearn)")
    p.add_argument("--vae", default="", help="also encode the prepared images to a latent dataset with this VAE "
                                              "(e.g. stabilityai/sd-vae-ft-mse or a local folder) at --latent-output")
    p.add_argument("--latent-output", default="", help="where the latent shards go (with --vae)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB); default 1 for IDX, 3 otherwise")
    p.add_argument("--shard-size", type=int, default=5000, help="images per Parquet shard")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="unreadable images: skip and count them (default) or fail the job")
    p.add_argument("--split", default="train", choices=("train", "test"), help="IDX split (train or t10k files)")
    p.add_argument("--image-column", default="image", help="Parquet input: encoded-image column")
    p.add_argument("--label-column", default="label", help="Parquet input: label column (ints or names); "
                                                          "absent -> one class")
    p.add_argument("--class-names", default="", help="comma-separated class names, in label order")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="write rows in a seeded random order so every shard mixes the classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here (default: all)")
    args = p.parse_args(argv)
    if args.image_size < 1 or args.shard_size < 1:
        p.error("--image-size and --shard-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.format == "digits":  # the embedded default: small, written directly without Ray
        from shortcut_ray.shards import write_digits

        manifest = write_digits(args.output, args.image_size)
        print(f"{args.output}: {manifest['count']} images, {manifest['num_classes']} classes (sklearn digits)")
        return 0
    import ray

    fmt = prepare.detect_format(args.input) if args.format == "auto" else args.format
    if args.address or os.environ.get("RAY_ADDRESS"):  # under `ray job submit` RAY_ADDRESS is set
        ray.init(address=args.address)
    else:  # "local": a fresh Ray, never a stale /tmp/ray/ray_current_cluster (RAY_NOTES §1, misc)
        ray.init(address="local", num_cpus=args.num_cpus)
    try:
        manifest = prepare.prepare(
            fmt, args.input, args.output, args.image_size, channels=args.channels,
            shard_size=args.shard_size, on_error=args.on_error, split=args.split,
            image_column=args.image_column, label_column=args.label_column,
            class_names=[c.strip() for c in args.class_names.split(",")] if args.class_names else None,
            shuffle=args.shuffle, seed=args.seed)
    except (prepare.PrepareError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"{args.output}: {manifest['count']} images, {manifest['num_classes']} classes, "
          f"{args.image_size}px x {manifest['channels']}ch, {len(manifest['shards'])} shards, "
          f"{manifest['skipped']} skipped")
    if args.vae:  # ALGORITHM §3.4: posterior (mean, logvar) of each image and its flip, fp16
        from shortcut_ray.latents import encode_dataset

        if not args.latent_output:
            print("prepare_data: error: --vae needs --latent-output URI", file=sys.stderr)
            return 2
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=args.num_cpus)
        try:
            lat = encode_dataset(args.output, args.latent_output, args.vae, shard_size=args.shard_size)
        finally:
            ray.shutdown()
        print(f"{args.latent_output}: {lat['count']} latents {lat.get('latent_shape')} (VAE {args.vae})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
