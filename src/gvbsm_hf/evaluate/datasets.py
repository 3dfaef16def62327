"""The student's datasets: the distilled images it trains on and the real split it is evaluated on.

Both yield ``{"pixel_values", "labels", "index"}``; ``index`` is the row number, with which the
stored soft labels of a row are looked up (docs/method.md "Stored views")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..data import DatasetSpec
from ..errors import DataValidationError

__all__ = ["RealImageDataset", "SyntheticImageDataset"]


class SyntheticImageDataset(Dataset):
    """Distilled images held in memory, yielding ``{"pixel_values", "labels", "index"}``.

    ``images`` are normalised floats ``(N, C, H, W)``, or uint8 together with ``spec`` (then
    normalised once here).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], spec: DatasetSpec | None = None):
        if images.ndim != 4:
            raise DataValidationError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
        if images.dtype == torch.uint8:
            if spec is None:
                raise DataValidationError("uint8 images need the DatasetSpec to be normalised: pass spec=.")
            images = spec.normalize(images)
        elif not images.is_floating_point():
            raise DataValidationError(f"images must be uint8 or normalised float, got {images.dtype}.")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataValidationError(
                f"{images.shape[0]} images but {labels.numel()} labels: pass one integer label per image."
            )
        self.images = images.detach().float().contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}


class RealImageDataset(Dataset):
    """Real uint8 images ``(N, C, H, W)``, normalised per item with ``spec`` (memory-friendly).

    ``images`` is a uint8 tensor or a :class:`gvbsm_hf.data.DecodedImages` (a split decoded on
    access): then each item is decoded when the evaluation ``DataLoader`` asks for it (in its
    worker processes), so the split is never held decoded."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], spec: DatasetSpec):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DataValidationError(
                f"RealImageDataset expects uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}: "
                "use gvbsm_hf.data.to_uint8_tensors."
            )
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataValidationError(f"{images.shape[0]} images but {labels.numel()} labels.")
        self.images, self.labels, self.spec = images, labels, spec

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.spec.normalize(self.images[i : i + 1])[0]
        return {"pixel_values": x, "labels": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}
