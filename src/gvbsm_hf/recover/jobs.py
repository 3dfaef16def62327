"""Synthesis jobs: the reorder loop's batches (class chunk x slot chunk) and the cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import GVBSMError


@dataclass(frozen=True)
class SynthesisJob:
    """One synthesis batch: every class in ``classes`` times every slot in ``slots``."""

    index: int
    classes: tuple[int, ...]
    slots: tuple[int, ...]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([c for c in self.classes for _ in self.slots], dtype=torch.long)

    @property
    def slot_ids(self) -> torch.Tensor:
        return torch.tensor([s for _ in self.classes for s in self.slots], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.classes) * len(self.slots)


def plan_jobs(num_classes: int, ipc: int, classes_per_batch: int | None, slots_per_batch: int | None) -> list[SynthesisJob]:
    """The reorder loop: jobs over (class chunk) x (slot chunk)."""
    cpb = classes_per_batch or num_classes
    spb = slots_per_batch or ipc
    if cpb <= 0 or spb <= 0:
        raise GVBSMError("syn_classes_per_batch and syn_slots_per_batch must be positive.")
    jobs = []
    for s0 in range(0, ipc, spb):
        for c0 in range(0, num_classes, cpb):
            jobs.append(
                SynthesisJob(len(jobs), tuple(range(c0, min(c0 + cpb, num_classes))), tuple(range(s0, min(s0 + spb, ipc))))
            )
    return jobs


def cosine_lr(base_lr: float, iteration: int, total: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total`` iterations."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * iteration / max(total, 1)))
