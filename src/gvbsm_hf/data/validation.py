"""Checks of a ``DatasetDict`` before any compute; every error names its fix."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from ..errors import DataValidationError
from .decoding import mode_channels, open_image
from .sampling import split_labels


def recipe_hint(field: str, value: str) -> str:
    """How to set a recipe field, for error messages: ``` `field: value` in the recipe (--field value)```."""
    return f"`{field}: {value}` in the recipe (--{field} {value})"


def missing_column(column: str, which: str, split: str, available: Sequence[str]) -> DataValidationError:
    arg = f"{which}_column"
    return DataValidationError(
        f"Column {column!r} (the {which} column) is missing from split {split!r}; available columns: "
        f"{list(available)}. Set {recipe_hint(arg, '<one of them>')}."
    )


def _source_of(value: object) -> str:
    """`` (file <path>)`` for an image value that came from a file, else ``""``."""
    path = value.get("path") if isinstance(value, dict) else None
    return f" (file {path})" if path else ""


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
                f"Split {split!r} is missing (splits: {list(dataset.keys())}). Set "
                f"{recipe_hint('train_split', '<split>')} and {recipe_hint('validation_split', '<split>')} to splits "
                "of the dataset."
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
                raise missing_column(col, which, split, cols)
        if features is not None:
            if not isinstance(features["image"], datasets.Image):
                raise DataValidationError(
                    f"Column 'image' of split {split!r} is {features['image']}, not an image column: set "
                    f"{recipe_hint('image_column', '<the image column>')} (columns: {cols})."
                )
            if not isinstance(features["label"], datasets.ClassLabel):
                raise DataValidationError(
                    f"Column 'label' of split {split!r} is {features['label']}, not a ClassLabel of class names: set "
                    f"{recipe_hint('label_column', '<the class column>')} (columns: {cols}); integer and string "
                    "class columns are turned into a ClassLabel when the dataset is loaded."
                )
            if names is None:
                names = list(features["label"].names)
        k = len(names) if names is not None else None
        if k is not None and k < 2:
            raise DataValidationError(
                f"The dataset has {k} class{'' if k == 1 else 'es'} ({names}): distillation needs at least two. "
                f"Check {recipe_hint('label_column', '<the class column>')}, or add images of the other classes."
            )

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
            labels = split_labels(ds)
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
                f"({len(bad)} rows; -1 usually marks unlabelled data such as a Hub test split). Set "
                f"{recipe_hint('validation_split' if split == 'validation' else 'train_split', '<a labelled split>')}, "
                "or remove the unlabelled rows from the dataset."
            )
        if k is not None:
            bad = np.flatnonzero(labels >= k)
            if len(bad):
                raise DataValidationError(
                    f"Split {split!r} has label {int(labels[bad[0]])} at row {int(label_rows[bad[0]])}, out of range "
                    f"for the ClassLabel with {k} classes (valid 0..{k - 1}; {len(bad)} rows). If that is not the "
                    f"class column, set {recipe_hint('label_column', '<the class column>')}; otherwise save the "
                    "dataset with a label feature ClassLabel(names=[...]) that lists every class, or remove those rows."
                )
        if split == "train" and k is not None and not streaming:
            counts = np.bincount(labels, minlength=k)
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                _check_validation_only_labels(dataset["validation"], empty, names or [])
                shown = ", ".join(f"{names[i]!r} (id {i})" for i in empty[:5])
                raise DataValidationError(
                    f"Class {shown} has no training images ({len(empty)} empty of {k}). Add training images of it, "
                    "remove it from the dataset's class names, or, if `max_train_samples:` is set, raise it to at "
                    f"least the number of classes ({recipe_hint('max_train_samples', str(k))} or more)."
                )

        # ---- images ------------------------------------------------------------------------
        for row, value in zip(row_ids, values):
            try:
                img = open_image(value)
            except Exception as e:  # PIL raises many types on bad bytes
                raise DataValidationError(
                    f"Image at row {row} of split {split!r}{_source_of(value)} cannot be decoded ({type(e).__name__}: "
                    f"{e}). The bytes are corrupt or not an image: remove the row (for an image folder, delete the "
                    "file) or re-encode the file."
                ) from e
            sizes.setdefault(img.size, (split, row))
            modes.setdefault(mode_channels(img.mode), (split, row, img.mode))
    if image_size is None:
        if len(sizes) > 1:
            (s1, (sp1, r1)), (s2, (sp2, r2)) = list(sizes.items())[:2]
            raise DataValidationError(
                f"Images have different sizes: {s1[0]}x{s1[1]} ({sp1} row {r1}) and {s2[0]}x{s2[1]} ({sp2} row {r2}). "
                f"Set {recipe_hint('image_size', 'N')} so that every image is resized to NxN when decoded, or "
                "resize the image files to one square size."
            )
        if sizes:
            (w, h), (sp, r) = next(iter(sizes.items()))
            if w != h:
                raise DataValidationError(
                    f"Images are {w}x{h}, not square ({sp} row {r}). Set {recipe_hint('image_size', 'N')} so that "
                    "they are resized to NxN when decoded, or crop the image files to squares first."
                )
    if channels is None and len(modes) > 1:
        (c1, (sp1, r1, m1)), (c2, (sp2, r2, m2)) = list(modes.items())[:2]
        raise DataValidationError(
            f"Images have different channel counts: mode {m1!r} ({c1} channels, {sp1} row {r1}) and mode {m2!r} "
            f"({c2} channels, {sp2} row {r2}). Set {recipe_hint('channels', '3')} (RGB; or 1 for grey) so that "
            "every image is converted to that many channels when decoded, or convert the image files to one mode."
        )


def _check_validation_only_labels(
    validation: datasets.Dataset | datasets.IterableDataset, empty: np.ndarray, names: Sequence[str]
) -> None:
    """Raise naming the split, row and label when a class without training images occurs in the
    validation split (typically an image folder whose ``validation/<class>/`` has no ``train/`` twin)."""
    features = None if isinstance(validation, datasets.IterableDataset) else validation.features
    if not features or "label" not in features:
        return
    val_labels = split_labels(validation)
    for i in empty:
        rows = np.flatnonzero(val_labels == i)
        if len(rows):
            label = names[i] if i < len(names) else str(i)
            more = f" and {len(rows) - 1} more row(s)" if len(rows) > 1 else ""
            source = ""
            if "image" in validation.features:
                raw = validation.cast_column("image", datasets.Image(decode=False))
                source = _source_of(raw[int(rows[0])]["image"])
            raise DataValidationError(
                f"Label {label!r} (id {int(i)}) occurs in split 'validation' at row {int(rows[0])}{source}{more}, "
                f"but never in split 'train' ({len(empty)} class(es) without training images). Add training images "
                f"of {label!r} (image folder: <folder>/train/{label}/), or remove its rows from the validation split "
                f"(image folder: its {label}/ folder), or set "
                f"{recipe_hint('validation_split', '<a split whose labels all occur in train>')}. If "
                "`max_train_samples:` is set, a larger value may keep the class."
            )
