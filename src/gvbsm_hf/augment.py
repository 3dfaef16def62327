"""Batched, differentiable, replayable image augmentation (docs/method.md "Recover": random resized crop +
flip, as SRe2L; also used by statistics recording, relabel and student training).

Every random parameter is drawn on the CPU from an explicit :class:`torch.Generator`, so a view
can be reproduced exactly (stored soft labels) and does not depend on the device or the number
of processes. The crop-resize is a bilinear :func:`torchvision.ops.roi_align`, differentiable
w.r.t. the pixels (synthesis optimises them through it).

Boxes are ``(x1, y1, x2, y2)`` in input pixel *edge* coordinates: the box ``(0, 0, W, H)`` is the
whole image and ``(j, i, j + w, i + h)`` is torchvision's crop ``img[..., i:i+h, j:j+w]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .errors import GVBSMError
from .utils import to_device_async

__all__ = [
    "CropFlipParams",
    "sample_crop_flip",
    "apply_crop_flip",
    "random_resized_crop_flip",
    "pad_crop_flip",
    "cutmix",
    "cutmix_boxes",
    "paste_boxes",
]

@dataclass
class CropFlipParams:
    """Crop boxes ``(N, 4)`` float32 ``x1, y1, x2, y2`` (input pixels) and horizontal flips ``(N,)`` bool."""

    boxes: torch.Tensor
    flip: torch.Tensor

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise GVBSMError(f"CropFlipParams.boxes must be (N, 4), got {tuple(self.boxes.shape)}.")
        if tuple(self.flip.shape) != (self.boxes.shape[0],):
            raise GVBSMError(
                f"CropFlipParams.flip must be (N,) = ({self.boxes.shape[0]},), got {tuple(self.flip.shape)}."
            )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "CropFlipParams":
        return CropFlipParams(self.boxes.to(device), self.flip.to(device))

    def index(self, idx: torch.Tensor | Sequence[int] | slice | int) -> "CropFlipParams":
        """The parameters of rows ``idx`` (tensor / list of indices, bool mask, slice or int)."""
        if isinstance(idx, int):
            idx = [idx]
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, device=self.boxes.device)
            if idx.dtype != torch.bool:
                idx = idx.long()
        return CropFlipParams(self.boxes[idx], self.flip[idx])

    def to_dict(self) -> dict[str, list]:
        """Plain lists (JSON / ``datasets`` friendly)."""
        return {
            "boxes": self.boxes.detach().to("cpu", torch.float32).tolist(),
            "flip": self.flip.detach().to("cpu", torch.bool).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CropFlipParams":
        boxes = torch.as_tensor(d["boxes"], dtype=torch.float32).reshape(-1, 4)
        flip = torch.as_tensor(d["flip"], dtype=torch.bool).reshape(-1)
        return cls(boxes, flip)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_crop_flip(
    n: int,
    height: int,
    width: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> CropFlipParams:
    """``n`` random-resized-crop boxes and flips with torchvision ``RandomResizedCrop`` semantics.

    Per image: up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)),
    integer ``w, h`` rounded, the first try that fits wins and its corner is uniform over the valid
    positions; if none fits, the central crop of the clamped aspect ratio. Vectorised: every image
    draws the same number of numbers (10 areas, 10 ratios, 2 positions, 1 flip), so the result
    depends only on the generator state. Flip with probability ``flip_prob``.
    """
    if n < 0 or height < 1 or width < 1:
        raise GVBSMError(f"sample_crop_flip: need n >= 0 and a positive size, got n={n}, {height}x{width}.")
    lo_s, hi_s = float(scale[0]), float(scale[1])
    lo_r, hi_r = float(ratio[0]), float(ratio[1])
    if not (0.0 < lo_s <= hi_s) or not (0.0 < lo_r <= hi_r):
        raise GVBSMError(
            f"sample_crop_flip: scale={tuple(scale)} and ratio={tuple(ratio)} must be positive (low, high) pairs."
        )
    if generator is not None and generator.device.type != "cpu":
        raise GVBSMError("sample_crop_flip: pass a CPU torch.Generator (parameters are drawn on the CPU).")
    tries = 10
    area = float(height * width)
    target = area * _uniform((n, tries), lo_s, hi_s, generator)
    aspect = torch.exp(_uniform((n, tries), math.log(lo_r), math.log(hi_r), generator))
    pos = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    flip = torch.rand((n,), generator=generator, dtype=torch.float64) < flip_prob

    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    any_ok = ok.any(dim=1)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first True (0 when none, masked below)
    rows = torch.arange(n)
    w_sel, h_sel = w[rows, first], h[rows, first]
    i_sel = torch.floor(pos[:, 0] * (height - h_sel + 1)).clamp(max=height - h_sel)
    j_sel = torch.floor(pos[:, 1] * (width - w_sel + 1)).clamp(max=width - w_sel)

    # fallback: central crop (torchvision: clamp the aspect ratio to the allowed range)
    in_ratio = width / height
    if in_ratio < lo_r:
        fw, fh = width, int(round(width / lo_r))
    elif in_ratio > hi_r:
        fw, fh = int(round(height * hi_r)), height
    else:
        fw, fh = width, height
    fi, fj = (height - fh) // 2, (width - fw) // 2
    w_sel = torch.where(any_ok, w_sel, torch.full_like(w_sel, fw))
    h_sel = torch.where(any_ok, h_sel, torch.full_like(h_sel, fh))
    i_sel = torch.where(any_ok, i_sel, torch.full_like(i_sel, fi))
    j_sel = torch.where(any_ok, j_sel, torch.full_like(j_sel, fj))
    boxes = torch.stack([j_sel, i_sel, j_sel + w_sel, i_sel + h_sel], dim=1).to(torch.float32)
    return CropFlipParams(boxes=boxes, flip=flip)


def _out_hw(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, int):
        return out_size, out_size
    oh, ow = out_size
    return int(oh), int(ow)


def apply_crop_flip(x: torch.Tensor, params: CropFlipParams, out_size: int | Sequence[int]) -> torch.Tensor:
    """Crop ``params.boxes`` out of ``x`` ``(N, C, H, W)``, resize bilinearly to ``out_size``, then
    flip horizontally where ``params.flip``. Differentiable w.r.t. ``x``.

    ``roi_align(aligned=True)`` with the adaptive sampling grid (``ceil(box / out)`` samples per
    output pixel and axis): an exact bilinear resize (half-pixel centres) when enlarging, an
    area-averaging (anti-aliased) one when shrinking; the full box at the same size is the identity.
    bf16/fp16 inputs are computed in float32 and cast back.
    """
    if x.ndim != 4:
        raise GVBSMError(f"apply_crop_flip expects (N, C, H, W), got shape {tuple(x.shape)}.")
    n = x.shape[0]
    if len(params) != n:
        raise GVBSMError(f"apply_crop_flip: {len(params)} boxes for a batch of {n} images; sample one box per image.")
    oh, ow = _out_hw(out_size)
    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xin = x.to(compute_dtype)
    boxes = to_device_async(params.boxes, x.device).to(compute_dtype)
    rois = torch.cat([torch.arange(n, device=x.device, dtype=compute_dtype)[:, None], boxes], dim=1)
    out = roi_align(xin, rois, output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = to_device_async(params.flip, x.device).to(torch.bool).view(-1, 1, 1, 1)
    out = torch.where(flip, out.flip(-1), out)
    return out.to(x.dtype) if x.dtype.is_floating_point else out


def random_resized_crop_flip(
    x: torch.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    out_size: int | Sequence[int] | None = None,
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`sample_crop_flip` + :func:`apply_crop_flip` on a batch (``out_size``: input size)."""
    n, _, h, w = x.shape
    params = sample_crop_flip(n, h, w, scale=scale, ratio=ratio, flip_prob=flip_prob, generator=generator)
    return apply_crop_flip(x, params, out_size if out_size is not None else (h, w))


def pad_crop_flip(
    x: torch.Tensor,
    *,
    padding: int = 4,
    padding_mode: str = "constant",
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Classic CIFAR teacher augmentation: pad by ``padding`` (zeros, or ``"reflect"``), random crop
    back to ``H x W``, horizontal flip; vectorised over the batch (one gather)."""
    if x.ndim != 4:
        raise GVBSMError(f"pad_crop_flip expects (N, C, H, W), got shape {tuple(x.shape)}.")
    n, _, h, w = x.shape
    p = int(padding)
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
    flip = torch.rand((n,), generator=generator) < flip_prob
    if p > 0:
        xp = F.pad(x, (p, p, p, p), mode=padding_mode) if padding_mode != "constant" else F.pad(x, (p, p, p, p))
    else:
        xp = x
    off, flip = off.to(x.device), flip.to(x.device)
    rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)  # flipping = reading the columns backwards
    b = torch.arange(n, device=x.device)[:, None, None]
    out = xp[b, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cutmix(
    x: torch.Tensor, *, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix: paste a box of ``x[perm]`` into ``x``.

    ``lam0 ~ Beta(alpha, alpha)`` (drawn with numpy from a seed taken from ``generator``), box of
    side ``sqrt(1 - lam0)`` times the image, uniform centre, clipped to the image. Returns the
    mixed batch, the permutation and ``lam`` = the fraction of pixels kept from ``x`` (after
    clipping), so that targets are ``lam * y + (1 - lam) * y[perm]``.
    """
    if x.ndim != 4:
        raise GVBSMError(f"cutmix expects (N, C, H, W), got shape {tuple(x.shape)}.")
    if alpha <= 0:
        raise GVBSMError(f"cutmix alpha={alpha} must be > 0.")
    n, _, h, w = x.shape
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam0 = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(n, generator=generator)
    centre = torch.rand(2, generator=generator, dtype=torch.float64)
    cut = math.sqrt(1.0 - lam0)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(centre[0] * h), int(centre[1] * w)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool, device=x.device)
    mask[..., y1:y2, x1:x2] = True
    perm = perm.to(x.device)
    mixed = torch.where(mask, x[perm], x)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    return mixed, perm, lam


def cutmix_boxes(lam0: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """CutMix boxes ``(y1, y2, x1, x2)`` (int, ``(M, 4)``) of :func:`cutmix`'s rule, one per row.

    ``lam0`` ``(M,)`` are the Beta draws, ``centre`` ``(M, 2)`` uniform in ``[0, 1)`` (y, x); the box
    side is ``int(size * sqrt(1 - lam0))``, centred at ``int(centre * size)`` and clipped to the image.
    """
    cut = (size * np.sqrt(1.0 - np.asarray(lam0, dtype=np.float64))).astype(np.int64)
    c = (np.asarray(centre, dtype=np.float64) * size).astype(np.int64)
    lo = np.maximum(c - (cut // 2)[:, None], 0)
    hi = np.minimum(c + (cut - cut // 2)[:, None], size)
    return np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], axis=1)


def paste_boxes(x: torch.Tensor, source: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per-image CutMix: ``x`` with box ``boxes[j] = (y1, y2, x1, x2)`` of ``source[j]`` pasted into row ``j``.

    ``x`` and ``source`` are ``(N, C, H, W)``; an empty box (``y1 == y2``, e.g. all zeros) leaves the
    row unchanged. Pure selection (``torch.where``): the result is bitwise the inputs' pixels.
    """
    if x.shape != source.shape or boxes.shape != (x.shape[0], 4):
        raise GVBSMError(f"paste_boxes: x {tuple(x.shape)}, source {tuple(source.shape)} and boxes "
                         f"{tuple(boxes.shape)} must be (N, C, H, W), (N, C, H, W) and (N, 4).")
    h, w = x.shape[-2:]
    b = boxes.to(x.device, torch.long)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None])
              & (xs >= b[:, 2, None, None]) & (xs < b[:, 3, None, None]))
    return torch.where(inside[:, None], source.to(x.dtype), x)
