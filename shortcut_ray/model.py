"""Shortcut DiT: a DiT conditioned on time t, step level k and class y (ALGORITHM §1).

Reads in paper order: embedders, block, final layer, model, size table. Deviations from the standard
DiT are the official shortcut code's, each marked with its section: attention logits scaled by
1/head_dim (not 1/sqrt), LayerNorm eps 1e-6 without affine, tanh GELU, unclipped modulation, a second
timestep embedder for k (raw values, no x1000), and only the final layer zero-initialised.
Tensors are NCHW at the boundary; inside the model they are tokens (B, N, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig

LN_EPS = 1e-6  # Flax default (§1.1); PyTorch's default is 1e-5


def timestep_features(value: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a raw scalar, [cos, sin] order (§1.1 item 3). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=value.device) / half)
    args = value.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE/DiT 1-D table, [sin, cos] order (§1.1 item 2). pos (M,) -> (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D positions (1, N, dim); first half encodes the column (w) index, tokens row-major."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # "xy": grid_w[h, w] = w
    emb = torch.cat([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], dim=1)  # (N, dim)
    return emb.float()[None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, NOT clipped (model.py redefines math_utils' clipped version, §1.1 item 4)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Raw scalar -> 256 sinusoidal features -> Linear, SiLU, Linear. Used for both t and k."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(value, self.freq_dim).to(self.mlp[0].weight.dtype)  # (B, 256)
        h = self.mlp[1](self.mlp[0](feats))  # compute dtype (bf16 under autocast / FSDP2 bf16)
        # §1.3: the second linear runs in float32. Autocast is switched off for it; under FSDP2 it is
        # sharded on its own with a float32 policy (distributed.parallelize), so its weight is fp32 too.
        with torch.autocast(h.device.type, enabled=False):
            return self.mlp[2](h.float())  # (B, D) float32


class LayerNorm(nn.LayerNorm):
    """LayerNorm in its input's dtype even under autocast (which would run it in fp32 and emit fp32):
    bf16 activations on the single-process autocast path, as on the FSDP2 bf16 path (§1.3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


def _fuse_legacy_qkv(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: checkpoints written before the fused projection (and importers of
    the official weights) carry `<prefix>q/k/v.{weight,bias}`; stack them into `<prefix>qkv.*`."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{part}.{kind}" for part in ("q", "k", "v")]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


class Attention(nn.Module):
    """Multi-head self-attention, one fused q/k/v projection, the official 1/head_dim scale (§1.1).

    `qkv` is one Linear(D, 3D) whose rows are [q; k; v]; it is initialised as three D x D Xavier
    blocks in that order (the same draws as three separate layers), and `q`, `k`, `v` remain
    available as functions of x for tests and readers."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = 1.0 / self.head_dim  # pitfall 5: not 1/sqrt(head_dim)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.register_load_state_dict_pre_hook(_fuse_legacy_qkv)

    def _part(self, i: int):
        d = self.qkv.in_features
        return lambda x: F.linear(x, self.qkv.weight[i * d:(i + 1) * d], self.qkv.bias[i * d:(i + 1) * d])

    q = property(lambda self: self._part(0))
    k = property(lambda self: self._part(1))
    v = property(lambda self: self._part(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        # SDPA picks flash / memory-efficient kernels on GPU; both accumulate the softmax in fp32.
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN block: modulation from c, attention and MLP with gated residuals (§1.1 item 4)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(hidden, eps=LN_EPS, elementwise_affine=False)
        self.attn = Attention(hidden, heads)
        self.norm2 = LayerNorm(hidden, eps=LN_EPS, elementwise_affine=False)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c).chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN (shift first), LN, linear to p*p*C per token; both linears zero-initialised (§1.2)."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = LayerNorm(hidden, eps=LN_EPS, elementwise_affine=False)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class ShortcutDiT(nn.Module):
    """f(x, t, k, y) -> velocity s with the shape of x. t in [0,1] (0 = noise), k = log2(1/d) in 0..L."""

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, num_classes: int,
                 ignore_k: bool = False):
        super().__init__()
        if image_size % cfg.patch_size:
            raise ValueError(f"image side {image_size} is not divisible by patch size {cfg.patch_size}; "
                             f"resize the data or change model.patch_size")
        self.cfg = cfg
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.patch = cfg.patch_size
        self.ignore_k = ignore_k  # baselines other than shortcut zero k before TE_k (§1.1 item 3)
        hidden = cfg.hidden_size
        self.x_embed = nn.Conv2d(channels, hidden, kernel_size=self.patch, stride=self.patch)
        self.grid = image_size // self.patch
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid), persistent=False)  # (1, N, D)
        self.t_embed = TimestepEmbedder(hidden)
        self.k_embed = TimestepEmbedder(hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # last row = null label for CFG
        self.blocks = nn.ModuleList(DiTBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(hidden, self.patch, channels)
        self.init_weights()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def init_weights(self) -> None:
        """Exact official init (§1.2): Xavier everywhere, N(0, .02) embedders, zeros in the final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                parts = 3 if any(m is blk.attn.qkv for blk in self.blocks) else 1
                for w in m.weight.chunk(parts):  # fused q/k/v: three D x D Xavier blocks, in order
                    nn.init.xavier_uniform_(w)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv viewed as a linear: fan_in = p*p*C
        nn.init.zeros_(self.x_embed.bias)
        for emb in (self.t_embed, self.k_embed):
            for lin in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.cfg.zero_block_adaln:  # ablation only; the official code keeps these Xavier
            for blk in self.blocks:
                nn.init.zeros_(blk.adaLN[1].weight)
                nn.init.zeros_(blk.adaLN[1].bias)
        for lin in (self.final.adaLN[1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); per-token order (patch-row, patch-col, channel) (§1.1 item 6)."""
        b, p, g, c = x.shape[0], self.patch, self.grid, self.channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def condition(self, t: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = TE_t(t) + TE_k(k) + LE(y): raw t and raw integer k as floats (pitfall 3)."""
        if self.ignore_k:
            k = torch.zeros_like(k)
        return self.t_embed(t) + self.k_embed(k.float()) + self.y_embed(y)  # (B, D)

    # Fixed batch sizes for compiled graphs (distributed._compile): a batch that is not one of the
    # registered training sizes is zero-padded up to the next power of two and the output sliced, so
    # sampling and evaluation at any batch size reuse a handful of graphs. Rows are independent.
    exact_batches: frozenset = frozenset()
    pad_batches: bool = False

    def batch_bucket(self, b: int) -> int:
        if not self.pad_batches or b in self.exact_batches:
            return b
        return 1 << (b - 1).bit_length()

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pad = self.batch_bucket(b) - b
        if pad == 0:
            return self._forward(x, t, k, y)
        x, t, k, y = (torch.cat([v, v.new_zeros((pad, *v.shape[1:]))]) for v in (x, t, k, y))
        return self._forward(x, t, k, y)[:b]

    def _forward(self, x, t, k, y):
        tokens, c = self._embed(x, t, k, y)
        for blk in self.blocks:
            tokens = blk(tokens, c)  # (B, N, D)
        return self._head(tokens, c)

    def _embed(self, x, t, k, y):
        tokens = self.x_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid
        c = self.condition(t, k, y).to(tokens.dtype)  # fp32 embedders (§1.3), consumed in the compute dtype
        return tokens + self.pos_embed.to(tokens.dtype), c  # (B, N, D), (B, D)

    def _head(self, tokens, c):
        return self.unpatchify(self.final(tokens, c))  # (B, C, H, W)


# -- size table (§1.4) ---------------------------------------------------------------------------
DIT_SIZES: dict[str, dict] = {
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    # small sizes for tests and CPU demos
    "DiT-T/2": dict(hidden_size=64, depth=2, num_heads=2, patch_size=2),
    "DiT-M/2": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """ModelConfig for a named size ('DiT-B/2', ...), with optional field overrides."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(DIT_SIZES)}")
    return ModelConfig(**{**DIT_SIZES[size], **overrides})


def build_model(cfg: Config, *, uses_step_level: bool) -> ShortcutDiT:
    """The DiT for a run. `uses_step_level` comes from the objective (`objective_class(name).uses_step_level`):
    baselines without step conditioning zero k before TE_k (official ignore_dt, §1.1 item 3)."""
    return ShortcutDiT(cfg.model, cfg.data.image_size, cfg.data.channels, cfg.data.num_classes,
                       ignore_k=not uses_step_level)


def flops_per_forward(cfg: ModelConfig, image_size: int, channels: int) -> float:
    """Matmul FLOPs of one forward pass of one image (2 per multiply-add), for MFU (DESIGN §5)."""
    d, n = cfg.hidden_size, (image_size // cfg.patch_size) ** 2
    mlp = int(d * cfg.mlp_ratio)
    per_block = 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d + 2 * d * 6 * d  # linears, QK^T+AV, adaLN
    embed = 2 * n * d * cfg.patch_size ** 2 * channels + 2 * 2 * (256 * d + d * d)
    final = 2 * n * d * cfg.patch_size ** 2 * channels + 2 * d * 2 * d
    return float(cfg.depth * per_block + embed + final)
