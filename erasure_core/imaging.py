"""Picture helpers: labelled image grids for people to look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) in [0,1] -> PIL image."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def grid(images: torch.Tensor, ncols: int, scale: int = 4, row_labels: list[str] | None = None,
         col_labels: list[str] | None = None, title: str | None = None, pad: int = 2) -> Image.Image:
    """Tile (N,3,H,W) images row-major into a grid, upscaled with nearest pixels, with optional labels."""
    n, _, h, w = images.shape
    nrows = (n + ncols - 1) // ncols
    font = ImageFont.load_default()
    cell_w, cell_h = w * scale + pad, h * scale + pad
    left = (max(len(s) for s in row_labels) * 6 + 8) if row_labels else 0
    top = (14 if col_labels else 0) + (16 if title else 0)
    canvas = Image.new("RGB", (left + ncols * cell_w + pad, top + nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cell_w + pad + 2, top - 13), label[: max(1, cell_w // 6)], fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + r * cell_h + cell_h // 2 - 6), label, fill=(0, 0, 0), font=font)
    for i in range(n):
        r, c = divmod(i, ncols)
        tile = to_pil(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (left + c * cell_w + pad, top + r * cell_h + pad))
    return canvas


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write a picture, making its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, ncols: int, **kwargs) -> Path:
    return save_image(grid(images, ncols, **kwargs), path)


def save_side_by_side(panels: list[Image.Image], path: str | Path, title: str | None = None, gap: int = 12) -> Path:
    """Panels next to each other, tops aligned, under an optional title."""
    top = 16 if title else 0
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, top + max(p.height for p in panels)), (255, 255, 255))
    if title:
        ImageDraw.Draw(canvas).text((4, 2), title, fill=(0, 0, 0), font=ImageFont.load_default())
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, top))
        x += panel.width + gap
    return save_image(canvas, path)
