"""A split decoded on access (:class:`DecodedImages`): indexes like a uint8 tensor but decodes only
the rows asked for, in DataLoader worker processes, so no stage holds a whole large split."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch

from ..errors import GVBSMError
from ..fingerprint import config_fingerprint
from .sampling import split_labels
from .spec import DatasetSpec



from .decoding import _DecodedBatches, _decode_batch, to_uint8_tensors


class DecodedImages(torch.utils.data.Dataset):
    """The images of a map-style ``datasets`` split as a lazily decoded uint8 ``(N, C, H, W)`` "tensor".

    Indexing with an int, a slice, a list or a 1-D integer tensor decodes exactly those rows
    (the spec's evaluation view, :func:`_view_array`) and returns a real uint8 tensor, so the stages
    that index the real splits (teacher training, real initialisation, the random real subset, the
    validation of :class:`gvbsm_hf.evaluate.datasets.RealImageDataset`) work on it unchanged while nothing
    decodes the whole split: memory is one request's images, not the split's. Index requests of
    more than ``batch_size`` rows are decoded in ``num_workers`` ``DataLoader`` worker processes
    (0: in this process). It is a map-style ``torch.utils.data.Dataset`` (item ``i``: image ``i``,
    ``(C, H, W)``), so a ``DataLoader`` streams it in batches through its workers.

    ``shape``, ``dtype`` (uint8), ``ndim`` (4), ``len`` and ``cpu()`` (itself) are those of the
    tensor :func:`to_uint8_tensors` would return; ``labels`` is the int64 label column and
    ``fingerprint`` identifies the split (its ``datasets`` fingerprint) and the view.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, split: datasets.Dataset, spec: DatasetSpec, *, num_workers: int = 0,
                 batch_size: int = 256) -> None:
        if isinstance(split, datasets.IterableDataset):
            raise GVBSMError("DecodedImages needs a map-style split (random access); a streamed split is read with "
                             "image_batches.")
        if num_workers < 0 or batch_size < 1:
            raise GVBSMError(f"num_workers={num_workers} must be >= 0 and batch_size={batch_size} >= 1.")
        self.spec, self.num_workers, self.batch_size = spec, int(num_workers), int(batch_size)
        self._raw = split.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
        self._n = len(split)
        self._labels = torch.from_numpy(split_labels(split))
        self._split_fingerprint = getattr(split, "_fingerprint", None)

    # -- tensor-like ----------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        s = int(self.spec.image_size)
        return torch.Size((self._n, int(self.spec.channels), s, s))

    def __len__(self) -> int:
        return self._n

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def cpu(self) -> "DecodedImages":
        return self

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def fingerprint(self) -> str:
        s = self.spec
        key = [self._split_fingerprint, self._n, s.image_size, s.channels, s.eval_view, s.eval_crop_ratio]
        return config_fingerprint(key)

    def __repr__(self) -> str:
        return (f"DecodedImages({self._n} x {tuple(self.shape[1:])} uint8, decoded on access, "
                f"eval view {self.spec.eval_view!r})")

    def _rows(self, key: Any) -> tuple[list[int], bool]:
        """Row numbers asked for by ``key`` and whether the result keeps a batch dimension."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0
                                                  and not key.is_floating_point()):
            i = int(key)
            if not -self._n <= i < self._n:
                raise IndexError(f"index {i} is out of range for {self._n} images")
            return [i % self._n], False
        if isinstance(key, slice):
            return list(range(*key.indices(self._n))), True
        if isinstance(key, torch.Tensor):
            if key.dtype == torch.bool or key.is_floating_point() or key.ndim != 1:
                raise TypeError(f"DecodedImages is indexed by integers (1-D), not a {key.dtype} {tuple(key.shape)} tensor")
            key = key.tolist()
        rows = [int(i) for i in np.asarray(key, dtype=np.int64).reshape(-1)] if len(key) else []
        bad = [i for i in rows if not -self._n <= i < self._n]
        if bad:
            raise IndexError(f"index {bad[0]} is out of range for {self._n} images")
        return [i % self._n for i in rows], True

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, batched = self._rows(key)
        images = self.decode(rows)
        return images if batched else images[0]

    def decode(self, rows: Sequence[int]) -> torch.Tensor:
        """uint8 ``(len(rows), C, H, W)`` of those rows, in that order (workers for long requests)."""
        rows = list(rows)
        if not rows:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        if self.num_workers == 0 or len(rows) <= self.batch_size:
            return _decode_batch(self._raw[rows]["image"], self.spec)
        order = torch.as_tensor(rows, dtype=torch.long)
        nb = math.ceil(len(rows) / self.batch_size)
        parts = _DecodedBatches(self._raw, self.spec, order, self.batch_size, list(range(nb)), with_labels=False)
        loader = torch.utils.data.DataLoader(parts, batch_size=None, shuffle=False, num_workers=self.num_workers)
        return torch.cat(list(loader))

    def batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The whole split in order, ``batch_size`` images at a time, decoded in the workers."""
        bs = int(batch_size or self.batch_size)
        nb = math.ceil(self._n / bs)
        parts = _DecodedBatches(self._raw, self.spec, torch.arange(self._n), bs, list(range(nb)), with_labels=False)
        if self.num_workers == 0:
            for k in range(nb):
                yield parts[k]
            return
        yield from torch.utils.data.DataLoader(parts, batch_size=None, shuffle=False, num_workers=self.num_workers)


def decoded_split(split: datasets.Dataset | datasets.IterableDataset, spec: DatasetSpec, *,
                  num_workers: int = 0) -> tuple[Any, torch.Tensor]:
    """``(images, labels)`` of a split as the stages index them: :class:`DecodedImages` (decoded on
    access) when the spec streams its splits (``spec.stream_splits``, ImageNet scale) and the split
    is map-style; otherwise the whole split decoded by :func:`to_uint8_tensors` (small sets, where
    that is fastest, and streamed splits, which cannot be indexed)."""
    if spec.stream_splits and not isinstance(split, datasets.IterableDataset):
        images = DecodedImages(split, spec, num_workers=num_workers)
        return images, images.labels
    if spec.stream_splits:
        logging.getLogger(__name__).warning(
            f"{spec.name}: a streamed split (streaming: true) cannot be indexed, so it is decoded whole here; "
            "load the dataset without streaming to decode it on access instead.")
    return to_uint8_tensors(split, spec)
