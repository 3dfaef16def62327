"""Load an image-classification dataset (built-in name, local folder or Hub id) as a
``DatasetDict(train, validation)`` with exactly the columns ``image`` (Image) and ``label``
(ClassLabel); seeded class-balanced subsets."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .. import hub_utils
from ..errors import DataValidationError, GVBSMError, OfflineError
from .builtin import (
    BUILTIN_DATASETS,
    _fashion_mnist_dir,
    _load_digits,
    _load_fashion_mnist_idx,
    get_builtin_dataset,
)
from .decoding import _labels_array, _split_labels
from .validation import _missing_column, validate_image_dataset

logger = logging.getLogger(__name__)


_VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
_LABEL_COLUMN_NAMES = ("label", "labels")


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


def _offline_error(repo_id: str, cause: str) -> OfflineError:
    return hub_utils.offline_error(
        f"Dataset {repo_id!r} is not in the local cache and cannot be downloaded from the Hugging Face Hub",
        cause,
        f"on a machine with network run `datasets.load_dataset({repo_id!r}).save_to_disk('<folder>')` (or "
        f"download the repo with `huggingface-cli download --repo-type dataset {repo_id} --local-dir <folder>`), "
        "copy it here and pass that local folder as the dataset name.",
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
    elif not hub_utils.is_hub_repo_id(path, require_namespace=False):
        problem = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise DataValidationError(
            f"Dataset folder {path!r} {problem}: check the path, or pass a built-in name "
            f"({', '.join(BUILTIN_DATASETS)}) or a Hub dataset id (owner/name)."
        )
    else:
        offline = hub_utils.offline_reason(datasets=True)
        if offline is None and not hub_utils.dataset_cached(path) and not hub_utils.hub_reachable():
            raise _offline_error(path, f"{hub_utils.hub_endpoint()} is not reachable")
        try:
            loaded = datasets.load_dataset(path, config_name, data_dir=data_dir, streaming=streaming)
        except ConnectionError as e:
            raise _offline_error(path, offline or str(e).splitlines()[0]) from e
        except datasets.exceptions.DatasetNotFoundError as e:
            raise DataValidationError(
                f"Dataset {path!r} was not found on the Hub ({e}). Check the id (owner/name), log in with "
                "`huggingface-cli login` for gated/private datasets, or pass a local folder."
            ) from e
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": loaded})
    return loaded


def _first_feature(features: Any, kind: type) -> str | None:
    if not features:
        return None
    for name, f in features.items():
        if isinstance(f, kind):
            return name
    return None


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
