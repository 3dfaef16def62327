"""The random draws of a stretch of recover iterations, made at once (docs/method.md "Recover", issue 32).

Per iteration the job's CPU generator draws, in this order: the backbone (GBM, Eq. 7; ``uniform`` choice
with several teachers), the augmentation (:func:`gvbsm_hf.augment_families.sample_synthesis_augment`), the real
rows (methods that regress on real images), then the method's loss draws (``loss.draw``: beta_dr drops,
pool seeds). When the method declares its loss draws, a whole checkpoint interval is drawn in that order
before its first step and every tensor is uploaded in one copy per dtype (pinned, non-blocking on CUDA);
the steps only index views of those buffers. Otherwise the interval is one iteration and the loss draws
from the generator itself, as before. Either way the numbers are the per-iteration ones, and the
generator state before every iteration is kept, so a checkpoint written mid-interval resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..utils import to_device_async

__all__ = ["IterationDraws", "IntervalDraws", "upload_batched"]


@dataclass
class IterationDraws:
    """One iteration's draws: ``backbone`` (slot index), ``augment`` (device tensors), ``real_rows`` (CPU
    rows of the real train split, or ``None``) and ``loss`` (the method's draws, ``None``: the loss draws
    from the generator itself)."""

    backbone: int
    augment: dict[str, torch.Tensor]
    real_rows: torch.Tensor | None
    loss: dict[str, Any] | None


@dataclass
class IntervalDraws:
    """The draws of iterations ``start .. start + len(items) - 1`` and the generator state before each of
    them (``rng_states[i]``)."""

    start: int
    items: list[IterationDraws]
    rng_states: list[torch.Tensor]

    @property
    def stop(self) -> int:
        return self.start + len(self.items)

    def covers(self, iteration: int) -> bool:
        return self.start <= iteration < self.stop

    def at(self, iteration: int) -> IterationDraws:
        return self.items[iteration - self.start]

    def rng_state(self, iteration: int) -> torch.Tensor:
        """The generator state before ``iteration``'s draws (an iteration the interval covers)."""
        return self.rng_states[iteration - self.start]


def upload_batched(items: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """``items`` with every tensor on ``device``: all tensors of one dtype concatenated and copied in ONE
    transfer (pinned, non-blocking on CUDA), each item's tensors views of that buffer (no copy, no sync);
    other values (Python numbers) as they are."""
    parts: dict[torch.dtype, list[torch.Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}
    where: list[dict[str, tuple[torch.dtype, int, torch.Size]]] = []
    for item in items:
        spots = {}
        for key, value in item.items():
            if isinstance(value, torch.Tensor):
                offset = sizes.get(value.dtype, 0)
                parts.setdefault(value.dtype, []).append(value.reshape(-1))
                sizes[value.dtype] = offset + value.numel()
                spots[key] = (value.dtype, offset, value.shape)
        where.append(spots)
    buffers = {dtype: to_device_async(torch.cat(chunks), device) for dtype, chunks in parts.items()}
    out = []
    for item, spots in zip(items, where):
        placed = dict(item)
        for key, (dtype, offset, shape) in spots.items():
            n = shape.numel()
            placed[key] = buffers[dtype][offset:offset + n].view(shape)
        out.append(placed)
    return out
