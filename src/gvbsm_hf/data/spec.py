"""What the pipeline needs to know about an image-classification dataset (:class:`DatasetSpec`),
and how to get it from a loaded ``DatasetDict`` (:func:`get_dataset_spec`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import DataValidationError
from .builtin import EVAL_VIEWS, TRAIN_VIEWS, preprocessing_for


@dataclass(frozen=True)
class DatasetSpec:
    """Resolution, channels, normalisation, classes and preprocessing of an image-classification dataset.

    The preprocessing fields (``train_view``, ``eval_view``, ``eval_crop_ratio``, ``stream_splits``;
    see :class:`gvbsm_hf.data.builtin.Preprocessing`) default to
    :func:`~gvbsm_hf.data.builtin.preprocessing_for` ``(image_size)``: pad-crop / identity and
    whole-split decoding below 128 px, RandomResizedCrop of the original image / Resize +
    CenterCrop and streamed splits at ImageNet scale. Give them to override the rule.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    license: str | None = None
    source: str | None = None
    train_view: str | None = None
    eval_view: str | None = None
    eval_crop_ratio: float | None = None
    stream_splits: bool | None = None

    def __post_init__(self) -> None:
        default = preprocessing_for(self.image_size)
        for name in ("train_view", "eval_view", "eval_crop_ratio", "stream_splits"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(default, name))
        if self.train_view not in TRAIN_VIEWS:
            raise DataValidationError(f"train_view={self.train_view!r}: use one of {TRAIN_VIEWS}.")
        if self.eval_view not in EVAL_VIEWS:
            raise DataValidationError(f"eval_view={self.eval_view!r}: use one of {EVAL_VIEWS}.")
        if not 0.0 < float(self.eval_crop_ratio) <= 1.0:
            raise DataValidationError(f"eval_crop_ratio={self.eval_crop_ratio} must be in (0, 1] (ImageNet: 0.875).")

    @property
    def eval_resize_size(self) -> int:
        """The shorter side an image is resized to before the evaluation centre crop
        (``round(image_size / eval_crop_ratio)``: 256 for 224; ``image_size`` for ``eval_view="resize"``)."""
        if self.eval_view == "resize":
            return int(self.image_size)
        return int(round(self.image_size / float(self.eval_crop_ratio)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) ``(N, C, H, W)`` -> normalised float32."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float -> float in [0, 1] (clamped)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def pixel_bounds(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(low, high)`` of the normalised range, shaped ``(1, C, 1, 1)``."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        d = dict(d)
        for k in ("mean", "std", "class_names"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)
