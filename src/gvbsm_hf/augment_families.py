"""The augmentation families of the recover and record stages (``syn_augment``, ``stats_augment``;
docs/method.md "Recover", docs/differences.md row 1): ``authors`` (the authors' code), ``per_image_rrc``
(gvbsm-hf 0.1) and ``none``, built on the primitives of :mod:`gvbsm_hf.augment`.

Synthesis splits a view into its random draws (:func:`sample_synthesis_augment`, on the CPU, from the job's
generator) and their application (:func:`apply_synthesis_augment`, tensor ops on the device), so a whole
checkpoint interval can be drawn ahead (:mod:`gvbsm_hf.recover.draws`).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .augment import CropFlipParams, apply_crop_flip, pad_crop_flip, random_resized_crop_flip, sample_crop_flip
from .errors import GVBSMError
from .utils import to_device_async

__all__ = [
    "AUGMENT_KINDS",
    "AugmentKind",
    "authors_batch_augment",
    "authors_pad",
    "synthesis_augment",
    "sample_synthesis_augment",
    "apply_synthesis_augment",
    "recording_augment",
    "is_imagenet_scale",
]

AugmentKind = Literal["authors", "per_image_rrc", "none"]
AUGMENT_KINDS: tuple[str, ...] = typing.get_args(AugmentKind)
"""Augmentation families of synthesis (``syn_augment``) and recording (``stats_augment``), docs/differences.md."""

IMAGENET_SCALE = 128
"""Images at least this large get the ImageNet-style (random-resized-crop) augmentation under ``authors``."""

AUTHORS_JITTER = 32
"""The authors' ``torch.roll`` shift: 0..32 px in H and in W, one draw per batch."""


def is_imagenet_scale(image_size: int) -> bool:
    return int(image_size) >= IMAGENET_SCALE


def authors_pad(image_size: int) -> int:
    """Pad of the authors' pad-crop: 4 px at 32 px, 8 px at 64 px (``round(size / 8)``)."""
    return max(1, int(round(image_size / 8)))


def _roll_index(size: int, shift: torch.Tensor) -> torch.Tensor:
    """Indices ``r -> (r - shift) mod size`` on ``shift``'s device: gathering along an axis with them is
    ``torch.roll(..., shift)`` along it, with the shift a tensor (no Python number, one graph for every draw)."""
    return (torch.arange(size, device=shift.device) - shift).remainder(size)


def authors_batch_augment(
    x: torch.Tensor,
    *,
    crop_scale: Sequence[float] = (0.08, 1.0),
    jitter: int = AUTHORS_JITTER,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The authors' synthesis augmentation: ONE draw for the whole batch (docs/differences.md row 1).

    Small images (< 128 px): zero-pad by ``round(H / 8)`` (4 at 32 px, 8 at 64 px), crop back at one
    random offset, flip with probability 1/2; ImageNet-scale images: one random-resized crop
    (``crop_scale``) + flip resized back to ``H x W``. Then ``torch.roll`` by one random shift
    ``(dh, dw)`` with ``dh, dw`` uniform in ``0..jitter``. Differentiable w.r.t. ``x``. Generator
    draws, in order: the crop (2 integers, or the RRC numbers of :func:`sample_crop_flip` for one
    image), the flip, the two shifts.

    The draws stay tensors: uploaded once (pinned, non-blocking on CUDA) and applied as index gathers
    (``index_select`` with ``offset + (arange - shift) mod size``, the flip reading the columns backwards), so
    nothing is read back to Python and the ops are the same at every iteration (issue 32). The result and its
    gradient are bit for bit those of slicing, ``flip`` and ``torch.roll`` (tests/test_fidelity.py)."""
    if x.ndim != 4:
        raise GVBSMError(f"authors_batch_augment expects (N, C, H, W), got shape {tuple(x.shape)}.")
    n, _, h, w = x.shape
    draws = sample_synthesis_augment("authors", n, h, w, crop_scale=crop_scale, jitter=jitter, generator=generator)
    return apply_synthesis_augment(x, "authors", {k: to_device_async(v, x.device) for k, v in draws.items()})


def sample_synthesis_augment(
    kind: str, n: int, height: int, width: int, *, crop_scale: Sequence[float], jitter: int = AUTHORS_JITTER,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """The random draws of one :func:`synthesis_augment` view of an ``(n, C, height, width)`` batch, on the CPU,
    in the generator order of the per-iteration call (so a whole checkpoint interval can be drawn ahead and
    uploaded at once, issue 32). Keys: ``authors`` below 128 px ``index`` (offset i, j, flip, shift dh, dw);
    ``authors`` at ImageNet scale ``boxes`` (1, 4), ``flip`` (1,), ``shift`` (2,); ``per_image_rrc``
    ``boxes`` (n, 4), ``flip`` (n,); ``none``: nothing."""
    if kind == "none":
        return {}
    if kind == "authors":
        if is_imagenet_scale(height):
            one = sample_crop_flip(1, height, width, scale=crop_scale, generator=generator)
            shift = torch.randint(0, int(jitter) + 1, (2,), generator=generator)
            return {"boxes": one.boxes, "flip": one.flip, "shift": shift}
        p = authors_pad(height)
        offset = torch.randint(0, 2 * p + 1, (2,), generator=generator)
        flip = (torch.rand((), generator=generator) < 0.5).long().view(1)
        shift = torch.randint(0, int(jitter) + 1, (2,), generator=generator)
        return {"index": torch.cat([offset, flip, shift])}
    if kind == "per_image_rrc":
        params = sample_crop_flip(n, height, width, scale=tuple(crop_scale), generator=generator)
        return {"boxes": params.boxes, "flip": params.flip}
    raise GVBSMError(f"Unknown augmentation {kind!r}; choose one of {AUGMENT_KINDS}.")


def apply_synthesis_augment(x: torch.Tensor, kind: str, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """The view of ``x`` that :func:`sample_synthesis_augment`'s ``draws`` describe (already on ``x``'s
    device: no copy here, no value read back to Python). Differentiable w.r.t. ``x``."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    if kind == "authors" and "index" in draws:
        p = authors_pad(h)
        i, j, f, dh, dw = draws["index"]
        cols = _roll_index(w, dw)
        cols = torch.where(f.bool(), (w - 1) - cols, cols)  # the flip before the roll: read the columns backwards
        padded = F.pad(x, (p, p, p, p))
        return padded.index_select(2, i + _roll_index(h, dh)).index_select(3, j + cols)
    if kind == "authors":
        params = CropFlipParams(draws["boxes"].expand(n, 4).contiguous(), draws["flip"].expand(n).contiguous())
        out = apply_crop_flip(x, params, (h, w))
        shift = draws["shift"]
        return out.index_select(2, _roll_index(h, shift[0])).index_select(3, _roll_index(w, shift[1]))
    if kind == "per_image_rrc":
        return apply_crop_flip(x, CropFlipParams(draws["boxes"], draws["flip"]), (h, w))
    raise GVBSMError(f"Unknown augmentation {kind!r}; choose one of {AUGMENT_KINDS}.")


def synthesis_augment(
    x: torch.Tensor, kind: str, *, crop_scale: Sequence[float], generator: torch.Generator | None
) -> torch.Tensor:
    """The synthetic batch's view at one iteration: ``authors`` (one crop/flip/roll per batch,
    :func:`authors_batch_augment`), ``per_image_rrc`` (an independent random-resized crop + flip
    per image, gvbsm-hf 0.1) or ``none``: :func:`sample_synthesis_augment` then
    :func:`apply_synthesis_augment` (the draws uploaded pinned and non-blocking)."""
    n, _, h, w = x.shape
    draws = sample_synthesis_augment(kind, n, h, w, crop_scale=crop_scale, generator=generator)
    return apply_synthesis_augment(x, kind, {k: to_device_async(v, x.device) for k, v in draws.items()})


def recording_augment(
    x: torch.Tensor, kind: str, *, crop_scale: Sequence[float], generator: torch.Generator | None
) -> torch.Tensor:
    """The real batch's view in the record stage: ``authors`` = each dataset's train transform per
    image (pad-crop + flip below 128 px, random-resized crop + flip at ImageNet scale),
    ``per_image_rrc`` = a random-resized crop (``crop_scale``) + flip per image, ``none``."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    if kind == "authors" and not is_imagenet_scale(h):
        return pad_crop_flip(x, padding=authors_pad(h), generator=generator)
    if kind in ("authors", "per_image_rrc"):
        return random_resized_crop_flip(x, scale=tuple(crop_scale), generator=generator)
    raise GVBSMError(f"Unknown augmentation {kind!r}; choose one of {AUGMENT_KINDS}.")
