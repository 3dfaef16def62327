"""Built-in datasets known by a short name: their Hub ids, columns, splits and fixed preprocessing
constants, plus the two that are read locally (scikit-learn digits, Fashion-MNIST IDX files)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from PIL import Image as PILImage

from ..augment_families import is_imagenet_scale
from ..errors import DataValidationError, GVBSMError
from .sampling import stratified_split


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_ENV = "GVBSM_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = (
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


TRAIN_VIEWS = ("pad_crop", "random_resized_crop")
EVAL_VIEWS = ("resize", "resize_center_crop")


@dataclass(frozen=True)
class Preprocessing:
    """How the real images of a dataset become ``image_size x image_size`` uint8 tensors.

    ``train_view``: the real-data view of the record / squeeze passes. ``"pad_crop"``: the image is
    decoded at ``image_size`` (``eval_view``) and pad-crop + flip are applied on the device
    (:mod:`gvbsm_hf.augment`); ``"random_resized_crop"``: torchvision's ``RandomResizedCrop`` of the
    ORIGINAL image (scale ``crop_scale``, ratio 3/4..4/3, bilinear) + horizontal flip, in the
    decoding workers (:func:`gvbsm_hf.data.image_batches` with ``view="train"``).

    ``eval_view``: the deterministic view (validation, real initialisation, the random real subset).
    ``"resize"``: bilinear resize of the whole image to ``image_size`` (identity at that size);
    ``"resize_center_crop"``: ``Resize(round(image_size / eval_crop_ratio))`` of the shorter side then
    ``CenterCrop(image_size)`` (ImageNet: Resize(256) + CenterCrop(224)). Either way an image that is
    already ``image_size x image_size`` is taken as is (a distilled or pre-cropped set).

    ``stream_splits``: real splits are never decoded whole; they are decoded per batch on access
    (:class:`gvbsm_hf.data.DecodedImages`), so memory does not grow with the split.
    """

    train_view: str
    eval_view: str
    eval_crop_ratio: float = 0.875
    stream_splits: bool = False


SMALL_PREPROCESSING = Preprocessing(train_view="pad_crop", eval_view="resize", stream_splits=False)
"""28-64 px sets (digits, Fashion-MNIST, CIFAR, Tiny-ImageNet): images are (resized to) the
working size, pad-crop on the device, identity for evaluation: the behaviour of every paper at
that scale."""
IMAGENET_PREPROCESSING = Preprocessing(train_view="random_resized_crop", eval_view="resize_center_crop",
                                       eval_crop_ratio=0.875, stream_splits=True)
"""ImageNet scale (``image_size >= 128``): torchvision's reference transforms, those of the
pretrained teachers and of the authors' code: RandomResizedCrop + flip for training,
Resize(256) + CenterCrop(224) for evaluation; splits streamed."""


def preprocessing_for(image_size: int) -> Preprocessing:
    """THE rule choosing a dataset's :class:`Preprocessing`: by working size
    (:func:`gvbsm_hf.augment_families.is_imagenet_scale`, the same threshold as the authors' protocol)."""
    return IMAGENET_PREPROCESSING if is_imagenet_scale(int(image_size)) else SMALL_PREPROCESSING


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset known by a short name: where it lives and its (fixed) preprocessing constants."""

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    train_split: str
    validation_split: str
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    license: str | None
    source: str | None = None
    config_name: str | None = None


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    # 8x8 digits of scikit-learn (values 0..16) -> uint8, bilinear 16x16; mean/std over all 1797 images.
    "digits": BuiltinDataset(
        "digits", None, "image", "label", "train", "validation", 16, 1, (0.3053,), (0.3187,), "CC-BY-4.0",
        source="sklearn.datasets.load_digits (UCI Optical Recognition of Handwritten Digits)",
    ),
    "fashion_mnist": BuiltinDataset(
        "fashion_mnist", "zalando-datasets/fashion_mnist", "image", "label", "train", "test", 28, 1,
        (0.2860,), (0.3530,), "MIT",
    ),
    "cifar10": BuiltinDataset(
        "cifar10", "uoft-cs/cifar10", "img", "label", "train", "test", 32, 3,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "unknown",
    ),
    "cifar100": BuiltinDataset(
        "cifar100", "uoft-cs/cifar100", "img", "fine_label", "train", "test", 32, 3,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "unknown",
    ),
    "tiny-imagenet": BuiltinDataset(
        "tiny-imagenet", "zh-plus/tiny-imagenet", "image", "label", "train", "valid", 64, 3,
        IMAGENET_MEAN, IMAGENET_STD, "unknown (ImageNet terms of access)",
    ),
    "imagenet-1k": BuiltinDataset(
        "imagenet-1k", "ILSVRC/imagenet-1k", "image", "label", "train", "validation", 224, 3,
        IMAGENET_MEAN, IMAGENET_STD, "other (ImageNet terms of access)",
    ),
}
_ALIASES = {
    "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar-10": "cifar10",
    "cifar-100": "cifar100", "tiny_imagenet": "tiny-imagenet", "tinyimagenet": "tiny-imagenet",
    "imagenet1k": "imagenet-1k", "imagenet_1k": "imagenet-1k", "imagenet": "imagenet-1k",
}


def get_builtin_dataset(name: str) -> BuiltinDataset | None:
    """The :class:`BuiltinDataset` for a short name, an alias or its Hub id (``None`` if unknown)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[key]
    for b in BUILTIN_DATASETS.values():
        if b.hub_id is not None and b.hub_id.lower() == name.lower():
            return b
    return None


def _image_label_features(names: Sequence[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 ``(1797, 16, 16)`` (0..16 -> 0..255, bilinear 2x) and labels."""
    try:
        from sklearn.datasets import load_digits  # optional: scikit-learn is only in the `test` extra
    except ImportError as e:
        raise GVBSMError("The 'digits' dataset ships with scikit-learn: pip install scikit-learn.") from e

    d = load_digits()
    small = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(PILImage.fromarray(a, "L").resize((16, 16), PILImage.BILINEAR)) for a in small])
    return big, d.target.astype(np.int64)


def _load_digits(seed: int) -> datasets.DatasetDict:
    images, labels = _digits_arrays()
    train_idx, val_idx = stratified_split(labels, 0.2, seed)  # deterministic stratified 80/20
    features = _image_label_features([str(i) for i in range(10)])
    out = {}
    for split, idx in (("train", train_idx), ("validation", val_idx)):
        out[split] = datasets.Dataset.from_dict(
            {"image": [PILImage.fromarray(images[i], "L") for i in idx], "label": labels[idx].tolist()},
            features=features,
        )
    return datasets.DatasetDict(out)


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzip) as a numpy array (big-endian header: magic, dims)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataValidationError(
            f"{path} is not an IDX file: re-install the files (apt-get install --reinstall dataset-fashion-mnist)."
        )
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = np.dtype(dtypes[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataValidationError(f"{path} is truncated ({data.size} values, header says {shape}): re-download it.")
    return data.reshape(shape)


def _fashion_mnist_rows(images_path: str, labels_path: str, stamp: str) -> Iterator[dict[str, Any]]:
    """Generator for ``Dataset.from_generator`` (``stamp`` = file sizes/mtimes, part of the cache key)."""
    del stamp
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    for img, lab in zip(images, labels):
        yield {"image": PILImage.fromarray(np.ascontiguousarray(img), "L"), "label": int(lab)}


def _fashion_mnist_dir(data_dir: str | None) -> str | None:
    for d in (data_dir, os.environ.get(FASHION_MNIST_ENV), FASHION_MNIST_DEFAULT_DIR):
        if d and all(os.path.exists(os.path.join(d, f)) for pair in _FASHION_FILES.values() for f in pair):
            return d
    return None


def _load_fashion_mnist_idx(folder: str) -> datasets.DatasetDict:
    """Fashion-MNIST from the Debian package's IDX files, same schema as the Hub dataset.

    Built with ``Dataset.from_generator``, which ``datasets`` caches (keyed by the generator, the
    file paths and their sizes/mtimes), so the second load only memory-maps Arrow files.
    """
    features = _image_label_features(FASHION_MNIST_NAMES)
    out = {}
    for split, (img_file, lab_file) in _FASHION_FILES.items():
        ip, lp = os.path.join(folder, img_file), os.path.join(folder, lab_file)
        stamp = ";".join(f"{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in (ip, lp))
        out[split] = datasets.Dataset.from_generator(
            _fashion_mnist_rows, features=features, gen_kwargs={"images_path": ip, "labels_path": lp, "stamp": stamp},
            split=datasets.NamedSplit(split),
        )
    return datasets.DatasetDict(out)
