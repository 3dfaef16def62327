"""The dataset card of an export: a ``huggingface_hub.DatasetCard`` rendered from
``templates/dataset_card.md``, metadata through ``DatasetCardData``.

The card links only to places that exist: the paper (:data:`PAPER_URL`), the ``[project.urls]``
of the installed package (:func:`project_urls`), files inside the exported folder (relative links)
and the Hub repos the export names (its published teachers, its source dataset). It never names a
path of this machine. Its metadata header holds the dataset facts, the method, IPC and the recipe's
values that differ from the defaults (:func:`card_settings`); the full recipe is ``gvbsm_config.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path
from typing import Any

import datasets
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from .. import hub_utils
from ..data import DatasetSpec
from ..errors import GVBSMError
from ..fingerprint import NON_RESULT_FIELDS
from ..image_diagnostics import diagnostic_rows
from ..methods import get_method, list_methods
from .layout import CONFIG_FILES, export_sizes

TEMPLATE = "templates/dataset_card.md"
"""The card's body (a Jinja template, package data of gvbsm_hf)."""
PAPER_URL = "https://arxiv.org/abs/2311.17950"
"""G-VBSM (CVPR 2024) on arXiv (also in pyproject's ``[project.urls]``)."""
DISTRIBUTION = "gvbsm-hf"
"""The installed distribution whose ``[project.urls]`` the card links (:func:`project_urls`)."""
LOCAL_FOLDER_PLACEHOLDER = "path/to/this/folder"
"""What the card's snippets load when the export has no ``repo_id`` (never a path of this machine)."""
_LOCATION_KEYS = frozenset({"output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint"})
"""Recipe fields that only say where a run wrote its files: not shown in the card."""
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_HUB_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+\-]*$")
_MAIN_KEYS = ("syn_iterations", "syn_lr", "syn_r_bn", "syn_r_conv", "syn_alpha", "syn_beta_dr", "syn_dd",
              "syn_backbone_choice", "stats_patch_size", "teachers", "relabel_mode", "relabel_logit_norm",
              "student", "loss_type", "gamma", "num_train_epochs")
"""Hyper-parameters shown in the card's "Main settings" table (all of them are in gvbsm_config.json),
and its header's ``settings`` when the recipe defaults are not known."""
_NOT_SETTINGS = NON_RESULT_FIELDS | _LOCATION_KEYS | {"syn_method", "method", "name", "ipc"}
"""Never in the header's ``settings``: fields that change no result, locations, and the method and
IPC (keys of their own)."""
LABEL_NAMES = {
    "stored_views": "trained from this folder alone (stored views)",
}
"""How the card names the evaluate stage's label modes."""


def format_results(results: Sequence[Mapping[str, Any]] | None, default_method: str) -> list[dict[str, str]]:
    """The card's results rows; raises :class:`GVBSMError` for a row without ``evaluator`` / ``mean``."""
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


def check_teachers(
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


def selection_description(method_name: str) -> str | None:
    """For a method that selects real images instead of optimising them (``random_real``, ``rded``:
    ``not get_method(m).optimised``), its one-line description; ``None`` for an optimised one."""
    if method_name not in list_methods():
        return None
    method = get_method(method_name)
    return None if method.optimised else (method.description or "a selection of real training images")


def card_settings(hyperparameters: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe values of the card's header: those that differ from ``defaults`` (the values of
    the recipe that sets nothing, :func:`gvbsm_hf.recipe.recipe_defaults`), or, without
    ``defaults``, the main settings (:data:`_MAIN_KEYS`); local paths reduced to their names."""
    if defaults is None:
        chosen = {k: hyperparameters[k] for k in _MAIN_KEYS if k in hyperparameters}
    else:
        chosen = {k: v for k, v in hyperparameters.items() if k not in defaults or defaults[k] != v}
    return _public({k: v for k, v in chosen.items() if k not in _NOT_SETTINGS})


def project_urls() -> dict[str, str]:
    """``[project.urls]`` of the installed package (label -> URL; empty when it is not installed)."""
    try:
        entries = metadata(DISTRIBUTION).get_all("Project-URL") or []
    except PackageNotFoundError:
        return {}
    pairs = (entry.partition(",")[::2] for entry in entries)
    return {label.strip(): url.strip() for label, url in pairs if url.strip().startswith("https://")}


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
    defaults: Mapping[str, Any] | None = None,
) -> DatasetCard:
    """The ``DatasetCard`` of an export: metadata through ``DatasetCardData`` (with the ``configs``
    and ``dataset_info`` blocks written by ``datasets``' own helpers), body from the template.

    ``folder`` is only read (file sizes); the card names no path of this machine: snippets load
    ``repo_id`` or :data:`LOCAL_FOLDER_PLACEHOLDER`, teachers are Hub links (``teacher_repos``) or,
    when none is given, names said to be unpublished (``teacher_names``). The header's ``settings``
    are :func:`card_settings` of ``hyperparameters`` and ``defaults``.
    """
    n = len(tables["default"])
    license_id, license_name = _hub_license(license)
    teacher_ids, teacher_labels = check_teachers(teacher_repos, teacher_names)
    unpublished = [] if teacher_ids else teacher_labels
    if repo_id is not None and not hub_utils.is_hub_repo_id(repo_id):
        raise GVBSMError(f"repo_id {repo_id!r} is not a Hub dataset id 'owner/name'.")
    name = hub_utils.public_name(spec.name) or "dataset"
    selection = selection_description(method_name)
    tags = ["dataset-distillation", "gvbsm", "data-selection" if selection else "synthetic", "image-classification",
            "soft-labels"]
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
    title = (f"{name}: real images selected by {method_name} (IPC {ipc_text})" if selection
             else f"{name} distilled with {method_name} (IPC {ipc_text})")
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
        settings=card_settings(hyperparameters, defaults),
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
    hyper_rows = [(k, hp[k]) for k in _MAIN_KEYS if k in hp] or sorted(hp.items())[:20]
    template = resources.files("gvbsm_hf").joinpath(TEMPLATE).read_text(encoding="utf-8")
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
        selection=selection,
        paper_url=PAPER_URL,
        project_links=[(label, url) for label, url in project_urls().items() if url != PAPER_URL],
        settings_known=defaults is not None,
        grid_file=grid_file,
        config_table=config_table,
        soft_label_kind=soft_kind,
        topk=topk,
        slot_columns=list(slot_columns),
        has_statistics="statistics" in tables,
        has_views="views" in tables,
        results_rows=format_results(results, method_name),
        health=dict(health) if health else None,
        diagnostic_rows=diagnostic_rows((health or {}).get("diagnostics") or {}),
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
