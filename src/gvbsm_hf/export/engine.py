"""Export (publish stage): a distilled set as a Hub-ready ``datasets`` folder (parquet configs,
dataset card, recipe, grid); layout in :mod:`gvbsm_hf.export.layout`.

Everything tabular is written by ``datasets`` (``to_parquet``), images as lossless PNG bytes; the
card is built by :mod:`gvbsm_hf.export.card`, read back with :mod:`gvbsm_hf.export.loading`,
pushed with :mod:`gvbsm_hf.export.push`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from .. import hub_utils
from ..data import DatasetSpec
from ..errors import DataValidationError, GVBSMError
from ..progress import progress_bar
from ..record.statistics_file import TeacherStatistics, statistics_to_dataset
from ..relabel.store import StoredSoftLabels
from .card import build_dataset_card, check_teachers, format_results
from .layout import CARD_FILE, CONFIG_FILE, CONFIG_FILES, EXPORT_FILE, EXPORT_FORMAT_VERSION

logger = logging.getLogger(__name__)  # used outside an Accelerator state (export runs on the main process)

_RESERVED_COLUMNS = ("image", "label", "soft_logits", "topk_values", "topk_indices")
_PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# ------------------------------------------------------------------------------ column checks


def _check_images(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise DataValidationError(
            f"images must be a uint8 tensor (N, C, H, W), got {type(images).__name__} "
            f"{tuple(getattr(images, 'shape', ()))}."
        )
    if images.dtype != torch.uint8:
        raise DataValidationError(
            f"images must be uint8 pixels, got {images.dtype}: convert normalised images with "
            "(spec.denormalize(x) * 255).round().to(torch.uint8) before exporting."
        )
    c = int(images.shape[1])
    if c not in _PNG_MODES:
        raise DataValidationError(f"images have {c} channels; PNG export supports 1, 2, 3 or 4 (N, C, H, W).")
    if c != spec.channels:
        raise DataValidationError(
            f"images have {c} channels but spec.channels={spec.channels}: pass the DatasetSpec of the distilled set."
        )
    h, w = int(images.shape[2]), int(images.shape[3])
    if (h, w) != (spec.image_size, spec.image_size):
        raise DataValidationError(
            f"images are {h}x{w} but spec.image_size={spec.image_size}: export at the spec's resolution "
            "(or pass the DatasetSpec the images were synthesised with)."
        )
    return images.detach().to("cpu").contiguous()


def _check_labels(labels: torch.Tensor | Sequence[int], n: int, spec: DatasetSpec) -> np.ndarray:
    t = torch.as_tensor(labels)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DataValidationError(f"labels must be integer class indices, got {t.dtype}.")
    y = t.detach().to("cpu", torch.int64).reshape(-1).numpy()
    if len(y) != n:
        raise DataValidationError(
            f"{n} images but {len(y)} labels: pass exactly one label per image (same order as the images)."
        )
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        bad = int(y[(y < 0) | (y >= spec.num_classes)][0])
        raise DataValidationError(
            f"label {bad} is outside [0, num_classes={spec.num_classes}): labels must index spec.class_names."
        )
    return y


def _class_names(spec: DatasetSpec) -> list[str]:
    names = [str(n) for n in spec.class_names] or [str(i) for i in range(spec.num_classes)]
    if len(names) != spec.num_classes:
        raise DataValidationError(
            f"spec.class_names has {len(names)} names for num_classes={spec.num_classes}: fix the DatasetSpec."
        )
    return names


def _check_soft_logits(soft_logits: torch.Tensor, n: int, num_classes: int) -> np.ndarray:
    t = torch.as_tensor(soft_logits)
    if t.ndim != 2 or t.shape[0] != n:
        raise DataValidationError(f"soft_logits must be (N={n}, K={num_classes}), got {tuple(t.shape)}.")
    if t.shape[1] != num_classes:
        raise DataValidationError(
            f"soft_logits has {t.shape[1]} columns but the dataset has num_classes={num_classes}: "
            "relabel with teachers trained on the same classes."
        )
    if not t.is_floating_point():
        raise DataValidationError(f"soft_logits must be float logits, got {t.dtype}.")
    if not torch.isfinite(t).all():
        raise DataValidationError("soft_logits contain NaN/inf: re-run relabel (check the teachers' outputs).")
    return t.detach().to("cpu", torch.float32).numpy()


def _column_length(name: str, values: Any) -> int:
    try:
        return len(values)
    except TypeError as e:
        raise DataValidationError(f"column {name!r} must be a list (one value per image).") from e


def _check_slot_metadata(slot_metadata: Mapping[str, Sequence[Any]] | None, n: int) -> dict[str, Sequence[Any]]:
    slot_metadata = dict(slot_metadata or {})
    for name, values in slot_metadata.items():
        if name in _RESERVED_COLUMNS:
            raise DataValidationError(f"slot_metadata column {name!r} clashes with a data column: rename it.")
        if _column_length(name, values) != n:
            raise DataValidationError(
                f"slot_metadata[{name!r}] has {_column_length(name, values)} values for {n} images: one per image."
            )
    return slot_metadata


def _png_bytes(images: torch.Tensor) -> list[dict[str, Any]]:
    """uint8 ``(N, C, H, W)`` -> ``datasets.Image`` storage dicts holding lossless PNG bytes."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    mode = _PNG_MODES[hwc.shape[-1]]
    out = []
    for a in progress_bar(hwc, desc="encoding PNG", disable=len(hwc) < 5_000, leave=False):
        buf = io.BytesIO()
        PILImage.fromarray(a[..., 0] if mode == "L" else a, mode=mode).save(buf, format="PNG")
        out.append({"bytes": buf.getvalue(), "path": None})
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _method_fields(method: Mapping[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    """(method name, ipc, hyper-parameters) of a method dict, flat recipe or nested form."""
    m = dict(method)
    name = m.get("method") or m.get("syn_method") or m.get("name") or "gvbsm"
    ipc = m.get("ipc")
    nested = m.get("hyperparameters")
    if isinstance(nested, Mapping):
        hyper = dict(nested)
    else:
        hyper = {k: v for k, v in m.items() if k not in ("method", "name", "ipc", "hyperparameters")}
    return str(name), (int(ipc) if ipc is not None else None), _jsonable(hyper)


def _views_table(
    stored_views: Mapping[str, Sequence[Any]] | datasets.Dataset | StoredSoftLabels, n: int
) -> tuple[datasets.Dataset, dict[str, Any] | None]:
    """(table, StoredSoftLabels metadata) of a dict of lists, a ``Dataset`` or a ``StoredSoftLabels``."""
    meta: dict[str, Any] | None = None
    if hasattr(stored_views, "to_dataset") and hasattr(stored_views, "metadata"):
        meta = dict(stored_views.metadata())
        table = stored_views.to_dataset()
    elif isinstance(stored_views, datasets.Dataset):
        table = stored_views
        desc = getattr(table.info, "description", None)
        if desc:
            try:
                meta = json.loads(desc).get("gvbsm_stored_soft_labels")
            except (ValueError, AttributeError):
                meta = None
    elif isinstance(stored_views, Mapping):
        lengths = {k: _column_length(k, v) for k, v in stored_views.items()}
        if len(set(lengths.values())) > 1:
            raise DataValidationError(f"stored_views columns have different lengths {lengths}: one row per image.")
        table = datasets.Dataset.from_dict(dict(stored_views))
    else:
        raise DataValidationError(
            "stored_views must be a dict of lists, a datasets.Dataset or a StoredSoftLabels (relabel_stored)."
        )
    if len(table) != n:
        raise DataValidationError(
            f"stored_views has {len(table)} rows for {n} images: store one row per image (relabel_stored on "
            "exactly the exported images, same order)."
        )
    return table, meta


def _default_table(
    images: torch.Tensor, y: np.ndarray, names: list[str], num_classes: int, logits: np.ndarray | None,
    topk: int | None, slot_metadata: Mapping[str, Sequence[Any]],
) -> tuple[datasets.Dataset, str | None]:
    """The ``default`` config (image, label, soft labels, slot metadata) and its soft-label kind
    (``"dense"``, ``"topk"`` or ``None``)."""
    columns: dict[str, Any] = {"image": _png_bytes(images), "label": y.tolist()}
    features: dict[str, Any] = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    soft_kind = None
    if logits is not None and topk is None:
        soft_kind = "dense"
        columns["soft_logits"] = logits
        features["soft_logits"] = datasets.List(datasets.Value("float32"), length=num_classes)
    elif logits is not None:
        soft_kind = "topk"
        values, indices = torch.from_numpy(logits).topk(int(topk), dim=1)
        index_dtype = "int16" if num_classes <= 32767 else "int32"
        columns["topk_values"] = values.numpy()
        columns["topk_indices"] = indices.numpy().astype(index_dtype)
        features["topk_values"] = datasets.List(datasets.Value("float32"), length=int(topk))
        features["topk_indices"] = datasets.List(datasets.Value(index_dtype), length=int(topk))
    if slot_metadata:
        inferred = datasets.Dataset.from_dict({k: list(v) for k, v in slot_metadata.items()})
        for k in slot_metadata:
            columns[k] = inferred[k]
            features[k] = inferred.features[k]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), soft_kind


# ------------------------------------------------------------------------------ export


def export_distilled_dataset(
    folder: str | Path,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: DatasetSpec,
    method: Mapping[str, Any],
    soft_logits: torch.Tensor | None = None,
    topk: int | None = None,
    slot_metadata: Mapping[str, Sequence[Any]] | None = None,
    stored_views: Mapping[str, Sequence[Any]] | datasets.Dataset | StoredSoftLabels | None = None,
    statistics: datasets.Dataset | Sequence[TeacherStatistics] | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    teacher_repos: Sequence[str] | None = None,
    teacher_names: Sequence[str] | None = None,
    grid_path: str | Path | None = None,
    repo_id: str | None = None,
    source_dataset: str | None = None,
    license: str | None = None,
    health: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Hub-ready dataset folder (publish stage, docs/method.md "Stages": images, labels,
    soft labels of Eq. 8, statistics of Eq. 9) and return its path.

    The card never contains a path of this machine: without ``repo_id`` its snippets load
    ``"path/to/this/folder"``, local paths in ``method`` are reduced to their last component.

    Args:
        folder: where to write; replaced if it holds an earlier export, refused if it holds anything else.
        images: uint8 ``(N, C, H, W)``, stored as lossless PNG (pixels identical on reload).
        labels: ``(N,)`` class indices in ``[0, spec.num_classes)`` (``ClassLabel(spec.class_names)``).
        spec: the distilled set's :class:`DatasetSpec` (saved in ``gvbsm_export.json``).
        method: recipe / method dict (method name, ``ipc``, hyper-parameters): ``gvbsm_config.json``.
        soft_logits: ``(N, K)`` ensemble logits, stored float32 as ``soft_logits``, or with ``topk``
            as ``topk_values`` (descending) / ``topk_indices``.
        slot_metadata: extra per-image columns (slot, batch, init, teacher used...).
        stored_views: per-image rows of stored relabel views (``views_boxes``, ``views_flip``,
            ``soft_logits`` or ``topk_values``/``topk_indices``, and ``views_mix_partner`` /
            ``views_mix_boxes`` under CutMix): dict, ``Dataset`` or ``StoredSoftLabels``.
        statistics: :func:`~gvbsm_hf.record.statistics_file.statistics_to_dataset` table (or the list of statistics).
        results: rows with ``evaluator``, ``protocol``, ``soft_label``/``labels``, ``mean``, ``std``, ``n``, ``method``.
        teacher_repos: Hub model ids (``owner/name``) of the *published* teachers: linked in the card
            and loaded by its on-the-fly relabel snippet. A local folder is refused: push it first
            (:func:`~gvbsm_hf.export.push.push_teacher`, or ``teacher_repo_prefix`` in the recipe) or use ``teacher_names``.
        teacher_names: names of the teachers (e.g. the folder names ``"convnet32"``, never paths), for
            description only: without ``teacher_repos`` the card lists them as *not published* and
            says how to get them; with it, the links are shown instead.
        grid_path: image grid copied into the folder and embedded in the card.
        repo_id: the Hub dataset id the folder is meant for (used in the card's snippets).
        source_dataset, license: provenance; ``license`` defaults to ``spec.license``.
        defaults: the values of the recipe that sets nothing (:func:`gvbsm_hf.recipe.recipe_defaults`):
            the card's metadata then lists only the values of ``method`` that differ (without them:
            its main settings); ``gvbsm_config.json`` always holds all of ``method``.
    """
    folder = Path(folder)
    images = _check_images(images, spec)
    n = int(images.shape[0])
    y = _check_labels(labels, n, spec)
    names = _class_names(spec)
    if not isinstance(method, Mapping):
        raise GVBSMError("method must be a dict (method name, ipc, hyper-parameters), e.g. recipe_to_dict(recipe).")
    if topk is not None and soft_logits is None:
        raise GVBSMError("topk needs soft_logits: pass the (N, K) ensemble logits to keep their top-k.")
    logits = _check_soft_logits(soft_logits, n, spec.num_classes) if soft_logits is not None else None
    if topk is not None and not 1 <= int(topk) <= spec.num_classes:
        raise GVBSMError(f"topk={topk} must be in [1, num_classes={spec.num_classes}].")
    slot_metadata = _check_slot_metadata(slot_metadata, n)
    method_name, ipc, hyper = _method_fields(method)
    format_results(results, method_name)  # validate before writing anything
    repos, teacher_labels = check_teachers(teacher_repos, teacher_names)
    if repo_id is not None and not hub_utils.is_hub_repo_id(repo_id):
        raise GVBSMError(
            f"repo_id {repo_id!r} is not a Hub dataset id 'owner/name': pass the repo the folder will be pushed to "
            "(or None, and the card's snippets load 'path/to/this/folder')."
        )
    if grid_path is not None and not Path(grid_path).is_file():
        raise GVBSMError(f"grid_path {grid_path} does not exist: save the grid first (visualize.save_class_grid).")
    if folder.exists() and any(folder.iterdir()) and not (folder / EXPORT_FILE).exists():
        raise GVBSMError(
            f"{folder} is not empty and is not a gvbsm-hf export: choose an empty or new folder to export into."
        )

    table, soft_kind = _default_table(images, y, names, spec.num_classes, logits, topk, slot_metadata)
    tables: dict[str, datasets.Dataset] = {"default": table}
    if statistics is not None:
        if not isinstance(statistics, datasets.Dataset):
            statistics = statistics_to_dataset(list(statistics))
        tables["statistics"] = statistics
    views_meta = None
    if stored_views is not None:
        tables["views"], views_meta = _views_table(stored_views, n)

    export_info = {
        "format_version": EXPORT_FORMAT_VERSION,
        "spec": spec.to_dict(),
        "num_images": n,
        "soft_labels": soft_kind,
        "topk": int(topk) if topk is not None else None,
        "slot_columns": list(slot_metadata),
        "configs": {name: CONFIG_FILES[name] for name in tables},
        "views": views_meta,
        "teachers": repos,
        "teacher_names": teacher_labels,
        "source_dataset": source_dataset,
    }

    # -- write into a sibling temp folder, then swap (no half-written export on failure) ----------
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, ds in tables.items():
            path = tmp / CONFIG_FILES[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(path))
        grid_file = None
        if grid_path is not None:
            grid_file = "grid" + (Path(grid_path).suffix.lower() or ".png")
            shutil.copyfile(grid_path, tmp / grid_file)
        (tmp / CONFIG_FILE).write_text(json.dumps(_jsonable(dict(method)), indent=2, sort_keys=True) + "\n")
        (tmp / EXPORT_FILE).write_text(json.dumps(_jsonable(export_info), indent=2) + "\n")
        card = build_dataset_card(
            tables, spec=spec, method_name=method_name, ipc=ipc, hyperparameters=hyper, results=results, health=health,
            teacher_repos=repos, teacher_names=teacher_labels, grid_file=grid_file, repo_id=repo_id,
            source_dataset=source_dataset, license=license if license is not None else spec.license, folder=tmp,
            soft_kind=soft_kind, topk=topk, slot_columns=list(slot_metadata), views_meta=views_meta,
            defaults=defaults,
        )
        card.save(tmp / CARD_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %d distilled images to %s (configs: %s)", n, folder, ", ".join(tables))
    return folder
