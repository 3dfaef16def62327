"""Datasets as ``datasets.DatasetDict`` (``image``: Image, ``label``: ClassLabel) plus what the
rest of the pipeline needs to know about them (:class:`DatasetSpec`)."""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from tqdm.auto import tqdm

from .errors import DataValidationError, GVBSMError, OfflineError


@dataclass(frozen=True)
class DatasetSpec:
    """Resolution, channels, normalisation and classes of an image-classification dataset."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    license: str | None = None
    source: str | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) ``(N, C, H, W)`` -> normalised float32."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float -> float in [0, 1] (clamped)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def pixel_bounds(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(low, high)`` of the normalised range, shaped ``(1, C, 1, 1)``."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        d = dict(d)
        for k in ("mean", "std", "class_names"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# ==========================================================================================
# Loading, validation and tensors (everything below DatasetSpec)
# ==========================================================================================

logger = logging.getLogger(__name__)

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
_VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
_LABEL_COLUMN_NAMES = ("label", "labels")


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


def _is_main_process() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------- class balance


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
    y = _labels_array(labels)
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


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
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


# ------------------------------------------------------------------------------ built-ins


def _image_label_features(names: Sequence[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 ``(1797, 16, 16)`` (0..16 -> 0..255, bilinear 2x) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise GVBSMError("The 'digits' dataset ships with scikit-learn: pip install scikit-learn.") from e

    d = load_digits()
    small = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(PILImage.fromarray(a, "L").resize((16, 16), PILImage.BILINEAR)) for a in small])
    return big, d.target.astype(np.int64)


def _load_digits(seed: int) -> datasets.DatasetDict:
    images, labels = _digits_arrays()
    train_idx, val_idx = _stratified_split(labels, 0.2, seed)  # deterministic stratified 80/20
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


# --------------------------------------------------------------------------- Hub / folders


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the Hub endpoint (skipped, i.e. True, behind a proxy)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import constants

        hub_cache = constants.HF_HUB_CACHE
    except Exception:  # pragma: no cover
        hub_cache = os.path.expanduser("~/.cache/huggingface/hub")
    ds_cache = datasets.config.HF_DATASETS_CACHE
    return (Path(hub_cache) / f"datasets--{repo_id.replace('/', '--')}").exists() or (
        Path(ds_cache) / repo_id.replace("/", "___")
    ).exists()


def _offline_error(repo_id: str, cause: str) -> OfflineError:
    return OfflineError(
        f"Dataset {repo_id!r} is not in the local cache and the Hugging Face Hub is not reachable ({cause}). "
        f"Fix: on a machine with network run `datasets.load_dataset({repo_id!r}).save_to_disk('<folder>')` "
        "(or download the repo with `huggingface-cli download --repo-type dataset "
        f"{repo_id} --local-dir <folder>`), copy it here and pass that local folder as the dataset name; "
        "or, if this machine does have network, unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."
    )


def _load_generic(
    path: str, config_name: str | None, data_dir: str | None, streaming: bool
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """A local folder (``save_to_disk`` output or anything ``load_dataset`` reads, e.g. an
    imagefolder) or a Hub dataset id."""
    if os.path.isdir(path):
        p = Path(path)
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            if streaming:
                loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
            return loaded
        try:
            loaded = datasets.load_dataset(path, config_name, data_dir=data_dir, streaming=streaming)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise DataValidationError(
                f"No image files found in folder {path!r} ({e}). Use the imagefolder layout "
                "<folder>/<split>/<class>/<image> (or <folder>/<class>/<image>), or a `save_to_disk` folder."
            ) from e
    elif path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise DataValidationError(
            f"Dataset folder {path!r} does not exist: check the path, or pass a built-in name "
            f"({', '.join(BUILTIN_DATASETS)}) or a Hub dataset id (owner/name)."
        )
    else:
        offline = _hub_offline()
        if not offline and not _in_local_cache(path) and not _hub_reachable():
            raise _offline_error(path, "no connection to the Hub endpoint")
        try:
            loaded = datasets.load_dataset(path, config_name, data_dir=data_dir, streaming=streaming)
        except ConnectionError as e:
            raise _offline_error(path, "HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0]) from e
        except datasets.exceptions.DatasetNotFoundError as e:
            raise DataValidationError(
                f"Dataset {path!r} was not found on the Hub ({e}). Check the id (owner/name), log in with "
                "`huggingface-cli login` for gated/private datasets, or pass a local folder."
            ) from e
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": loaded})
    return loaded


# --------------------------------------------------------------------------- standardise


def _first_feature(features: Any, kind: type) -> str | None:
    if not features:
        return None
    for name, f in features.items():
        if isinstance(f, kind):
            return name
    return None


def _missing_column(column: str, which: str, split: str, available: Sequence[str]) -> DataValidationError:
    arg = f"{which}_column"
    return DataValidationError(
        f"Column {column!r} (the {which} column) is missing from split {split!r}; available columns: "
        f"{list(available)}. Pass {arg}=<one of them> to load_image_dataset (recipe field `{arg}`)."
    )


def _resolve_split(splits: Sequence[str], wanted: str | None, candidates: Sequence[str], arg: str) -> str | None:
    if wanted is not None:
        if wanted not in splits:
            raise DataValidationError(
                f"Split {wanted!r} not found; available splits: {list(splits)}. Pass {arg}=<one of them>."
            )
        return wanted
    for c in candidates:
        if c in splits:
            return c
    return None


def _standardize(
    raw: datasets.DatasetDict | datasets.IterableDatasetDict,
    *,
    image_column: str | None,
    label_column: str | None,
    train_split: str | None,
    validation_split: str | None,
    seed: int,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Two splits ``train``/``validation`` with exactly ``image`` (Image) and ``label`` (ClassLabel)."""
    streaming = isinstance(raw, datasets.IterableDatasetDict)
    splits = list(raw.keys())
    tr = _resolve_split(splits, train_split, ("train",), "train_split")
    if tr is None:
        raise DataValidationError(f"No 'train' split; available splits: {splits}. Pass train_split=<one of them>.")
    va = _resolve_split(splits, validation_split, [s for s in _VALIDATION_SPLIT_NAMES if s != tr], "validation_split")
    train, val = raw[tr], (raw[va] if va is not None else None)

    features = train.features
    columns = list(features.keys()) if features else list(getattr(train, "column_names", None) or [])
    img_col = image_column or _first_feature(features, datasets.Image) or next(
        (c for c in ("image", "img") if c in columns), None
    )
    if img_col is None or img_col not in columns:
        raise _missing_column(image_column or "image", "image", tr, columns)
    lab_col = label_column or _first_feature(features, datasets.ClassLabel) or next(
        (c for c in _LABEL_COLUMN_NAMES if c in columns), None
    )
    if lab_col is None or lab_col not in columns:
        raise _missing_column(label_column or "label", "label", tr, columns)
    if features and not isinstance(features[img_col], datasets.Image):
        raise DataValidationError(
            f"Column {img_col!r} is {features[img_col]}, not an image. Pass image_column=<the image column> "
            f"(columns: {columns}), or cast it with dataset.cast_column({img_col!r}, datasets.Image())."
        )

    def select(ds: Any, split_name: str) -> Any:
        cols = list(ds.features.keys()) if ds.features else list(ds.column_names or [])
        for col, which in ((img_col, "image"), (lab_col, "label")):
            if cols and col not in cols:
                raise _missing_column(col, which, split_name, cols)
        ds = ds.select_columns([img_col, lab_col])
        if img_col != "image":
            ds = ds.rename_column(img_col, "image")
        if lab_col != "label":
            ds = ds.rename_column(lab_col, "label")
        return ds

    train = select(train, tr)
    if val is not None:
        val = select(val, va)

    # ---- labels -> ClassLabel (same feature in both splits) -----------------------------
    lab_feat = train.features["label"] if train.features else None
    if not isinstance(lab_feat, datasets.ClassLabel):
        if streaming:
            raise DataValidationError(
                f"Label column {lab_col!r} is {lab_feat}, not a ClassLabel, and the dataset is streamed, so the "
                "classes cannot be counted. Cast it first (dataset.cast_column('label', datasets.ClassLabel("
                "names=[...]))) or load without streaming."
            )
        dtype = getattr(lab_feat, "dtype", None)
        parts = [train] + ([val] if val is not None else [])
        if dtype == "string" or dtype == "large_string":
            names = sorted({str(v) for p in parts for v in p.with_format("arrow")["label"].to_pylist()})
        elif dtype is not None and ("int" in dtype):
            values = np.concatenate([_split_labels(p) for p in parts])
            k = int(values.max()) + 1 if len(values) else 0
            names = [str(i) for i in range(k)]
        else:
            raise DataValidationError(
                f"Label column {lab_col!r} has type {lab_feat}; it needs integer or string class labels. "
                f"Pass label_column=<the class column> (columns: {columns})."
            )
        lab_feat = datasets.ClassLabel(names=names)
    try:
        if train.features["label"] != lab_feat:
            train = train.cast_column("label", lab_feat)
        if val is not None and val.features and val.features["label"] != lab_feat:
            val = val.cast_column("label", lab_feat)
    except (ValueError, TypeError) as e:
        raise DataValidationError(
            f"Labels of {lab_col!r} do not fit the ClassLabel {lab_feat.names[:10]}...: {e}. Cast the label "
            "column to a ClassLabel with all class names, or drop rows whose label is unknown."
        ) from e

    # ---- validation split -----------------------------------------------------------------
    if val is None:
        if streaming:
            raise DataValidationError(
                f"No validation split (looked for {list(_VALIDATION_SPLIT_NAMES)}; available {splits}) and the "
                "dataset is streamed, so none can be split off. Pass validation_split=<split> or load without "
                "streaming."
            )
        keep, held = _stratified_split(_split_labels(train), 0.1, seed)
        logger.info(f"no validation split found: holding out a seeded stratified 10% of train ({len(held)} rows)")
        train, val = train.select(keep), train.select(held)
    cls = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
    return cls({"train": train, "validation": val})


def _subset(split: Any, max_samples: int | None, seed: int) -> Any:
    if max_samples is None:
        return split
    if isinstance(split, datasets.IterableDataset):
        logger.warning("streaming: max_*_samples takes the first rows after a seeded shuffle (not class-balanced)")
        return split.shuffle(seed=seed, buffer_size=10_000).take(max_samples)
    if max_samples >= len(split):
        return split
    return split.select(class_balanced_indices(_split_labels(split), total=max_samples, seed=seed))


def load_image_dataset(
    name_or_path: str,
    *,
    config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    validation_split: str | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    validate: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
) -> datasets.DatasetDict:
    """Load an image-classification dataset as ``DatasetDict(train, validation)`` with exactly the
    columns ``image`` (:class:`datasets.Image`) and ``label`` (:class:`datasets.ClassLabel`).

    ``name_or_path``: a built-in name (:data:`BUILTIN_DATASETS`: digits, fashion_mnist, cifar10,
    cifar100, tiny-imagenet, imagenet-1k), a local folder (``save_to_disk`` output or an
    imagefolder) or a Hub dataset id. Columns and the validation split are detected when not given
    (image: first Image feature; label: first ClassLabel, else ``label``/``labels``; validation:
    validation/valid/val/test, else a seeded stratified 10 % of train). ``max_*_samples`` take a
    seeded class-balanced subset. With ``validate`` the result goes through
    :func:`validate_image_dataset` (``image_size``/``channels``: the size and channel count the
    images will be converted to, which allows mixed sizes/modes). Streaming returns an
    ``IterableDatasetDict``.

    Raises:
        OfflineError: a Hub dataset that is not cached and the Hub is unreachable / offline mode.
        DataValidationError: missing columns or splits, bad labels, corrupt or inconsistent images.
    """
    builtin = get_builtin_dataset(name_or_path)
    raw: Any = None
    if builtin is not None and builtin.name == "digits":
        raw = _load_digits(seed)
    elif builtin is not None and builtin.name == "fashion_mnist":
        folder = _fashion_mnist_dir(data_dir)
        if folder is not None:
            raw = _load_fashion_mnist_idx(folder)
            data_dir = None
    if raw is not None:
        builtin_splits = {"train": "train", "validation": "validation"}
        train_split = builtin_splits.get(train_split or "train", train_split)
        validation_split = "validation" if validation_split in (None, "test") else validation_split
        image_column, label_column = image_column or "image", label_column or "label"
        if streaming:
            raw = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw.items()})
    else:
        path = builtin.hub_id if builtin is not None else name_or_path
        raw = _load_generic(path, config_name or (builtin.config_name if builtin else None), data_dir, streaming)
        if builtin is not None:
            image_column = image_column or builtin.image_column
            label_column = label_column or builtin.label_column
            train_split = train_split or builtin.train_split
            validation_split = validation_split or builtin.validation_split
    dsd = _standardize(
        raw, image_column=image_column, label_column=label_column, train_split=train_split,
        validation_split=validation_split, seed=seed,
    )
    dsd["train"] = _subset(dsd["train"], max_train_samples, seed)
    dsd["validation"] = _subset(dsd["validation"], max_eval_samples, seed)
    if validate:
        validate_image_dataset(
            dsd, image_size=image_size or (builtin.image_size if builtin else None),
            channels=channels or (builtin.channels if builtin else None),
        )
    return dsd


# ------------------------------------------------------------------------------ validation


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


def validate_image_dataset(
    dataset: datasets.DatasetDict | datasets.IterableDatasetDict,
    *,
    sample_size: int | None = 2048,
    image_size: int | None = None,
    channels: int | None = None,
) -> None:
    """Check a dataset before any compute; raise :class:`DataValidationError` naming the fix.

    Checks: splits ``train``/``validation``; columns ``image`` (Image) and ``label`` (ClassLabel);
    labels within ``[0, num_classes)`` and every class present in train (whole label column);
    images decodable, all of one size (square) and one channel count unless ``image_size`` /
    ``channels`` say what they will be converted to (up to ``sample_size`` rows per split,
    seeded sample; ``None``: all). Streamed datasets: the first rows only.
    """
    for split in ("train", "validation"):
        if split not in dataset:
            raise DataValidationError(
                f"Split {split!r} is missing (splits: {list(dataset.keys())}). Load the data with load_image_dataset "
                f"(train_split= / validation_split=) or build a DatasetDict with 'train' and 'validation'."
            )
    names: list[str] | None = None
    sizes: dict[tuple[int, int], tuple[str, int]] = {}
    modes: dict[int, tuple[str, int, str]] = {}
    for split in ("train", "validation"):
        ds = dataset[split]
        streaming = isinstance(ds, datasets.IterableDataset)
        features = ds.features
        if features is None and streaming:
            first = next(iter(ds.take(1)), {})
            cols = list(first.keys())
        else:
            cols = list(features.keys())
        for col, which in (("image", "image"), ("label", "label")):
            if col not in cols:
                raise _missing_column(col, which, split, cols)
        if features is not None:
            if not isinstance(features["image"], datasets.Image):
                raise DataValidationError(
                    f"Column 'image' of split {split!r} is {features['image']}, not datasets.Image: pass "
                    f"image_column=<the image column> to load_image_dataset (columns: {cols})."
                )
            if not isinstance(features["label"], datasets.ClassLabel):
                raise DataValidationError(
                    f"Column 'label' of split {split!r} is {features['label']}, not datasets.ClassLabel: load the data "
                    "with load_image_dataset (label_column=...) or cast it: dataset.cast_column('label', "
                    "datasets.ClassLabel(names=[...]))."
                )
            if names is None:
                names = list(features["label"].names)
        k = len(names) if names is not None else None

        # ---- rows to decode, and labels ---------------------------------------------------
        raw = ds.cast_column("image", datasets.Image(decode=False))
        if streaming:
            n_check = min(sample_size or 256, 256)
            rows = list(raw.take(n_check))
            row_ids = list(range(len(rows)))
            values = [r["image"] for r in rows]
            labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
            label_rows = np.arange(len(labels))
        else:
            labels = _split_labels(ds)
            label_rows = np.arange(len(labels))
            n = len(ds)
            if sample_size is None or n <= sample_size:
                row_ids = list(range(n))
            else:
                row_ids = sorted(np.random.default_rng(0).choice(n, size=sample_size, replace=False).tolist())
            values = raw.select_columns(["image"])[row_ids]["image"] if row_ids else []

        bad = np.flatnonzero(labels < 0)
        if len(bad):
            raise DataValidationError(
                f"Split {split!r} has negative label {int(labels[bad[0]])} at row {int(label_rows[bad[0]])} "
                f"({len(bad)} rows; -1 usually marks unlabelled data such as a Hub test split). Pass "
                "validation_split=<a labelled split>, or drop them: dataset.filter(lambda r: r['label'] >= 0)."
            )
        if k is not None:
            bad = np.flatnonzero(labels >= k)
            if len(bad):
                raise DataValidationError(
                    f"Split {split!r} has label {int(labels[bad[0]])} at row {int(label_rows[bad[0]])}, out of range "
                    f"for the ClassLabel with {k} classes (valid 0..{k - 1}; {len(bad)} rows). Cast the label column "
                    "to a ClassLabel that lists every class (dataset.cast_column('label', "
                    "datasets.ClassLabel(names=[...]))) or drop those rows."
                )
        if split == "train" and k is not None and not streaming:
            counts = np.bincount(labels, minlength=k)
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                shown = ", ".join(f"{names[i]!r} (id {i})" for i in empty[:5])
                raise DataValidationError(
                    f"Class {shown} has no training images ({len(empty)} empty of {k}). Add images of it, remove it "
                    "from the ClassLabel names (and re-map the labels), or raise max_train_samples to at least "
                    f"the number of classes ({k})."
                )

        # ---- images ------------------------------------------------------------------------
        for row, value in zip(row_ids, values):
            try:
                img = _open_image(value)
            except Exception as e:  # PIL raises many types on bad bytes
                raise DataValidationError(
                    f"Image at row {row} of split {split!r} cannot be decoded ({type(e).__name__}: {e}). The bytes are "
                    f"corrupt or not an image: remove the row (dataset.select / dataset.filter) or re-encode the file."
                ) from e
            sizes.setdefault(img.size, (split, row))
            modes.setdefault(_mode_channels(img.mode), (split, row, img.mode))
    if image_size is None:
        if len(sizes) > 1:
            (s1, (sp1, r1)), (s2, (sp2, r2)) = list(sizes.items())[:2]
            raise DataValidationError(
                f"Images have different sizes: {s1[0]}x{s1[1]} ({sp1} row {r1}) and {s2[0]}x{s2[1]} ({sp2} row {r2}). "
                "Resize them to one square size (dataset.map with PIL resize) or set image_size=N "
                "(load_image_dataset / get_dataset_spec) so that they are resized to NxN."
            )
        if sizes:
            (w, h), (sp, r) = next(iter(sizes.items()))
            if w != h:
                raise DataValidationError(
                    f"Images are {w}x{h}, not square ({sp} row {r}). Set image_size=N (load_image_dataset / "
                    "get_dataset_spec) so that they are resized to NxN, or crop them to squares first."
                )
    if channels is None and len(modes) > 1:
        (c1, (sp1, r1, m1)), (c2, (sp2, r2, m2)) = list(modes.items())[:2]
        raise DataValidationError(
            f"Images have different channel counts: mode {m1!r} ({c1} channels, {sp1} row {r1}) and mode {m2!r} "
            f"({c2} channels, {sp2} row {r2}). Convert them to one mode (dataset.map(lambda r: {{'image': "
            "r['image'].convert('RGB')}})) or set channels=3 (or 1) in load_image_dataset / get_dataset_spec."
        )


# ------------------------------------------------------------------------------- tensors


def _target_mode(channels: int) -> str:
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes:
        raise DataValidationError(f"channels={channels} is not supported: use 1 (grayscale) or 3 (RGB).")
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
        raise GVBSMError(f"num_workers={num_workers} must be >= 0 (0 decodes in this process).")
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


# ---------------------------------------------------------------------------------- spec


def get_dataset_spec(
    dataset: datasets.DatasetDict | datasets.IterableDatasetDict,
    name: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    max_stat_images: int = 10_000,
) -> DatasetSpec:
    """The :class:`DatasetSpec` of a loaded dataset.

    Built-in names take size, channels, mean/std and license from :data:`BUILTIN_DATASETS`
    (``image_size``/``channels`` override). Otherwise size and channels come from the first train
    image and mean/std (per channel, population std) from up to ``max_stat_images`` train images
    (seeded sample) after conversion to that size and channel count.
    """
    train = dataset["train"]
    feat = train.features["label"] if train.features else None
    if not isinstance(feat, datasets.ClassLabel):
        raise DataValidationError(
            "The train split's 'label' column is not a datasets.ClassLabel: load the data with load_image_dataset."
        )
    class_names = tuple(str(n) for n in feat.names)
    builtin = get_builtin_dataset(name)
    if builtin is not None:
        return DatasetSpec(
            name=builtin.name, num_classes=len(class_names), image_size=int(image_size or builtin.image_size),
            channels=int(channels or builtin.channels), mean=tuple(builtin.mean), std=tuple(builtin.std),
            class_names=class_names, license=builtin.license, source=builtin.hub_id or builtin.source,
        )
    streaming = isinstance(train, datasets.IterableDataset)
    raw = train.cast_column("image", datasets.Image(decode=False))
    first = next(iter(raw.take(1)))["image"] if streaming else raw[0]["image"]
    img = _open_image(first)
    c = int(channels or _mode_channels(img.mode))
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
        raise DataValidationError("The train split is empty: nothing to compute mean/std from.")
    mean = s1.double() / (255.0 * count)
    std = (s2.double() / (255.0**2 * count) - mean**2).clamp_min(0.0).sqrt()
    info = getattr(train, "info", None)
    return DatasetSpec(
        name=name, num_classes=len(class_names), image_size=size, channels=c,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), class_names=class_names,
        license=(info.license or None) if info is not None else None, source=name,
    )
