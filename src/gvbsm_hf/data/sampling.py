"""Seeded, class-balanced sampling of rows: subsets (``max_*_samples``, the random real subset,
recording) and stratified held-out splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from ..errors import GVBSMError
import torch

logger = logging.getLogger(__name__)


def labels_array(labels: Any) -> np.ndarray:
    """Labels as int64 numpy, fast for ``datasets`` columns (``Column`` / Arrow) too."""
    if isinstance(labels, np.ndarray):
        return labels.astype(np.int64, copy=False).reshape(-1)
    if isinstance(labels, torch.Tensor):
        return labels.detach().to("cpu", torch.int64).numpy().reshape(-1)
    column_cls = getattr(datasets.arrow_dataset, "Column", None)
    if column_cls is not None and isinstance(labels, column_cls) and isinstance(labels.source, datasets.Dataset):
        return labels.source.with_format("arrow")[labels.column_name].to_numpy().astype(np.int64).reshape(-1)
    if hasattr(labels, "to_numpy"):  # pyarrow arrays
        return np.asarray(labels.to_numpy(), dtype=np.int64).reshape(-1)
    return np.asarray(list(labels), dtype=np.int64).reshape(-1)


def split_labels(split: datasets.Dataset) -> np.ndarray:
    return split.with_format("arrow")["label"].to_numpy().astype(np.int64)


def class_balanced_indices(
    labels: Sequence[int], n_per_class: int | None = None, total: int | None = None, seed: int = 0
) -> list[int]:
    """Seeded class-balanced subset of row indices (sorted).

    ``n_per_class``: up to that many rows of every class present. ``total``: that many rows in all,
    spread as evenly as the class sizes allow (small classes give their share to the others; the
    remainder goes to randomly chosen classes). Neither: every index. Used for ``max_*_samples``
    and for the "random real subset" baseline.
    """
    if n_per_class is not None and total is not None:
        raise GVBSMError("class_balanced_indices: give n_per_class or total, not both.")
    y = labels_array(labels)
    if n_per_class is None and total is None:
        return list(range(len(y)))
    if (n_per_class is not None and n_per_class < 0) or (total is not None and total < 0):
        raise GVBSMError(f"class_balanced_indices: n_per_class={n_per_class} / total={total} must be >= 0.")
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    members = [rng.permutation(order[s : s + c]) for s, c in zip(starts, counts)]
    if n_per_class is not None:
        quota = np.minimum(counts, n_per_class)
    else:
        quota = np.zeros(len(classes), dtype=np.int64)
        remaining = min(int(total), len(y))
        active = np.arange(len(classes))
        while len(active):
            q = remaining // len(active)
            small = active[counts[active] <= q]
            if len(small) == 0:
                quota[active] = q
                remaining -= q * len(active)
                extra = rng.permutation(active)[:remaining]
                quota[extra] += 1
                break
            quota[small] = counts[small]
            remaining -= int(counts[small].sum())
            active = active[counts[active] > q]
    chosen = np.concatenate([m[:k] for m, k in zip(members, quota)]) if len(classes) else np.zeros(0, np.int64)
    return sorted(int(i) for i in chosen)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified (train, held-out) index split; every class with >= 2 rows gives >= 1."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(idx[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).tolist(), held_idx.tolist()


def class_balanced_subset(split: Any, max_samples: int | None, seed: int) -> Any:
    """A seeded class-balanced subset of ``max_samples`` rows of a ``datasets`` split (``None``: the whole
    split); a streaming split gives its first ``max_samples`` rows after a seeded shuffle."""
    if max_samples is None:
        return split
    if isinstance(split, datasets.IterableDataset):
        logger.warning("streaming: max_*_samples takes the first rows after a seeded shuffle (not class-balanced)")
        return split.shuffle(seed=seed, buffer_size=10_000).take(max_samples)
    if max_samples >= len(split):
        return split
    return split.select(class_balanced_indices(split_labels(split), total=max_samples, seed=seed))
