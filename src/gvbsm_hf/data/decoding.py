"""Images and labels of a split as tensors: uint8 ``(N, C, H, W)`` decoded straight from the stored
bytes, whole (:func:`to_uint8_tensors`), in batches (:func:`image_batches`, optionally in
``DataLoader`` worker processes) or on access (:class:`DecodedImages`, a split that indexes like
the tensor but decodes only the rows asked for).

Every image goes through the view its :class:`~gvbsm_hf.data.DatasetSpec` declares:
``view="eval"`` (deterministic: bilinear resize to ``image_size``, or Resize + CenterCrop at
ImageNet scale) or ``view="train"`` (RandomResizedCrop of the original image + flip at ImageNet
scale, seeded per global batch; the eval view below 128 px, where the pad-crop is done on the
device). The resize / crop kernels are ``torchvision.transforms.v2.functional``'s on PIL images.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import DataValidationError, GVBSMError
from ..progress import progress_bar
from ..utils import seeded_generator
from .sampling import split_labels
from .spec import DatasetSpec



def _is_main_process() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def mode_channels(mode: str) -> int:
    """Channels an image of PIL ``mode`` has once converted: 1 for grey modes (L, LA, I, F, 1, I;16),
    3 for colour ones (RGB, RGBA, P, CMYK, YCbCr...)."""
    try:
        return 1 if PILImage.getmodebase(mode) == "L" else 3
    except (KeyError, ValueError):
        return 1 if mode.startswith(("I", "F", "L")) else 3


def open_image(value: Any) -> PILImage.Image:
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


VIEWS = ("eval", "train")
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default aspect-ratio range


def _convert(img: PILImage.Image, mode: str) -> PILImage.Image:
    """``img`` in PIL ``mode`` (palette / LA images through RGBA, CMYK and grey through PIL's convert)."""
    if img.mode != mode:
        if img.mode in ("P", "PA") or (img.mode == "LA" and mode == "RGB"):
            img = img.convert("RGBA")
        img = img.convert(mode)
    return img


def _as_hwc(img: PILImage.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _to_array(value: Any, mode: str, size: int) -> np.ndarray:
    """One decoded image -> uint8 ``(H, W, C)`` in ``mode`` at ``size x size`` (bilinear)."""
    img = _convert(open_image(value), mode)
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.BILINEAR)
    return _as_hwc(img)


def random_resized_crop_params(
    width: int, height: int, scale: Sequence[float], generator: torch.Generator,
    ratio: Sequence[float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a RandomResizedCrop box in an image of ``width x height``:
    torchvision's algorithm (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, 10
    tries, then the central crop of the clamped ratio), drawn from ``generator``."""
    area = float(width * height)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        target = area * (float(scale[0]) + (float(scale[1]) - float(scale[0])) * float(u[0]))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _view_array(value: Any, spec: DatasetSpec, view: str, generator: torch.Generator | None,
                crop_scale: Sequence[float]) -> np.ndarray:
    """One stored image -> uint8 ``(H, W, C)`` at ``spec.image_size`` through ``view`` (module doc)."""
    mode, size = _target_mode(spec.channels), int(spec.image_size)
    if spec.eval_view == "resize" and (view == "eval" or spec.train_view == "pad_crop"):
        return _to_array(value, mode, size)  # the small-set path, unchanged
    if view == "train" and spec.train_view == "random_resized_crop":
        if generator is None:
            raise GVBSMError("The train view (RandomResizedCrop) needs a generator (image_batches(seed=...)).")
        img = _convert(open_image(value), mode)
        top, left, h, w = random_resized_crop_params(img.width, img.height, crop_scale, generator)
        img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                              antialias=True)
        if bool(torch.rand((), generator=generator) < 0.5):
            img = TF.horizontal_flip(img)
        return _as_hwc(img)
    if spec.eval_view == "resize_center_crop":
        img = _convert(open_image(value), mode)
        if img.size != (size, size):  # an image already at the working size is taken as is
            img = TF.resize(img, [spec.eval_resize_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
            img = TF.center_crop(img, [size, size])
        return _as_hwc(img)
    return _to_array(value, mode, size)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise GVBSMError(f"view={view!r}: use one of {VIEWS}.")


def _decode_batch(values: Sequence[Any], spec: DatasetSpec, view: str = "eval",
                  generator: torch.Generator | None = None,
                  crop_scale: Sequence[float] = (0.08, 1.0)) -> torch.Tensor:
    size = spec.image_size
    out = np.empty((len(values), size, size, spec.channels), dtype=np.uint8)
    for i, v in enumerate(values):
        out[i] = _view_array(v, spec, view, generator, crop_scale)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _view_generator(view: str, spec: DatasetSpec, seed: int, batch_index: int) -> torch.Generator | None:
    """The generator of global batch ``batch_index``'s train view (same on every process / worker layout)."""
    if view == "train" and spec.train_view == "random_resized_crop":
        return seeded_generator(seed, "train_view", batch_index)
    return None


def _rows_to_batch(rows: Sequence[dict[str, Any]], spec: DatasetSpec, view: str = "eval",
                   generator: torch.Generator | None = None,
                   crop_scale: Sequence[float] = (0.08, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.as_tensor([r["label"] for r in rows], dtype=torch.int64)
    return _decode_batch([r["image"] for r in rows], spec, view, generator, crop_scale), labels


def to_uint8_tensors(
    split: datasets.Dataset | datasets.IterableDataset, spec: DatasetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 ``(N, C, H, W)`` (converted to ``spec.channels``, brought to
    ``spec.image_size`` by the spec's evaluation view) and int64 labels ``(N,)``.

    Decodes straight from the stored bytes (``Image(decode=False)``), in batches. The result holds
    the whole split: for a large one use :func:`image_batches` or :class:`DecodedImages`.
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
    labels = torch.from_numpy(split_labels(split))
    images = torch.empty(n, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    bs = 4096
    images_only = raw.select_columns(["image"])
    quiet = n < 20_000 or not _is_main_process()
    with progress_bar(total=n, desc=f"decoding {spec.name}", disable=quiet, leave=False) as bar:
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
    view: str = "eval",
    crop_scale: Sequence[float] = (0.08, 1.0),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 ``(B, C, H, W)`` / int64 label batches decoded on the fly (data larger than memory).

    Global batch ``i`` (after an optional seeded shuffle) goes to process ``i % num_processes``,
    so 1 and N processes see the same set of batches (Eq. 9 averages over all of them).
    ``num_workers > 0`` decodes the batches of a map-style split in that many
    ``torch.utils.data.DataLoader`` worker processes (same batches, same order); a streamed split
    is always decoded in this process.

    ``view``: ``"eval"`` (the spec's deterministic view) or ``"train"`` (the spec's train view: at
    ImageNet scale a RandomResizedCrop of the original image with area in ``crop_scale`` + flip,
    drawn from a generator seeded by ``(seed, "train_view", global batch index)``, so any process
    or worker layout gives the same pixels; below 128 px the same as ``"eval"``).
    """
    _check_view(view)
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
        scale = tuple(crop_scale)
        for row in raw:
            buf.append(row)
            if len(buf) == batch_size:
                if i % num_processes == process_index:
                    yield _rows_to_batch(buf, spec, view, _view_generator(view, spec, seed, i), scale)
                buf, i = [], i + 1
        if buf and not drop_last and i % num_processes == process_index:
            yield _rows_to_batch(buf, spec, view, _view_generator(view, spec, seed, i), scale)
        return
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    num_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    shard = _DecodedBatches(raw, spec, order, batch_size, list(range(process_index, num_batches, num_processes)),
                            view=view, seed=seed, crop_scale=crop_scale)
    if num_workers == 0:
        for k in range(len(shard)):
            yield shard[k]
        return
    loader = torch.utils.data.DataLoader(shard, batch_size=None, shuffle=False, num_workers=num_workers)
    yield from loader


class _DecodedBatches(torch.utils.data.Dataset):
    """Item ``k``: the decoded ``k``-th batch of one process's shard (see :func:`image_batches`)."""

    def __init__(self, raw: datasets.Dataset, spec: DatasetSpec, order: torch.Tensor, batch_size: int,
                 batch_ids: list[int], *, view: str = "eval", seed: int = 0,
                 crop_scale: Sequence[float] = (0.08, 1.0), with_labels: bool = True) -> None:
        self.raw, self.spec, self.order, self.batch_size, self.batch_ids = raw, spec, order, batch_size, batch_ids
        self.view, self.seed, self.crop_scale, self.with_labels = view, seed, tuple(crop_scale), with_labels

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, k: int) -> Any:
        i = self.batch_ids[k]
        rows = self.raw[self.order[i * self.batch_size : (i + 1) * self.batch_size].tolist()]
        images = _decode_batch(rows["image"], self.spec, self.view, _view_generator(self.view, self.spec, self.seed, i),
                               self.crop_scale)
        if not self.with_labels:
            return images
        return images, torch.as_tensor(rows["label"], dtype=torch.int64)
