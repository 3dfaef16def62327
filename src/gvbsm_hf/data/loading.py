"""Load an image-classification dataset (built-in name, local folder or Hub id) as a
``DatasetDict(train, validation)`` with exactly the columns ``image`` (Image) and ``label``
(ClassLabel); seeded class-balanced subsets."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import FILES_TO_IGNORE
import numpy as np

from .. import hub_utils
from ..errors import DataValidationError, OfflineError
from .builtin import (
    BUILTIN_DATASETS,
    _fashion_mnist_dir,
    _load_digits,
    _load_fashion_mnist_idx,
    get_builtin_dataset,
)
from .sampling import split_labels
from .sampling import class_balanced_subset, stratified_split
from .validation import missing_column, recipe_hint, validate_image_dataset

logger = logging.getLogger(__name__)


_VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
_LABEL_COLUMN_NAMES = ("label", "labels")


def _offline_error(repo_id: str, cause: str) -> OfflineError:
    return hub_utils.offline_error(
        f"Dataset {repo_id!r} is not in the local cache and cannot be downloaded from the Hugging Face Hub",
        cause,
        f"on a machine with network download the repo (`huggingface-cli download --repo-type dataset {repo_id} "
        "--local-dir <folder>`, or load it there and write it with datasets' save_to_disk), copy the folder here "
        f"and set {recipe_hint('dataset_name', '<that local folder>')}.",
    )


_FALLBACK_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _image_extensions() -> frozenset[str]:
    """The file extensions ``datasets``' imagefolder builder reads as images."""
    try:
        # the builder's own extension list (not re-exported by `datasets`), with a fallback if it moves
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
    except (ImportError, AttributeError):
        return frozenset(_FALLBACK_IMAGE_EXTENSIONS)


def _ignored_name(name: str) -> bool:
    """Hidden files and folders, which ``datasets`` skips too."""
    return name.startswith((".", "__"))


def _check_class_folders(root: Path) -> None:
    """Raise when a class folder of an image folder holds no image, or when there is one class only.

    ``datasets``' imagefolder builder takes the classes from the folders that directly hold image
    files, so an empty class folder (``train/emu/`` with nothing in it) silently disappears from
    the ClassLabel: a 4-class folder loads as 3 classes. The class folders are the sub-folders of
    every folder whose sub-folders hold images (``<folder>/<class>/`` or
    ``<folder>/<split>/<class>/``). Folders with a ``metadata.*`` file (labels may come from it) or
    mostly non-image files (another builder reads them) are not checked. With one class folder
    ``datasets`` adds no label column at all, so that case is named here."""
    if not root.is_dir():
        return
    exts = _image_extensions()
    image_dirs: set[Path] = set()
    n_images = n_other = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _ignored_name(d)]
        for f in filenames:
            if _ignored_name(f) or f in FILES_TO_IGNORE:
                continue
            if f.startswith("metadata."):
                return
            if os.path.splitext(f)[1].lower() in exts:
                n_images += 1
                image_dirs.add(Path(dirpath))
            else:
                n_other += 1
    if n_images == 0 or n_other > n_images:
        return
    labels = {d.name for d in image_dirs}
    empty: list[Path] = []
    for parent in sorted({d.parent for d in image_dirs if d != root}):
        for child in sorted(parent.iterdir()):
            if not child.is_dir() or _ignored_name(child.name) or child in image_dirs:
                continue
            if any(child in d.parents for d in image_dirs):
                continue  # a folder above image folders (a split folder), not a class folder
            if child.name in labels and not _is_train_folder(parent.name):
                # the class has training images: an empty validation folder drops nothing
                logger.warning(f"class folder {child} holds no images (class {child.name!r} has images elsewhere)")
                continue
            empty.append(child)
    if empty:
        shown = ", ".join(str(p) for p in empty[:5]) + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
        dropped = sorted({p.name for p in empty} - labels)
        if dropped:
            effect = (f"so class(es) {dropped} would be dropped silently ({len(labels)} classes instead of "
                      f"{len(labels) + len(dropped)})")
        else:
            effect = f"so class(es) {sorted({p.name for p in empty})} would have no training images"
        raise DataValidationError(
            f"Class folder(s) {shown} of image folder {str(root)!r} hold no images, {effect}. Add images to each "
            "empty folder, or remove the folder if that class is not meant to exist. Image files are recognised "
            "by their extension (.png, .jpg, ...)."
        )
    if len(labels) == 1 and root not in image_dirs and len({len(d.relative_to(root).parts) for d in image_dirs}) == 1:
        (name,) = labels  # datasets adds no label column for one class: say so, not "label column missing"
        raise DataValidationError(
            f"Image folder {str(root)!r} has one class ({name!r}, the only class folder): distillation needs at least "
            "two classes. Add a folder of images per class (<folder>/<class>/<image>, or "
            "<folder>/<split>/<class>/<image>)."
        )


def _is_train_folder(name: str) -> bool:
    """A folder ``datasets`` reads as the train split (the keyword as a word of its name: train, training)."""
    return bool({"train", "training"} & set(re.split(r"[-._ 0-9]+", name.lower())))


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
        _check_class_folders(Path(path) / data_dir if data_dir else Path(path))
        try:
            loaded = datasets.load_dataset(path, config_name, data_dir=data_dir, streaming=streaming)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise DataValidationError(
                f"No image files found in folder {path!r} ({e}). Use the imagefolder layout "
                "<folder>/<split>/<class>/<image> (or <folder>/<class>/<image>) or a folder written by datasets' "
                f"save_to_disk, and set {recipe_hint('dataset_name', '<that folder>')}."
            ) from e
    elif not hub_utils.is_hub_repo_id(path, require_namespace=False):
        problem = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise DataValidationError(
            f"Dataset folder {path!r} {problem}: set {recipe_hint('dataset_name', '<name>')} to an existing folder, "
            f"a built-in name ({', '.join(BUILTIN_DATASETS)}) or a Hub dataset id (owner/name)."
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
                f"Dataset {path!r} was not found on the Hub ({e}). Check `dataset_name:` (--dataset_name; a Hub id "
                "is owner/name), log in with `huggingface-cli login` for gated/private datasets, or set "
                "`dataset_name:` to a local folder."
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
                f"Split {wanted!r} not found; available splits: {list(splits)}. "
                f"Set {recipe_hint(arg, '<one of them>')}."
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
        raise DataValidationError(
            f"No 'train' split; available splits: {splits}. Set {recipe_hint('train_split', '<one of them>')}."
        )
    va = _resolve_split(splits, validation_split, [s for s in _VALIDATION_SPLIT_NAMES if s != tr], "validation_split")
    train, val = raw[tr], (raw[va] if va is not None else None)

    features = train.features
    columns = list(features.keys()) if features else list(getattr(train, "column_names", None) or [])
    img_col = image_column or _first_feature(features, datasets.Image) or next(
        (c for c in ("image", "img") if c in columns), None
    )
    if img_col is None or img_col not in columns:
        raise missing_column(image_column or "image", "image", tr, columns)
    lab_col = label_column or _first_feature(features, datasets.ClassLabel) or next(
        (c for c in _LABEL_COLUMN_NAMES if c in columns), None
    )
    if lab_col is None or lab_col not in columns:
        raise missing_column(label_column or "label", "label", tr, columns)
    if features and not isinstance(features[img_col], datasets.Image):
        raise DataValidationError(
            f"Column {img_col!r} is {features[img_col]}, not an image. Set "
            f"{recipe_hint('image_column', '<the image column>')} (columns: {columns})."
        )

    def select(ds: Any, split_name: str) -> Any:
        cols = list(ds.features.keys()) if ds.features else list(ds.column_names or [])
        for col, which in ((img_col, "image"), (lab_col, "label")):
            if cols and col not in cols:
                raise missing_column(col, which, split_name, cols)
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
                f"classes cannot be counted. Set {recipe_hint('streaming', 'false')}, or "
                f"{recipe_hint('label_column', '<a ClassLabel column>')}."
            )
        dtype = getattr(lab_feat, "dtype", None)
        parts = [train] + ([val] if val is not None else [])
        if dtype == "string" or dtype == "large_string":
            names = sorted({str(v) for p in parts for v in p.with_format("arrow")["label"].to_pylist()})
        elif dtype is not None and ("int" in dtype):
            values = np.concatenate([split_labels(p) for p in parts])
            k = int(values.max()) + 1 if len(values) else 0
            names = [str(i) for i in range(k)]
        else:
            raise DataValidationError(
                f"Label column {lab_col!r} has type {lab_feat}; it needs integer or string class labels. "
                f"Set {recipe_hint('label_column', '<the class column>')} (columns: {columns})."
            )
        lab_feat = datasets.ClassLabel(names=names)
    try:
        if train.features["label"] != lab_feat:
            train = train.cast_column("label", lab_feat)
        if val is not None and val.features and val.features["label"] != lab_feat:
            val = val.cast_column("label", lab_feat)
    except (ValueError, TypeError) as e:
        raise DataValidationError(
            f"Labels of {lab_col!r} do not fit the ClassLabel {lab_feat.names[:10]}...: {e}. If that is not the "
            f"class column, set {recipe_hint('label_column', '<the class column>')}; otherwise save the dataset with "
            "a label feature that lists every class name in both splits, or remove the rows whose label is unknown."
        ) from e

    # ---- validation split -----------------------------------------------------------------
    if val is None:
        if streaming:
            raise DataValidationError(
                f"No validation split (looked for {list(_VALIDATION_SPLIT_NAMES)}; available {splits}) and the "
                f"dataset is streamed, so none can be split off. Set {recipe_hint('validation_split', '<split>')}, "
                f"or {recipe_hint('streaming', 'false')} to hold out a stratified 10 % of train."
            )
        keep, held = stratified_split(split_labels(train), 0.1, seed)
        logger.info(f"no validation split found: holding out a seeded stratified 10% of train ({len(held)} rows)")
        train, val = train.select(keep), train.select(held)
    cls = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
    return cls({"train": train, "validation": val})


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
    dsd["train"] = class_balanced_subset(dsd["train"], max_train_samples, seed)
    dsd["validation"] = class_balanced_subset(dsd["validation"], max_eval_samples, seed)
    if validate:
        validate_image_dataset(
            dsd, image_size=image_size or (builtin.image_size if builtin else None),
            channels=channels or (builtin.channels if builtin else None),
        )
    return dsd
