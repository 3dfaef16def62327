"""Checks of a ``DatasetDict`` before any compute; every error names its fix."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from ..errors import DataValidationError
from .decoding import _mode_channels, _open_image, _split_labels


def _missing_column(column: str, which: str, split: str, available: Sequence[str]) -> DataValidationError:
    arg = f"{which}_column"
    return DataValidationError(
        f"Column {column!r} (the {which} column) is missing from split {split!r}; available columns: "
        f"{list(available)}. Pass {arg}=<one of them> to load_image_dataset (recipe field `{arg}`)."
    )


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
