"""What the student is scored with: top-1 accuracy (%) on the real validation split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from ..errors import GVBSMError

__all__ = ["argmax_logits", "compute_top1", "logits_of"]


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep only the predicted class (saves memory in eval)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_top1(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy (in %) from predicted classes ``(N,)`` or logits ``(N, K)`` (torch, offline)."""
    preds = eval_pred.predictions
    if isinstance(preds, (tuple, list)):
        preds = preds[0]
    preds = torch.as_tensor(np.asarray(preds))
    labels = torch.as_tensor(np.asarray(eval_pred.label_ids)).long().reshape(-1)
    if preds.ndim > 1:
        preds = preds.argmax(dim=-1)
    preds = preds.long().reshape(-1)
    return {"top1": 100.0 * (preds == labels).double().mean().item() if labels.numel() else float("nan")}


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits ``(B, K)`` of a student's output (a tensor, a mapping / ``ModelOutput``, or a tuple)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "logits"):
        return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise GVBSMError(f"The student returned {type(outputs).__name__}; it must return logits (B, K).")
