"""The recover health check: the teacher ensemble (Eq. 8) on the shipped images, against chance, and the
image diagnostics of the set against real images of its classes (docs/method.md "Image diagnostics")."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..ensemble import TeacherEnsemble
from ..image_diagnostics import diagnose

DIAGNOSTIC_REAL_PER_CLASS = 50
"""At most this many real train images per class are the diagnostics' reference (seeded, the same for every method)."""
DIAGNOSTIC_REAL_TOTAL = 1000
"""... and at most about this many in all (but at least 2 per class, for the within-class spread)."""
DIAGNOSTIC_SEED = 0
"""Seed of the reference's class-balanced draw (``class_balanced_indices``)."""


def diagnostic_real_per_class(num_classes: int) -> int:
    """Real reference images per class: ``max(2, min(50, 1000 // K))`` (10 classes: 50; ImageNet-1k: 2)."""
    return max(2, min(DIAGNOSTIC_REAL_PER_CLASS, DIAGNOSTIC_REAL_TOTAL // max(int(num_classes), 1)))


def synthesis_diagnostics(syn, real: tuple[torch.Tensor, torch.Tensor], teachers, spec) -> dict[str, float]:
    """:func:`~gvbsm_hf.image_diagnostics.diagnose` of the published images (uint8) of ``syn`` against the
    real reference ``real`` (uint8 images, labels), in the teachers ``teachers`` (docs/method.md Eq. 13-17)."""
    return diagnose(syn.uint8_images(spec), syn.labels, real[0], real[1], list(teachers), spec)


def synthesis_health(syn, teachers, spec, device) -> dict[str, Any]:
    """The teacher ensemble on the shipped images (no augmentation): top-1 and cross-entropy, against
    chance (``ln K``). A set the teachers classify worse than chance has diverged (e.g. a huge syn_lr)."""
    ensemble = TeacherEnsemble(list(teachers)).to(device).eval()
    with torch.no_grad():
        logits = torch.cat([ensemble(b.to(device)).float().cpu() for b in syn.shipped_images(spec).split(256)])
    ce = float(F.cross_entropy(logits, syn.labels.long()))
    top1 = float((logits.argmax(1) == syn.labels).float().mean() * 100)
    chance = math.log(spec.num_classes)
    healthy = math.isfinite(ce) and ce < chance and top1 > 100.0 / spec.num_classes
    return {"ensemble_top1": round(top1, 2), "ensemble_ce": round(ce, 4), "chance_ce": round(chance, 4),
            "num_classes": spec.num_classes, "healthy": healthy}
