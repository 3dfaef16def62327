"""Train from an exported folder (or its Hub repo) alone: the stored views replayed, no teacher needed.

:class:`StoredViews` is a ``torch.utils.data.Dataset`` over an export's ``default`` config (images,
labels) and ``views`` config (per image and view: crop box, flip, teacher-ensemble logits of that
view; docs/method.md Eq. 8). Item ``i`` is image ``i`` cropped and flipped as its view
``epoch % V`` (the cycling rule: with ``V`` views per image, epoch ``e`` replays view ``e mod V``,
exactly as the evaluate stage's stored mode does) with that view's logits::

    views = StoredViews("org/fashion-mnist-gvbsm-ipc10")
    for epoch in range(300):
        views.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(views, batch_size=50, shuffle=True):
            ...  # batch["pixel_values"] (normalised), batch["soft_logits"], batch["labels"]

The crops are the same bilinear ``roi_align`` crops the evaluate stage applies, and a view that was
relabelled under CutMix comes with its stored partner's view pasted into the stored box (the
teachers labelled that mixed view), so a student trained with it sees bit for bit the views and
labels of the package's own stored-view row. ``lam`` (the fraction of the image's own pixels) and
``partner_labels`` give the CutMix-mixed ground truth ``lam * y + (1 - lam) * y_partner`` to whoever
wants it; the authors' Eq. 11 keeps the image's own label (``labels``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import DataValidationError
from .export.loading import load_distilled_dataset, load_distilled_spec, load_stored_soft_labels, to_tensors

__all__ = ["StoredViews"]


class StoredViews(Dataset):
    """The stored views of an export, replayed (see the module docstring).

    Args:
        folder_or_repo: an export folder (``export_distilled_dataset``) or its Hub dataset id.
        epoch: the initial epoch (``set_epoch`` changes it; view = ``epoch % num_views``).
    """

    def __init__(self, folder_or_repo: str | Path, epoch: int = 0) -> None:
        self.spec = load_distilled_spec(folder_or_repo)
        images, labels, _ = to_tensors(load_distilled_dataset(folder_or_repo), self.spec)
        self.images = self.spec.normalize(images)
        self.labels = labels
        self.stored = load_stored_soft_labels(folder_or_repo)
        if len(self.stored) != len(self.images):
            raise DataValidationError(f"{folder_or_repo}: {len(self.stored)} stored views rows for {len(self.images)} "
                                      "images; the views config belongs to another export: export again.")
        self.epoch = int(epoch)

    @property
    def num_views(self) -> int:
        return self.stored.num_views

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def set_epoch(self, epoch: int) -> None:
        """Replay view ``epoch % num_views`` of every image from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def view(self, index: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``index`` as their views ``view`` (normalised, ``(B, C, H, W)``; CutMix-ed views with
        their stored partner pasted in) and those views' logits ``(B, K)``."""
        partner, _, _ = self.stored.mix_params(view, index)
        partner_images = self.images[partner.clamp(min=0)] if self.stored.has_mix else None
        x = self.stored.replay(self.images[index], view, index, partner_images=partner_images)
        return x, self.stored.dense_logits(view, index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index, view = torch.tensor([int(i)]), torch.tensor([self.epoch % self.num_views])
        x, logits = self.view(index, view)
        partner, _, lam = self.stored.mix_params(view, index)
        partner_label = self.labels[partner[0]] if partner[0] >= 0 else self.labels[i]
        return {"pixel_values": x[0], "soft_logits": logits[0], "labels": self.labels[i],
                "partner_labels": partner_label, "lam": lam[0]}
