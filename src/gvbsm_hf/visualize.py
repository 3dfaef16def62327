"""A PNG grid of images, one row per class (the distilled set at a glance)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import GVBSMError

__all__ = ["save_class_grid", "GRID_PAD", "grid_scale"]

GRID_PAD = 2
"""Pixels of background between cells (and around the grid)."""
_TARGET_CELL = 64
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def grid_scale(height: int, width: int) -> int:
    """Nearest-neighbour upscale factor that brings small images to about 64 px (1 for big ones)."""
    return max(1, int(round(_TARGET_CELL / max(height, width))))


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    x = images.detach().to("cpu")
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise GVBSMError(f"save_class_grid needs 1 or 3 channels, got {x.shape[1]}.")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_class_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    max_per_class: int = 10,
    scale: int | None = None,
    max_classes: int | None = 100,
) -> Path:
    """Write a PNG with one row per class (name at the left, PIL default font) and up to
    ``max_per_class`` images of that class in input order, upscaled ``scale`` times with nearest
    neighbour (default: to about 64 px). ``images``: ``(N, C, H, W)`` uint8, or float in [0, 1].
    Rows for classes without images stay empty; only the first ``max_classes`` classes are drawn
    (``None``: all).

    Layout: cells of ``H*scale x W*scale`` separated (and surrounded) by :data:`GRID_PAD` pixels,
    to the right of the label column. Returns the path.
    """
    if images.ndim != 4:
        raise GVBSMError(f"save_class_grid expects images (N, C, H, W), got {tuple(images.shape)}.")
    labels = torch.as_tensor(labels).detach().to("cpu").long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise GVBSMError(f"save_class_grid: {images.shape[0]} images but {labels.shape[0]} labels.")
    if max_per_class < 1:
        raise GVBSMError(f"max_per_class={max_per_class} must be >= 1.")
    names = [str(n) for n in class_names]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
        raise GVBSMError(
            f"save_class_grid: labels span {int(labels.min())}..{int(labels.max())} but {len(names)} class names "
            "were given; pass every class name (spec.class_names)."
        )
    if max_classes is not None:
        names = names[:max_classes]
    h, w = int(images.shape[2]), int(images.shape[3])
    s = int(scale) if scale is not None else grid_scale(h, w)
    ch, cw = h * s, w * s
    pixels = _to_uint8_hwc(images)
    per_class = [torch.nonzero(labels == c).flatten()[:max_per_class].tolist() for c in range(len(names))]
    cols = max([len(p) for p in per_class] + [1])
    rows = max(len(names), 1)

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([probe.textbbox((0, 0), n, font=font)[2] for n in names] + [0])
    label_w = text_w + 2 * GRID_PAD + 4
    width = label_w + cols * (cw + GRID_PAD) + GRID_PAD
    height = rows * (ch + GRID_PAD) + GRID_PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, idx in enumerate(per_class):
        top = GRID_PAD + r * (ch + GRID_PAD)
        box = draw.textbbox((0, 0), names[r], font=font)
        draw.text((GRID_PAD + 2, top + max(0, (ch - (box[3] - box[1])) // 2) - box[1]), names[r], fill=_TEXT, font=font)
        for c, i in enumerate(idx):
            cell = pixels[i].repeat(s, axis=0).repeat(s, axis=1)
            canvas.paste(Image.fromarray(cell, "RGB"), (label_w + c * (cw + GRID_PAD), top))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
