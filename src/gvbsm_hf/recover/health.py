"""The recover health check: the teacher ensemble (Eq. 8) on the shipped images, against chance."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..ensemble import TeacherEnsemble


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
