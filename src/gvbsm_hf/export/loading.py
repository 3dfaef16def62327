"""Read an export back, from a local folder or the Hub: its ``datasets`` configs, its
:class:`DatasetSpec`, its stored views (Eq. 8) and plain tensors of the distilled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import hf_hub_download

from ..data import DatasetSpec, to_uint8_tensors
from ..errors import DataValidationError, GVBSMError
from ..relabel.store import StoredSoftLabels
from .layout import CONFIG_FILES, EXPORT_FILE


def _is_local(folder_or_repo: str | Path) -> bool:
    return Path(folder_or_repo).is_dir()


def load_distilled_dataset(
    folder_or_repo: str | Path, config: str = "default", *, split: str = "train", **kwargs: Any
) -> datasets.Dataset:
    """``datasets.load_dataset(folder_or_repo, config, split=split)`` of an export (local or Hub)."""
    if config not in CONFIG_FILES:
        raise GVBSMError(f"config {config!r} unknown: an export has configs {list(CONFIG_FILES)}.")
    if _is_local(folder_or_repo) and not (Path(folder_or_repo) / CONFIG_FILES[config]).exists():
        raise GVBSMError(
            f"{folder_or_repo} has no {config!r} config ({CONFIG_FILES[config]} is missing): it was exported "
            "without it; re-export with the corresponding argument (statistics= / stored_views=)."
        )
    try:
        return datasets.load_dataset(str(folder_or_repo), config, split=split, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        where = Path(folder_or_repo) / CONFIG_FILES[config] if _is_local(folder_or_repo) else (
            f"{CONFIG_FILES[config]} of {folder_or_repo}")
        raise GVBSMError(f"{where} is damaged or incomplete ({err.__cause__ or err}): copy or download the export "
                         "again, or export it again (`--redo export` in the run that made it).") from None


def _read_json(folder_or_repo: str | Path, filename: str) -> dict[str, Any]:
    if _is_local(folder_or_repo):
        path = Path(folder_or_repo) / filename
    else:
        path = Path(hf_hub_download(str(folder_or_repo), filename, repo_type="dataset"))
    if not path.exists():
        raise GVBSMError(f"{filename} is missing in {folder_or_repo}: it was not written by export_distilled_dataset.")
    return json.loads(path.read_text())


def load_distilled_spec(folder_or_repo: str | Path) -> DatasetSpec:
    """The :class:`DatasetSpec` saved with an export (``gvbsm_export.json``)."""
    return DatasetSpec.from_dict(_read_json(folder_or_repo, EXPORT_FILE)["spec"])


def load_stored_soft_labels(folder_or_repo: str | Path) -> StoredSoftLabels:
    """The ``views`` config of an export (stored views, Eq. 8) as a :class:`StoredSoftLabels`."""
    meta = _read_json(folder_or_repo, EXPORT_FILE).get("views")
    if not meta:
        raise GVBSMError(
            f"{folder_or_repo} has no stored-view metadata: export with stored_views=relabel_stored(...) "
            "(a StoredSoftLabels or its to_dataset()) to publish replayable views."
        )
    return StoredSoftLabels.from_rows(load_distilled_dataset(folder_or_repo, "views"), meta)


def to_tensors(
    ds: datasets.Dataset, spec: DatasetSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 images ``(N, C, H, W)``, int64 labels ``(N,)`` and float32 soft logits ``(N, K)``
    (``None`` when the export has none; top-k exports are densified with the min kept value - 1,
    as :class:`StoredSoftLabels` does).

    ``spec`` gives channels / size; without it they are read from the first image.
    """
    if "image" not in ds.column_names or "label" not in ds.column_names:
        raise DataValidationError(f"not a distilled-set table (columns {ds.column_names}): load the 'default' config.")
    if spec is None:
        first = np.asarray(ds[0]["image"]) if len(ds) else np.zeros((1, 1), np.uint8)
        c = 1 if first.ndim == 2 else int(first.shape[-1])
        label_feat = ds.features["label"]
        k = label_feat.num_classes if isinstance(label_feat, datasets.ClassLabel) else 0
        spec = DatasetSpec(name="distilled", num_classes=k, image_size=int(first.shape[0]), channels=c,
                           mean=(0.0,) * c, std=(1.0,) * c)
    images, labels = to_uint8_tensors(ds, spec)
    soft = None
    if "soft_logits" in ds.column_names:
        soft = torch.from_numpy(np.asarray(ds.with_format("numpy")["soft_logits"], dtype=np.float32))
    elif "topk_values" in ds.column_names:
        table = ds.with_format("numpy")
        values = torch.from_numpy(np.asarray(table["topk_values"], dtype=np.float32))
        indices = torch.from_numpy(np.asarray(table["topk_indices"]).astype(np.int64))
        k = ds.features["label"].num_classes
        fill = values.min(dim=1, keepdim=True).values - 1.0
        soft = fill.expand(len(values), k).clone().scatter_(1, indices, values)
    return images, labels, soft
