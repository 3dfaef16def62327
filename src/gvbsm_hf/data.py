"""Datasets as ``datasets.DatasetDict`` (``image``: Image, ``label``: ClassLabel) plus what the
rest of the pipeline needs to know about them (:class:`DatasetSpec`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DatasetSpec:
    """Resolution, channels, normalisation and classes of an image-classification dataset."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    license: str | None = None
    source: str | None = None

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
