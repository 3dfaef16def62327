"""Images and labels of a split as tensors: uint8 ``(N, C, H, W)`` decoded straight from the stored
bytes, whole (:func:`to_uint8_tensors`) or in batches (:func:`image_batches`, optionally in
``DataLoader`` worker processes)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from tqdm.auto import tqdm

from ..errors import DataValidationError, GVBSMError

if TYPE_CHECKING:
    from .spec import DatasetSpec


def _is_main_process() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def _labels_array(labels: Any) -> np.ndarray:
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


def _split_labels(split: datasets.Dataset) -> np.ndarray:
    return split.with_format("arrow")["label"].to_numpy().astype(np.int64)


def _mode_channels(mode: str) -> int:
    """Channels an image of PIL ``mode`` has once converted: 1 for grey modes (L, LA, I, F, 1, I;16),
    3 for colour ones (RGB, RGBA, P, CMYK, YCbCr...)."""
    try:
        return 1 if PILImage.getmodebase(mode) == "L" else 3
    except (KeyError, ValueError):
        return 1 if mode.startswith(("I", "F", "L")) else 3


def _open_image(value: Any) -> PILImage.Image:
    """Decode one ``Image(decode=False)`` value fully (``{'bytes', 'path'}`` or a PIL image)."""
    if isinstance(value, PILImage.Image):
        value.load()
        return value
    if value is None:
        raise ValueError("the image is missing (None)")
    data, path = value.get("bytes"), value.get("path")
    img = PILImage.open(io.BytesIO(data)) if data is not None else PILImage.open(path)
    img.load()
    return img


def _target_mode(channels: int) -> str:
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes:
        raise DataValidationError(f"channels={channels} is not supported: set `channels: 1` (grey) or `channels: 3` "
                                  "(RGB) in the recipe (--channels 1 / --channels 3).")
    return modes[channels]


def _to_array(value: Any, mode: str, size: int) -> np.ndarray:
    """One decoded image -> uint8 ``(H, W, C)`` in ``mode`` at ``size x size`` (bilinear)."""
    img = _open_image(value)
    if img.mode != mode:
        if img.mode in ("P", "PA") or (img.mode == "LA" and mode == "RGB"):
            img = img.convert("RGBA")
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _decode_batch(values: Sequence[Any], spec: DatasetSpec) -> torch.Tensor:
    mode, size = _target_mode(spec.channels), spec.image_size
    out = np.empty((len(values), size, size, spec.channels), dtype=np.uint8)
    for i, v in enumerate(values):
        out[i] = _to_array(v, mode, size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _rows_to_batch(rows: Sequence[dict[str, Any]], spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.as_tensor([r["label"] for r in rows], dtype=torch.int64)
    return _decode_batch([r["image"] for r in rows], spec), labels


def to_uint8_tensors(
    split: datasets.Dataset | datasets.IterableDataset, spec: DatasetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 ``(N, C, H, W)`` (converted to ``spec.channels``, resized to
    ``spec.image_size`` when different) and int64 labels ``(N,)``.

    Decodes straight from the stored bytes (``Image(decode=False)``), in batches.
    """
    raw = split.cast_column("image", datasets.Image(decode=False))
    if isinstance(split, datasets.IterableDataset):
        xs, ys = [], []
        for batch in raw.iter(batch_size=1024):
            xs.append(_decode_batch(batch["image"], spec))
            ys.append(torch.as_tensor(batch["label"], dtype=torch.int64))
        if not xs:
            empty = torch.zeros(0, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
            return empty, torch.zeros(0, dtype=torch.int64)
        return torch.cat(xs), torch.cat(ys)
    n = len(split)
    labels = torch.from_numpy(_split_labels(split))
    images = torch.empty(n, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    bs = 4096
    images_only = raw.select_columns(["image"])
    with tqdm(total=n, desc=f"decoding {spec.name}", disable=n < 20_000 or not _is_main_process(), leave=False) as bar:
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            images[start:stop] = _decode_batch(images_only[start:stop]["image"], spec)
            bar.update(stop - start)
    return images, labels


def image_batches(
    split: datasets.Dataset | datasets.IterableDataset,
    spec: DatasetSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 ``(B, C, H, W)`` / int64 label batches decoded on the fly (data larger than memory).

    Global batch ``i`` (after an optional seeded shuffle) goes to process ``i % num_processes``,
    so 1 and N processes see the same set of batches (Eq. 9 averages over all of them).
    ``num_workers > 0`` decodes the batches of a map-style split in that many
    ``torch.utils.data.DataLoader`` worker processes (same batches, same order); a streamed split
    is always decoded in this process.
    """
    if batch_size < 1:
        raise GVBSMError(f"batch_size={batch_size} must be >= 1.")
    if num_workers < 0:
        raise GVBSMError(f"num_workers={num_workers} must be >= 0 (0 decodes in this process; recipe field "
                         "`dataloader_workers`).")
    if not 0 <= process_index < num_processes:
        raise GVBSMError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
    raw = split.cast_column("image", datasets.Image(decode=False))
    if isinstance(split, datasets.IterableDataset):
        if shuffle:
            raw = raw.shuffle(seed=seed, buffer_size=max(10_000, batch_size))
        buf: list[dict[str, Any]] = []
        i = 0
        for row in raw:
            buf.append(row)
            if len(buf) == batch_size:
                if i % num_processes == process_index:
                    yield _rows_to_batch(buf, spec)
                buf, i = [], i + 1
        if buf and not drop_last and i % num_processes == process_index:
            yield _rows_to_batch(buf, spec)
        return
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    num_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    shard = _DecodedBatches(raw, spec, order, batch_size, list(range(process_index, num_batches, num_processes)))
    if num_workers == 0:
        for k in range(len(shard)):
            yield shard[k]
        return
    loader = torch.utils.data.DataLoader(shard, batch_size=None, shuffle=False, num_workers=num_workers)
    yield from loader


class _DecodedBatches(torch.utils.data.Dataset):
    """Item ``k``: the decoded ``k``-th batch of one process's shard (see :func:`image_batches`)."""

    def __init__(self, raw: datasets.Dataset, spec: DatasetSpec, order: torch.Tensor, batch_size: int,
                 batch_ids: list[int]) -> None:
        self.raw, self.spec, self.order, self.batch_size, self.batch_ids = raw, spec, order, batch_size, batch_ids

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.batch_ids[k]
        rows = self.raw[self.order[i * self.batch_size : (i + 1) * self.batch_size].tolist()]
        return _decode_batch(rows["image"], self.spec), torch.as_tensor(rows["label"], dtype=torch.int64)
