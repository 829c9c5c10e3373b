"""Images a person looks at in the MLflow UI: labelled sample grids, the loss heat-map, quality vs N.

Only numpy + PIL (+ matplotlib for the two charts, Agg backend); no torch, ray or mlflow. Small images
(16 px digits) are upscaled with nearest-neighbour so each one is at least `min_px` pixels wide: the
MLflow artifact viewer shows a PNG at its own size, and a 137-px grid of 16-px digits was unreadable.
"""

from __future__ import annotations

import io

import numpy as np

GUTTER = 2  # px between images (white)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x[:, :3].transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, ncol: int) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (rows*H, ncol*W, 3) uint8, white 1-px gutters (unlabelled, unscaled)."""
    x = to_uint8(images)
    b, h, w, _ = x.shape
    nrow = -(-b // ncol)
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i]
    return grid


def upscale(images: np.ndarray, min_px: int) -> np.ndarray:
    """(B, H, W, 3) uint8, nearest-neighbour, by the smallest integer factor giving >= min_px wide."""
    factor = max(1, -(-min_px // images.shape[2]))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: np.ndarray, ncol: int, row_labels: list[str], min_px: int = 64,
                  title: str = "") -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (H', W', 3) uint8: `ncol` images per row, each row labelled on the left.

    len(row_labels) rows; B must be len(row_labels) * ncol (row-major).
    """
    from PIL import Image, ImageDraw

    nrow = len(row_labels)
    if images.shape[0] != nrow * ncol:
        raise ValueError(f"{images.shape[0]} images do not fill {nrow} rows of {ncol}")
    tiles = upscale(to_uint8(images), min_px)
    h, w = tiles.shape[1:3]
    font_px = max(12, min(24, h // 3))
    label_w = int(font_px * 0.62 * max([len(s) for s in row_labels] + [1])) + 2 * GUTTER + 6
    title_h = font_px + 8 if title else 0
    font = _font(font_px)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 8 if title else 0
    canvas = Image.new("RGB", (max(title_w, label_w + ncol * (w + GUTTER) + GUTTER),
                               title_h + nrow * (h + GUTTER) + GUTTER), "white")  # the title is never cut off
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GUTTER + 2, 3), title, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y0 = title_h + GUTTER + r * (h + GUTTER)
        draw.text((GUTTER + 2, y0 + (h - font_px) // 2), label, fill="black", font=font)
        for c in range(ncol):
            canvas.paste(Image.fromarray(tiles[r * ncol + c]), (label_w + GUTTER + c * (w + GUTTER), y0))
    return np.asarray(canvas)


def _figure_png(fig) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def quality_chart(per_n: dict[str, dict[int, float]], title: str) -> np.ndarray:
    """{"fd_pixel": {1: 40.2, 2: 30.1, ...}, "fid": {...}} -> a line chart (log2 N on x) as (H, W, 3) uint8."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in sorted(per_n.items()):
        ns = sorted(values)
        ax.plot(ns, [values[n] for n in ns], marker="o", label=name)
        for n in ns:
            ax.annotate(f"{values[n]:.1f}", (n, values[n]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    all_n = sorted({n for v in per_n.values() for n in v})
    ax.set_xticks(all_n, [str(n) for n in all_n])
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("Frechet distance (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_png(fig)


def heatmap(values: np.ndarray, t_values: np.ndarray, title: str) -> np.ndarray:
    """(L+1, T) losses over (k, t) -> an annotated heat-map image (row k = L is the flow level)."""
    plt = _pyplot()
    levels, bins = values.shape
    fig, ax = plt.subplots(figsize=(max(6, bins * 0.28), 0.45 * levels + 1.6))
    im = ax.imshow(values, aspect="auto", cmap="viridis", origin="lower")
    ax.set_yticks(range(levels), [f"k={k} (d=1/{2 ** k})" + (" flow" if k == levels - 1 else "") for k in range(levels)])
    step = max(1, bins // 8)
    ax.set_xticks(range(0, bins, step), [f"{t:.2f}" for t in t_values[::step]])
    ax.set_xlabel("t (0 = noise, 1 = data)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="MSE")
    return _figure_png(fig)
