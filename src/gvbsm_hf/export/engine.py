"""Publish: a distilled set as a Hub-ready ``datasets`` folder (parquet + dataset card), and push.

Layout of an exported folder (one ``upload_folder`` commit pushes all of it)::

    README.md                                  dataset card (YAML metadata + configs block)
    data/train-00000-of-00001.parquet          config "default": image, label, soft labels, slot metadata
    statistics/train-00000-of-00001.parquet    config "statistics": global Conv statistics (Eq. 9)
    views/train-00000-of-00001.parquet         config "views": stored relabel views + logits (Eq. 8)
    grid.png                                   one row of images per class
    gvbsm_config.json                          the recipe (``--config`` of recipes/distill.py)
    gvbsm_export.json                          DatasetSpec, soft-label format, views metadata

Everything tabular is written by ``datasets`` (``to_parquet``), images as lossless PNG bytes; the
card is a ``huggingface_hub.DatasetCard`` rendered from ``templates/dataset_card.md``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import shutil
import uuid
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from PIL import Image as PILImage
from tqdm.auto import tqdm

from .. import hub_utils
from ..data import DatasetSpec, to_uint8_tensors
from ..errors import DataValidationError, GVBSMError, OfflineError

logger = logging.getLogger(__name__)  # used outside an Accelerator state (export runs on the main process)

DATA_FILE = "data/train-00000-of-00001.parquet"
STATISTICS_FILE = "statistics/train-00000-of-00001.parquet"
VIEWS_FILE = "views/train-00000-of-00001.parquet"
CONFIG_FILE = "gvbsm_config.json"
EXPORT_FILE = "gvbsm_export.json"
CONFIG_FILES = {"default": DATA_FILE, "statistics": STATISTICS_FILE, "views": VIEWS_FILE}
EXPORT_FORMAT_VERSION = 1
_RESERVED_COLUMNS = ("image", "label", "soft_logits", "topk_values", "topk_indices")
_PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_HUB_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+\-]*$")


# ==========================================================================================
# validation helpers
# ==========================================================================================


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


def _png_bytes(images: torch.Tensor) -> list[dict[str, Any]]:
    """uint8 ``(N, C, H, W)`` -> ``datasets.Image`` storage dicts holding lossless PNG bytes."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    mode = _PNG_MODES[hwc.shape[-1]]
    out = []
    for a in tqdm(hwc, desc="encoding PNG", disable=len(hwc) < 5_000, leave=False):
        buf = io.BytesIO()
        PILImage.fromarray(a[..., 0] if mode == "L" else a, mode=mode).save(buf, format="PNG")
        out.append({"bytes": buf.getvalue(), "path": None})
    return out


def _size_category(n: int) -> str:
    for bound, name in _SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1B"


def _hub_license(license: str | None) -> tuple[str, str | None]:
    """(Hub license id, license_name for ``other``) of a free-form license string."""
    if not license:
        return "unknown", None
    text = license.strip()
    if _HUB_LICENSE_ID.match(text.lower()):
        return text.lower(), None
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "other"
    return "other", slug


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


def _views_table(stored_views: Any, n: int) -> tuple[datasets.Dataset, dict[str, Any] | None]:
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


# ==========================================================================================
# export
# ==========================================================================================


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
    stored_views: Mapping[str, Sequence[Any]] | datasets.Dataset | Any | None = None,
    statistics: datasets.Dataset | Sequence[Any] | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    teacher_repos: Sequence[str] | None = None,
    teacher_names: Sequence[str] | None = None,
    grid_path: str | Path | None = None,
    repo_id: str | None = None,
    source_dataset: str | None = None,
    license: str | None = None,
    health: Mapping[str, Any] | None = None,
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
        statistics: :func:`gvbsm_hf.record.engine.statistics_to_dataset` table (or the list of statistics).
        results: rows with ``evaluator``, ``protocol``, ``soft_label``/``labels``, ``mean``, ``std``, ``n``, ``method``.
        teacher_repos: Hub model ids (``owner/name``) of the *published* teachers: linked in the card
            and loaded by its on-the-fly relabel snippet. A local folder is refused: push it first
            (:func:`push_teacher`, or ``teacher_repo_prefix`` in the recipe) or use ``teacher_names``.
        teacher_names: names of the teachers (e.g. the folder names ``"convnet32"``, never paths), for
            description only: without ``teacher_repos`` the card lists them as *not published* and
            says how to get them; with it, the links are shown instead.
        grid_path: image grid copied into the folder and embedded in the card.
        repo_id: the Hub dataset id the folder is meant for (used in the card's snippets).
        source_dataset, license: provenance; ``license`` defaults to ``spec.license``.
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
    slot_metadata = dict(slot_metadata or {})
    for name, values in slot_metadata.items():
        if name in _RESERVED_COLUMNS:
            raise DataValidationError(f"slot_metadata column {name!r} clashes with a data column: rename it.")
        if _column_length(name, values) != n:
            raise DataValidationError(
                f"slot_metadata[{name!r}] has {_column_length(name, values)} values for {n} images: one per image."
            )
    method_name, ipc, hyper = _method_fields(method)
    _format_results(results, method_name)  # validate before writing anything
    repos, teacher_labels = _check_teachers(teacher_repos, teacher_names)
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

    # -- default config: image, label, soft labels, slot metadata ------------------------------
    columns: dict[str, Any] = {"image": _png_bytes(images), "label": y.tolist()}
    features: dict[str, Any] = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    soft_kind = None
    if logits is not None and topk is None:
        soft_kind = "dense"
        columns["soft_logits"] = logits
        features["soft_logits"] = datasets.List(datasets.Value("float32"), length=spec.num_classes)
    elif logits is not None:
        soft_kind = "topk"
        values, indices = torch.from_numpy(logits).topk(int(topk), dim=1)
        index_dtype = "int16" if spec.num_classes <= 32767 else "int32"
        columns["topk_values"] = values.numpy()
        columns["topk_indices"] = indices.numpy().astype(index_dtype)
        features["topk_values"] = datasets.List(datasets.Value("float32"), length=int(topk))
        features["topk_indices"] = datasets.List(datasets.Value(index_dtype), length=int(topk))
    if slot_metadata:
        inferred = datasets.Dataset.from_dict({k: list(v) for k, v in slot_metadata.items()})
        for k in slot_metadata:
            columns[k] = inferred[k]
            features[k] = inferred.features[k]
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    tables: dict[str, datasets.Dataset] = {"default": table}
    if statistics is not None:
        if not isinstance(statistics, datasets.Dataset):
            from ..record.engine import statistics_to_dataset

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
        )
        card.save(tmp / "README.md")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %d distilled images to %s (configs: %s)", n, folder, ", ".join(tables))
    return folder


def export_sizes(folder: str | Path) -> dict[str, Any]:
    """Megabytes of the images (``default`` config) and of the stored views (``views``), and their ratio."""
    folder = Path(folder)
    image = (folder / CONFIG_FILES["default"]).stat().st_size
    views = (folder / CONFIG_FILES["views"]).stat().st_size if (folder / CONFIG_FILES["views"]).exists() else 0
    return {"image_mb": round(image / 2**20, 3), "label_mb": round(views / 2**20, 3),
            "ratio": round(views / image, 1) if image else None}


LABEL_NAMES = {
    "stored_views": "trained from this folder alone (stored views)",
}
"""How the card names the evaluate stage's label modes."""


def _format_results(results: Sequence[Mapping[str, Any]] | None, default_method: str) -> list[dict[str, str]]:
    rows = []
    for i, r in enumerate(results or []):
        if "mean" not in r or "evaluator" not in r:
            raise GVBSMError(
                f"results[{i}] needs at least 'evaluator' and 'mean' (and 'std', 'n'), got keys {sorted(r)}."
            )
        labels = r.get("soft_label", r.get("labels", "soft"))
        if isinstance(labels, bool):
            labels = "soft" if labels else "hard"
        n = r.get("n", len(r.get("per_seed", [])) or 1)
        std = r.get("std")
        score = f"{float(r['mean']):.2f} ± {float(std):.2f}" if std is not None else f"{float(r['mean']):.2f}"
        protocol = r.get("protocol") or "last epoch, mean ± std over seeds"
        seeds = f"{n} seed" + ("" if str(n) == "1" else "s")
        protocol = protocol.replace("over seeds", f"over {seeds}") if "over seeds" in protocol else protocol
        labels = LABEL_NAMES.get(str(labels), str(labels))
        rows.append({"method": str(r.get("method", default_method)), "evaluator": str(r["evaluator"]),
                     "labels": labels, "score": score, "n": str(n), "protocol": protocol})
    return rows


# ------------------------------------------------------------------------------ card helpers

LOCAL_FOLDER_PLACEHOLDER = "path/to/this/folder"
"""What the card's snippets load when the export has no ``repo_id`` (never a path of this machine)."""
METHOD_DOC_URL = "https://github.com/gvbsm-hf/gvbsm-hf/blob/main/docs/method.md"
_LOCATION_KEYS = frozenset({"output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint"})
"""Recipe fields that only say where a run wrote its files: not shown in the card."""


def _check_teachers(
    teacher_repos: Sequence[str] | None, teacher_names: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(published Hub model ids, teacher names), validated."""
    repos = [str(t) for t in (teacher_repos or [])]
    names = [str(t) for t in (teacher_names or [])]
    for i, t in enumerate(repos):
        if not hub_utils.is_hub_repo_id(t):
            what = "a local path" if os.path.exists(t) else "not a Hub model id 'owner/name'"
            raise GVBSMError(
                f"teacher_repos[{i}] = {t!r} is {what}. teacher_repos lists published teachers only (the card links "
                "them and its snippet loads them on any machine). Push the teacher first (push_teacher(folder, "
                "'<org>/<name>'), or `teacher_repo_prefix: <org>/<name>` in the recipe) and pass its id; or describe "
                f"unpublished teachers with teacher_names=[{Path(t).name!r}, ...]."
            )
    for i, t in enumerate(names):
        if not t or "/" in t or "\\" in t or os.path.isabs(t):
            raise GVBSMError(
                f"teacher_names[{i}] = {t!r} is not a plain name: teacher_names describe unpublished teachers in the "
                f"card (e.g. the folder name {Path(t).name!r}, never a path); a published teacher goes in "
                "teacher_repos as its Hub id."
            )
    return repos, names


def _public(value: Any) -> Any:
    """``value`` (recipe / hyper-parameters) without paths of this machine: location fields
    dropped, other local paths reduced to ``"<local: last component>"``."""
    if isinstance(value, Mapping):
        return {k: _public(v) for k, v in value.items() if k not in _LOCATION_KEYS}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str) and hub_utils.is_local_path(value):
        return f"<local: {hub_utils.public_name(value)}>"
    return value


def build_dataset_card(
    tables: Mapping[str, datasets.Dataset],
    *,
    spec: DatasetSpec,
    method_name: str,
    ipc: int | None,
    hyperparameters: Mapping[str, Any],
    folder: Path,
    results: Sequence[Mapping[str, Any]] | None = None,
    health: Mapping[str, Any] | None = None,
    views_meta: Mapping[str, Any] | None = None,
    teacher_repos: Sequence[str] | None = None,
    teacher_names: Sequence[str] | None = None,
    grid_file: str | None = None,
    repo_id: str | None = None,
    source_dataset: str | None = None,
    license: str | None = None,
    soft_kind: str | None = None,
    topk: int | None = None,
    slot_columns: Sequence[str] = (),
) -> DatasetCard:
    """The ``DatasetCard`` of an export: metadata through ``DatasetCardData`` (with the ``configs``
    and ``dataset_info`` blocks written by ``datasets``' own helpers), body from the template.

    ``folder`` is only read (file sizes); the card names no path of this machine: snippets load
    ``repo_id`` or :data:`LOCAL_FOLDER_PLACEHOLDER`, teachers are Hub links (``teacher_repos``) or,
    when none is given, names said to be unpublished (``teacher_names``).
    """
    n = len(tables["default"])
    license_id, license_name = _hub_license(license)
    teacher_ids, teacher_labels = _check_teachers(teacher_repos, teacher_names)
    unpublished = [] if teacher_ids else teacher_labels
    if repo_id is not None and not hub_utils.is_hub_repo_id(repo_id):
        raise GVBSMError(f"repo_id {repo_id!r} is not a Hub dataset id 'owner/name'.")
    name = hub_utils.public_name(spec.name) or "dataset"
    tags = ["dataset-distillation", "gvbsm", "synthetic", "image-classification", "soft-labels"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if slug:
        tags.append(slug)
    source = source_dataset or spec.source or spec.name
    source_is_local = bool(source) and hub_utils.is_local_path(source)
    source_on_hub = bool(source) and not source_is_local and hub_utils.is_hub_repo_id(source, require_namespace=False)
    if source_is_local:
        source_name = f"a local dataset (`{hub_utils.public_name(source)}`)"
    else:
        source_name = source or "the source dataset"
    ipc_text = str(ipc) if ipc is not None else "?"
    title = f"{name} distilled with {method_name} (IPC {ipc_text})"
    hp = _public(dict(hyperparameters))
    extra: dict[str, Any] = {}
    if license_name:
        extra["license_name"] = license_name
    if unpublished:
        extra["unpublished_teachers"] = unpublished
    card_data = DatasetCardData(
        license=license_id,
        task_categories=["image-classification"],
        tags=tags,
        source_datasets=[source] if source_on_hub else None,  # Hub ids only; text goes in the body
        size_categories=[_size_category(n)],
        pretty_name=title,
        ipc=ipc,
        method=method_name,
        hyperparameters=hp,
        teachers=teacher_ids or None,  # published Hub ids only
        **extra,
    )
    MetadataConfigs(
        {config: {"data_files": [{"split": "train", "path": CONFIG_FILES[config]}]} for config in tables}
    ).to_dataset_card_data(card_data)
    infos = {}
    for config, ds in tables.items():
        nbytes = int(ds.data.nbytes)
        infos[config] = DatasetInfo(
            features=ds.features,
            splits=SplitDict({"train": SplitInfo(name="train", num_bytes=nbytes, num_examples=len(ds))}),
            download_size=(folder / CONFIG_FILES[config]).stat().st_size,
            dataset_size=nbytes,
        )
    DatasetInfosDict(infos).to_dataset_card_data(card_data)

    source_link = f"https://huggingface.co/datasets/{source}" if source_on_hub else "#source-data-and-license"
    main_keys = ["syn_iterations", "syn_lr", "syn_r_bn", "syn_r_conv", "syn_alpha", "syn_beta_dr", "syn_dd",
                 "syn_backbone_choice", "stats_patch_size", "teachers", "relabel_mode", "relabel_logit_norm",
                 "student", "loss_type", "gamma", "num_train_epochs"]
    hyper_rows = [(k, hp[k]) for k in main_keys if k in hp] or sorted(hp.items())[:20]
    template = resources.files("gvbsm_hf").joinpath("templates/dataset_card.md").read_text(encoding="utf-8")
    config_table = [
        {"name": config, "path": CONFIG_FILES[config], "rows": len(ds),
         "columns": ", ".join(f"`{c}`" for c in ds.column_names)}
        for config, ds in tables.items()
    ]
    return DatasetCard.from_template(
        card_data,
        template_str=template,
        title=title,
        source_name=source_name,
        source_link=source_link,
        num_images=n,
        ipc_text=ipc_text,
        num_classes=spec.num_classes,
        channels=spec.channels,
        image_size=spec.image_size,
        class_names=list(spec.class_names),
        method_name=method_name,
        method_doc_url=METHOD_DOC_URL,
        grid_file=grid_file,
        config_table=config_table,
        soft_label_kind=soft_kind,
        topk=topk,
        slot_columns=list(slot_columns),
        has_statistics="statistics" in tables,
        has_views="views" in tables,
        results_rows=_format_results(results, method_name),
        health=dict(health) if health else None,
        num_views=(views_meta or {}).get("num_views"),
        has_mix=bool((views_meta or {}).get("has_mix")),
        sizes=export_sizes(folder) if "views" in tables else None,
        load_id=repo_id or LOCAL_FOLDER_PLACEHOLDER,
        load_is_placeholder=repo_id is None,
        student=hp.get("student", "convnet128"),
        loss_type=hp.get("loss_type", "mse_gt") if (teacher_ids or "views" in tables) else "ce",
        gamma=hp.get("gamma", 0.1),
        epochs=hp.get("num_train_epochs", 300),
        teacher_ids=teacher_ids,
        teacher_ids_literal=json.dumps(teacher_ids),
        teacher_names=unpublished,
        hyperparameter_rows=[(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in hyper_rows],
        license_text=license or "unknown",
    )


# ==========================================================================================
# load
# ==========================================================================================


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
    return datasets.load_dataset(str(folder_or_repo), config, split=split, **kwargs)


def _read_json(folder_or_repo: str | Path, filename: str) -> dict[str, Any]:
    if _is_local(folder_or_repo):
        path = Path(folder_or_repo) / filename
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(folder_or_repo), filename, repo_type="dataset"))
    if not path.exists():
        raise GVBSMError(f"{filename} is missing in {folder_or_repo}: it was not written by export_distilled_dataset.")
    return json.loads(path.read_text())


def load_distilled_spec(folder_or_repo: str | Path) -> DatasetSpec:
    """The :class:`DatasetSpec` saved with an export (``gvbsm_export.json``)."""
    return DatasetSpec.from_dict(_read_json(folder_or_repo, EXPORT_FILE)["spec"])


def load_stored_soft_labels(folder_or_repo: str | Path):
    """The ``views`` config of an export as a :class:`gvbsm_hf.relabel.engine.StoredSoftLabels`."""
    from ..relabel.engine import StoredSoftLabels

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
    as :class:`~gvbsm_hf.relabel.engine.StoredSoftLabels` does).

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


# ==========================================================================================
# push
# ==========================================================================================


def retry_command(folder: str | Path, repo_id: str, repo_type: str, private: bool = False) -> str:
    """The ``hf upload`` command that pushes ``folder`` to ``repo_id`` (root of the repo)."""
    cmd = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(Path(folder).resolve()))} . --repo-type {repo_type}"
    return cmd + (" --private" if private else "")


def _offline_error(folder: Path, repo_id: str, repo_type: str, private: bool, cause: str) -> OfflineError:
    return hub_utils.offline_error(
        f"Could not push to the Hub {repo_type} repo {repo_id!r}",
        cause,
        f"nothing was deleted: the local folder is intact at {folder.resolve()}. When the network is back "
        f"(and HF_HUB_OFFLINE is unset), retry with:\n    {retry_command(folder, repo_id, repo_type, private)}",
    )


def _push_folder(
    folder: str | Path, repo_id: str, repo_type: str, *, token: str | None, private: bool,
    commit_message: str | None,
) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise GVBSMError(f"{folder} is not a folder: export it first (export_distilled_dataset / save_pretrained).")
    if not (folder / "README.md").exists():
        raise GVBSMError(f"{folder} has no README.md card: export it with gvbsm-hf before pushing.")
    offline = hub_utils.offline_reason()
    if offline is not None:
        raise _offline_error(folder, repo_id, repo_type, private, offline)
    if not hub_utils.hub_reachable():  # quick TCP probe: fail in seconds, not after a minute of retries
        raise _offline_error(folder, repo_id, repo_type, private, f"{hub_utils.hub_endpoint()} is not reachable")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        # one commit: the card's `configs:` block and the data files it lists land together
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
            commit_message=commit_message or f"Upload {folder.name} with gvbsm-hf",
        )
    except hub_utils.network_errors() as e:
        raise _offline_error(folder, repo_id, repo_type, private, f"{type(e).__name__}: {e}") from e
    logger.info("Pushed %s to %s", folder, url)
    return str(url)


def push_distilled_dataset(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Push an exported folder to a Hub dataset repo in one commit; returns the repo URL.

    Raises :class:`~gvbsm_hf.errors.OfflineError` (folder untouched, ``hf upload`` retry command
    in the message) when offline or the Hub cannot be reached.
    """
    return _push_folder(folder, repo_id, "dataset", token=token, private=private, commit_message=commit_message)


def push_teacher(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Push a saved teacher folder (``TeacherModel.save_pretrained``) to a Hub model repo; same
    offline behaviour as :func:`push_distilled_dataset`."""
    return _push_folder(folder, repo_id, "model", token=token, private=private, commit_message=commit_message)
