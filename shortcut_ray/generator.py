"""The trained generator as a self-contained object: weights (safetensors) + config (JSON) -> images.

What the MLflow pyfunc model (tracking.pyfunc_model) wraps, and usable on its own:

    gen = Generator.from_files("generator.safetensors", "config.json")
    images = gen.generate(labels=[3, 3, 7], steps=[1, 4, 128], cfg_scale=[1.0] * 3, seeds=[0, 0, 0])
    # (3, H, W, C) uint8; the same seed gives the same noise at every step count

No pickled classes anywhere: the weights are a plain tensor file, the network is rebuilt from the
config by model.build_model. Engine layer: torch only (mlflow lives in tracking.py).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from .config import Config

WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights of a (possibly FSDP2-sharded) model. Every rank must call it (a collective);
    rank 0 gets the tensors, other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(state_dict: dict[str, torch.Tensor], cfg: Config, directory: str) -> tuple[str, str]:
    """Write WEIGHTS_FILE and CONFIG_FILE into `directory`; returns their paths."""
    import os

    from safetensors.torch import save_file

    weights, config = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, CONFIG_FILE)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, weights)
    with open(config, "w") as f:
        f.write(cfg.to_json())
    return weights, config


class Generator:
    def __init__(self, model: nn.Module, cfg: Config, device: str | torch.device = "cpu"):
        from .objectives import for_sampling

        self.model, self.cfg, self.device = model.eval().to(device), cfg, torch.device(device)
        # the objective owns its sampler (Euler for shortcut / flow matching, multistep, DDIM)
        self.objective = for_sampling(cfg)

    @classmethod
    def from_files(cls, weights: str, config: str, device: str | torch.device = "cpu") -> "Generator":
        from safetensors.torch import load_file

        from .model import build_model
        from .objectives import objective_class

        with open(config) as f:
            cfg = Config.from_dict(json.load(f))
        model = build_model(cfg, uses_step_level=objective_class(cfg.objective.train_type).uses_step_level)
        model.load_state_dict(load_file(weights))
        return cls(model, cfg, device)

    @torch.no_grad()
    def generate(self, labels, steps, cfg_scale, seeds) -> np.ndarray:
        """One image per entry -> (B, H, W, C) uint8. Entries with equal (steps, cfg_scale) are batched."""
        from .sampler import sample

        d, obj = self.cfg.data, self.cfg.objective
        labels, steps = [int(v) for v in labels], [int(v) for v in steps]
        scales, seeds = [float(v) for v in cfg_scale], [int(v) for v in seeds]
        if not len(labels) == len(steps) == len(scales) == len(seeds):
            raise ValueError("labels, steps, cfg_scale and seeds must have one entry per image")
        for y in labels:
            if not 0 <= y <= d.num_classes:
                raise ValueError(f"label {y} is outside 0..{d.num_classes - 1} (or {d.num_classes} = unconditional)")
        shape = (d.channels, d.image_size, d.image_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        out = torch.empty((len(labels), *shape))
        for key in sorted(set(zip(steps, scales))):
            idx = torch.tensor([i for i, k in enumerate(zip(steps, scales)) if k == key])
            y = torch.tensor([labels[i] for i in idx.tolist()], device=self.device)
            out[idx] = sample(self.model, noise[idx].to(self.device), y, key[0], key[1], d.num_classes,
                              obj.denoise_timesteps, objective=self.objective).float().cpu()
        if d.kind == "latents":
            from .latents import decode_for_display

            out = torch.as_tensor(decode_for_display(out, d))
        x = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).numpy()

    def predict_frame(self, frame) -> np.ndarray:
        """A table with columns label (required), steps (default 1), cfg_scale (default eval.cfg_scale),
        seed (default: the row number) -> (B, H, W, C) uint8."""
        n = len(frame)
        col = lambda name, default: list(frame[name]) if name in frame else [default(i) for i in range(n)]  # noqa: E731
        if "label" not in frame:
            raise ValueError(f"the input needs a 'label' column (0..{self.cfg.data.num_classes - 1}); got {list(frame)}")
        return self.generate(col("label", None), col("steps", lambda i: 1),
                             col("cfg_scale", lambda i: self.cfg.eval.cfg_scale), col("seed", lambda i: i))
