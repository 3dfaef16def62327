"""The :class:`~gvbsm_hf.data.spec.DatasetSpec` of a loaded dataset: built-in facts, or inferred from
its first training images (size, channels) and a pass over a sample (mean / std)."""

from __future__ import annotations

import numbers

import datasets
import numpy as np
import torch

from ..errors import DataValidationError
from .builtin import get_builtin_dataset
from .decoding import image_batches, mode_channels, open_image
from .spec import DatasetSpec
from .validation import recipe_hint


def get_dataset_spec(
    dataset: datasets.DatasetDict | datasets.IterableDatasetDict,
    name: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    max_stat_images: int = 10_000,
) -> DatasetSpec:
    """The :class:`DatasetSpec` of a loaded dataset.

    ``image_size`` / ``channels`` (recipe fields of the same names) are what every image is resized
    and converted to when decoded. Built-in names take size, channels, mean/std and license from
    :data:`BUILTIN_DATASETS` (``image_size``/``channels`` override; a grey built-in converted to
    RGB repeats its mean/std on the 3 channels, exact since the grey value is copied; an RGB one
    converted to grey has its mean/std computed as below). Otherwise size and channels come from the
    first train image and mean/std (per channel, population std) from up to ``max_stat_images``
    train images (seeded sample) after conversion to that size and channel count (the evaluation
    view). The preprocessing (train / evaluation views, whole or streamed splits) follows from the
    size: :func:`~gvbsm_hf.data.builtin.preprocessing_for`.
    """
    for field, value in (("image_size", image_size), ("channels", channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise DataValidationError(f"{field}={value!r} must be a positive integer: set {recipe_hint(field, 'N')}.")
    if channels is not None and channels not in (1, 3):
        raise DataValidationError(f"channels={channels} is not supported: set {recipe_hint('channels', '1')} "
                                  "(grey) or 3 (RGB).")
    train = dataset["train"]
    feat = train.features["label"] if train.features else None
    if not isinstance(feat, datasets.ClassLabel):
        raise DataValidationError(
            f"The train split's 'label' column is {feat}, not a ClassLabel of class names: set "
            f"{recipe_hint('label_column', '<the class column>')}."
        )
    class_names = tuple(str(n) for n in feat.names)
    builtin = get_builtin_dataset(name)
    license_, source = None, name
    if builtin is not None:
        c = int(channels or builtin.channels)
        size = int(image_size or builtin.image_size)
        if c % builtin.channels == 0:  # same channels, or grey -> RGB (the grey value on every channel)
            reps = c // builtin.channels
            return DatasetSpec(
                name=builtin.name, num_classes=len(class_names), image_size=size, channels=c,
                mean=tuple(builtin.mean) * reps, std=tuple(builtin.std) * reps,
                class_names=class_names, license=builtin.license, source=builtin.hub_id or builtin.source,
            )
        name, license_, source = builtin.name, builtin.license, builtin.hub_id or builtin.source
    streaming = isinstance(train, datasets.IterableDataset)
    if builtin is None:
        raw = train.cast_column("image", datasets.Image(decode=False))
        first = next(iter(raw.take(1)), None) if streaming else (raw[0] if len(raw) else None)
        if first is None:
            raise DataValidationError(
                f"The train split is empty. Check {recipe_hint('train_split', '<split>')} and `max_train_samples:`."
            )
        img = open_image(first["image"])
        c = int(channels or mode_channels(img.mode))
        size = int(image_size or img.size[1])
    provisional = DatasetSpec(name=name, num_classes=len(class_names), image_size=size, channels=c,
                              mean=(0.0,) * c, std=(1.0,) * c, class_names=class_names)
    sub = train
    if streaming:
        sub = train.take(max_stat_images)
    elif len(train) > max_stat_images:
        idx = np.sort(np.random.default_rng(0).choice(len(train), size=max_stat_images, replace=False))
        sub = train.select(idx.tolist())
    # exact integer sums (no float accumulation error, no (N, C, H, W) float copy)
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    count = 0
    for images, _ in image_batches(sub, provisional, 512):
        v = images.to(torch.int64).transpose(0, 1).reshape(c, -1)
        s1 += v.sum(dim=1)
        s2 += (v * v).sum(dim=1)
        count += v.shape[1]
    if count == 0:
        raise DataValidationError(
            "The train split is empty: nothing to compute mean/std from. Check "
            f"{recipe_hint('train_split', '<split>')} and `max_train_samples:`."
        )
    mean = s1.double() / (255.0 * count)
    std = (s2.double() / (255.0**2 * count) - mean**2).clamp_min(0.0).sqrt()
    info = getattr(train, "info", None)
    if builtin is None and info is not None:
        license_ = info.license or None
    return DatasetSpec(
        name=name, num_classes=len(class_names), image_size=size, channels=c,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), class_names=class_names,
        license=license_, source=source,
    )
