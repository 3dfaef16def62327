"""The stored views of relabelling: how they are drawn and how they are replayed.

View parameters of image ``i`` come from a CPU ``torch.Generator`` seeded with
``derive_seed(seed, i)``: they do not depend on the batch size, on the order of the batches or on
the number of processes. By default every view is a random resized crop (the student's own
augmentation); ``clean_view=True`` makes view 0 the whole unflipped image (useful for inspecting
or publishing one label per image) without changing views ``1..V-1``. With ``cutmix_prob > 0`` a
view is also CutMix-ed with a partner image (:func:`sample_view_cutmix`); the teachers label the
MIXED crop, so a student replaying the views sees what the teachers saw (docs/method.md
"Stored views").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..augment import CropFlipParams, apply_crop_flip, cutmix_boxes, paste_boxes, sample_crop_flip
from ..errors import GVBSMError
from ..progress import progress_bar
from ..utils import derive_seed

__all__ = ["ViewSampling", "replay_views", "sample_image_views", "sample_view_cutmix", "sample_views"]


@dataclass(frozen=True)
class ViewSampling:
    """How the stored views are drawn, besides their number and seed (``RelabelArguments``).

    Attributes:
        out_size: side of the crops fed to the teachers (the student's input side, ``spec.image_size``).
        crop_scale: random-resized-crop area range (the student's ``student_crop_scale``).
        flip_prob: probability of a horizontal flip.
        clean_view: make view 0 the whole, unflipped image (views ``1..V-1`` unchanged).
        cutmix_prob / cutmix_alpha: CutMix of the views (:func:`sample_view_cutmix`, the student's
            ``cutmix_prob``); the teachers label the mixed crop.
    """

    out_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_prob: float = 0.5
    clean_view: bool = False
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_size", int(self.out_size))
        object.__setattr__(self, "crop_scale", (float(self.crop_scale[0]), float(self.crop_scale[1])))
        object.__setattr__(self, "cutmix_prob", float(self.cutmix_prob))
        object.__setattr__(self, "cutmix_alpha", float(self.cutmix_alpha))


def _identity_boxes(n: int, height: int, width: int) -> torch.Tensor:
    """Boxes ``(x1, y1, x2, y2)`` covering the whole image (the augment module's box format)."""
    return torch.tensor([0.0, 0.0, float(width), float(height)]).expand(n, 4).clone()


def sample_image_views(
    image_index: int,
    num_views: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    clean_view: bool = False,
) -> CropFlipParams:
    """The ``num_views`` crop/flip parameters of image ``image_index`` (deterministic).

    Drawn by :func:`gvbsm_hf.augment.sample_crop_flip` from a generator seeded with
    ``derive_seed(seed, image_index)``. With ``clean_view`` view 0 is replaced by the identity
    (whole image, no flip); views ``1..V-1`` are the same with or without it.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, image_index))
    params = sample_crop_flip(
        num_views, height, width, scale=tuple(crop_scale), flip_prob=flip_prob, generator=g
    )
    boxes = params.boxes.detach().to("cpu", torch.float32).clone()
    flip = params.flip.detach().to("cpu").bool().clone()
    if clean_view:
        boxes[0] = _identity_boxes(1, height, width)[0]
        flip[0] = False
    return CropFlipParams(boxes=boxes, flip=flip)


def sample_view_cutmix(
    num_images: int, num_views: int, size: int, *, prob: float, alpha: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix of the stored views (docs/method.md "Stored views"): ``(partner, boxes)``.

    ``partner`` ``(N, V)`` int32 is the image whose crop is pasted into view ``v`` of image ``i``
    (``-1``: not mixed); ``boxes`` ``(N, V, 4)`` int16 ``(y1, y2, x1, x2)`` in pixels of the
    ``size x size`` crop (zeros when not mixed). View ``v`` pairs the images by one permutation of
    all ``N`` (each image is pasted once per view, as batch CutMix does inside a batch); each
    ``(i, v)`` is mixed with probability ``prob``; box as :func:`gvbsm_hf.augment.cutmix`
    (``lam0 ~ Beta(alpha, alpha)``, side ``sqrt(1 - lam0)``, uniform centre, clipped). Drawn per view
    from ``derive_seed(seed, "cutmix", v)``: independent of batch size, batch order and processes.
    """
    if not 0.0 <= float(prob) <= 1.0:
        raise GVBSMError(f"cutmix_prob={prob} must be in [0, 1].")
    if alpha <= 0:
        raise GVBSMError(f"cutmix alpha={alpha} must be > 0.")
    partner = torch.full((num_images, num_views), -1, dtype=torch.int32)
    boxes = torch.zeros(num_images, num_views, 4, dtype=torch.int16)
    if prob <= 0 or num_images == 0:
        return partner, boxes
    if size > torch.iinfo(torch.int16).max:
        raise GVBSMError(f"crop size {size} is too large for int16 CutMix boxes.")
    for v in range(num_views):
        rng = np.random.default_rng(derive_seed(seed, "cutmix", v))
        perm = rng.permutation(num_images)
        mixed = rng.random(num_images) < prob
        box = cutmix_boxes(rng.beta(alpha, alpha, num_images), rng.random((num_images, 2)), size)
        partner[:, v] = torch.from_numpy(np.where(mixed, perm, -1).astype(np.int32))
        boxes[:, v] = torch.from_numpy(np.where(mixed[:, None], box, 0).astype(np.int16))
    return partner, boxes


def sample_views(
    num_images: int, num_views: int, height: int, width: int, sampling: ViewSampling, *, seed: int = 0,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every image's views: ``(boxes (N, V, 4) float32, flip (N, V) bool, mix_partner, mix_boxes)``,
    the CutMix pair ``None`` when ``sampling.cutmix_prob == 0`` (cheap and deterministic: every
    process computes all of them)."""
    boxes = torch.empty(num_images, num_views, 4, dtype=torch.float32)
    flip = torch.empty(num_images, num_views, dtype=torch.bool)
    quiet = not (show_progress and num_images >= 10_000)
    for i in progress_bar(range(num_images), desc="relabel views", disable=quiet):
        p = sample_image_views(i, num_views, height, width, seed=seed, crop_scale=sampling.crop_scale,
                               flip_prob=sampling.flip_prob, clean_view=sampling.clean_view)
        boxes[i], flip[i] = p.boxes, p.flip
    partner, mix_boxes = sample_view_cutmix(num_images, num_views, sampling.out_size, prob=sampling.cutmix_prob,
                                            alpha=sampling.cutmix_alpha, seed=seed)
    if sampling.cutmix_prob <= 0:
        return boxes, flip, None, None
    return boxes, flip, partner, mix_boxes


def replay_views(
    images: torch.Tensor,
    params: CropFlipParams,
    out_size: int,
    *,
    partner_images: torch.Tensor | None = None,
    partner_params: CropFlipParams | None = None,
    mix_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The views of stored relabelling: crop + flip of each row, then (with ``mix_boxes``) the
    partner's own crop + flip pasted into the box (an all-zero box: not mixed)."""
    x = apply_crop_flip(images, params.to(images.device), out_size)
    if mix_boxes is None:
        return x
    if partner_images is None or partner_params is None:
        raise GVBSMError("CutMix-ed stored views need the partner images and their view parameters.")
    xp = apply_crop_flip(partner_images.to(images.device), partner_params.to(images.device), out_size)
    return paste_boxes(x, xp, mix_boxes)
