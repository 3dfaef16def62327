"""The teacher ensemble: frozen teachers whose logits are averaged on the same input (docs/method.md Eq. 8)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import GVBSMError
from .losses import ensemble_logits, soft_labels


class TeacherEnsemble(nn.Module):
    """Frozen teachers whose logits are averaged on the same input (docs/method.md Eq. 8).

    Args:
        teachers: modules mapping a normalised batch ``(B, C, H, W)`` to logits ``(B, K)``
            (``TeacherModel`` or any backbone).
        logit_norm: rescale each teacher's logits to the mean Frobenius norm before averaging
            (Eq. 8 with LN, used for ImageNet-1k).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` autocast for the teacher forwards
            (the ensemble is always returned in float32).
        channels_last: feed the teachers a ``channels_last`` batch.

    The teachers stay in eval mode (``.train()`` is a no-op) with ``requires_grad=False``, and
    the forward runs under ``torch.no_grad()``: the result can be used as a target of a loss.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        *,
        logit_norm: bool = False,
        mixed_precision: str = "no",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise GVBSMError("TeacherEnsemble needs at least one teacher: pass a non-empty list of teacher models.")
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise GVBSMError(f"mixed_precision={mixed_precision!r}: use 'no', 'bf16' or 'fp16'.")
        declared = {self._declared_classes(t) for t in teachers} - {None}
        if len(declared) > 1:
            raise GVBSMError(
                f"The teachers predict different numbers of classes {sorted(declared)}: ensemble only teachers "
                "trained on the same dataset."
            )
        self.teachers = nn.ModuleList(teachers)
        self.logit_norm = bool(logit_norm)
        self.mixed_precision = mixed_precision
        self.channels_last = bool(channels_last)
        if channels_last:
            self.teachers.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":  # noqa: D401 - nn.Module API
        """Teachers are always in eval mode (BatchNorm running statistics, no dropout)."""
        return super().train(False)

    @staticmethod
    def _declared_classes(teacher: nn.Module) -> int | None:
        k = getattr(teacher, "num_classes", None)
        if k is None:
            cfg = getattr(teacher, "config", None)
            k = cfg.get("num_classes") if isinstance(cfg, Mapping) else getattr(cfg, "num_classes", None)
        return int(k) if isinstance(k, int) else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes the teachers declare (``TeacherModel.num_classes``), ``None`` if unknown."""
        return self._declared_classes(self.teachers[0])

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _autocast(self, device: torch.device):
        if self.mixed_precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)

    def teacher_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-teacher float32 logits on the same batch ``x`` (no gradient)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self._autocast(x.device):
            return [t(x).float() for t in self.teachers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble logits ``z~`` of a normalised batch (Eq. 8), float32, no gradient."""
        with torch.no_grad():
            return ensemble_logits(self.teacher_logits(x), logit_norm=self.logit_norm).float()

    def soft_labels(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Soft labels ``softmax(z~ / tau)`` (Eq. 8)."""
        return soft_labels(self(x), temperature)


# --------------------------------------------------------------------------------------------
# Stored soft labels
# --------------------------------------------------------------------------------------------
