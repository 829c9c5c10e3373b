r"""Import a checkpoint of the authors' JAX code (kvfrans/shortcut-models) as a shortcut-ray checkpoint.

    python -m jobs.import_official celeba-dit-b.pkl --recipe celebahq256_dit_b --out imported/celeba_dit_b
    python -m jobs.import_official gs://BUCKET/imagenet256-dit-xl.pkl --recipe imagenet256_dit_xl \
        --out gs://BUCKET/imported/imagenet_dit_xl --set data.uri=gs://BUCKET/imagenet256-latents
    python -m jobs.import_official ckpt.pkl --heads 12 --image-size 32 --train-type shortcut --out imported/x

The pickle is read without running code from it (shortcut_ray/official.py). The model's shape comes
from the parameter tree; heads, image size, train type and conditioning from --recipe or the flags
(flags win), everything else from the recipe (the preset of the same name) and --set. The output is a
step-0 checkpoint (online + EMA weights, a fresh optimiser) for jobs.sample, jobs.evaluate and
`jobs.train --preset RECIPE --set train.resume_from=OUT` (fine-tuning).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from shortcut_ray.config import ConfigError


def _write(out: str, model, ema, cfg, extra: dict) -> str:
    """A local directory (atomically) or an fsspec URI (written locally, then uploaded)."""
    from shortcut_ray import checkpoint, storage
    from shortcut_ray.optim import build_optimizer

    optimizer = build_optimizer(model.parameters(), cfg.optim)  # fresh: fine-tuning starts at step 0
    if not storage.is_remote(out):
        return checkpoint.save_local_atomic(storage.local_path(out), model, ema, optimizer, 0, cfg, extra=extra)
    fs, path = storage.filesystem(out)
    with tempfile.TemporaryDirectory(prefix="shortcut-import-") as tmp:
        checkpoint.save(tmp, model, ema, optimizer, 0, cfg, extra=extra)
        fs.put(tmp.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    return out


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv=None) -> int:
    from shortcut_ray import official

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="official checkpoint: the pickle (or train.py's local save directory), "
                                  "a local path or any fsspec URI")
    p.add_argument("--out", required=True, help="checkpoint directory or URI to write")
    p.add_argument("--recipe", default="", help=f"one of {', '.join(sorted(official.RECIPES))}")
    p.add_argument("--heads", type=int, default=0, help="attention heads (official --model.num_heads)")
    p.add_argument("--image-size", type=int, default=0, help="model input side (latent side: 32 for 256 px)")
    p.add_argument("--train-type", default="", help="official --model.train_type (shortcut, naive, ...)")
    p.add_argument("--class-conditional", type=_bool, default=None,
                   help="true/false (default: the recipe's, else true when the label table has > 1 class)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the written config")
    args = p.parse_args(argv)
    try:
        state, info = official.read_checkpoint(args.source)
        shape = official.infer_shape(state["params"])
        name = os.path.basename(info["file"].rstrip("/")).split(".")[0] or "official"
        cfg = official.import_config(shape, args.recipe, heads=args.heads, image_size=args.image_size,
                                     train_type=args.train_type, class_conditional=args.class_conditional,
                                     overrides=[f"train.run_name=imported-{name}", *args.set])
        model, ema, report = official.build_imported(cfg, state)
    except (official.OfficialFormatError, ConfigError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    source = {**info, "format": "kvfrans/shortcut-models train.py pickle", "recipe": args.recipe,
              "official_step": report["official_step"]}
    out = _write(args.out, model, ema, cfg,
                 {"imported_from": source, "import_report": report, "run_name": f"imported-{name}"})
    m = cfg.model
    print(f"[shortcut-ray] {args.source} ({info['bytes']:,} bytes, sha256 {info['sha256'][:16]}..., official "
          f"step {report['official_step']})")
    print(f"  mapped {report['tensors_per_tree']} tensors x 2 trees (params -> online, params_ema -> EMA): "
          f"{report['values_online']:,} values each; ignored: {', '.join(report['ignored']) or 'nothing'}; "
          f"not imported: {report['not_imported']}")
    print(f"  from the tree: hidden {m.hidden_size}, depth {m.depth}, patch {m.patch_size}, mlp_ratio "
          f"{m.mlp_ratio:g}, channels {cfg.data.channels}, classes {cfg.data.num_classes}")
    print(f"  from {'recipe ' + args.recipe + ' and flags' if args.recipe else 'flags'}: heads {m.num_heads}, image "
          f"{cfg.data.image_size}, train_type {cfg.objective.train_type}, class_conditional "
          f"{cfg.objective.class_conditional}")
    print(f"  wrote {out} (step 0, preset {cfg.preset}; the full config is in its state.json)")
    print(f"  next: python -m jobs.sample {out} --steps 1,4,128")
    return 0


if __name__ == "__main__":
    sys.exit(main())
