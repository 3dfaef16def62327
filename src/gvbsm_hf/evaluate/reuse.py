"""When a student run is done already: the per-seed reuse of finished runs and the resume of killed ones.

A run (one student, one seed) is reused or resumed only if it was trained with the same settings:
the training arguments through the package's one rule, :func:`gvbsm_hf.fingerprint.config_to_dict`
minus :data:`~gvbsm_hf.fingerprint.NON_RESULT_FIELDS` (the stage cache's rule), plus the label
mode, the student's construction, the process count and content digests of the training images,
the validation split and the soft labels; all of it hashed by
:func:`~gvbsm_hf.fingerprint.config_fingerprint`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..ensemble import TeacherEnsemble
from ..fingerprint import NON_RESULT_FIELDS, config_fingerprint, config_to_dict, content_digest
from ..relabel.store import StoredSoftLabels
from .callbacks import EMA_STATE_FILE
from .config import GVBSMTrainingArguments

__all__ = [
    "RUN_RESULT_FILE",
    "RUN_SELECTION_FIELDS",
    "RUN_SETTINGS_FILE",
    "checkpoints",
    "data_fingerprints",
    "last_complete_checkpoint",
    "run_settings",
    "saved_run",
]

RUN_RESULT_FILE = "run_result.json"  # <run_dir>/run_result.json: one finished (student, seed) run
RUN_SETTINGS_FILE = "run_settings.json"  # <run_dir>/run_settings.json: what the checkpoints there were trained with
RUN_SELECTION_FIELDS = frozenset({"eval_seeds", "eval_students"})
"""Fields that choose which runs exist, not what one run computes (a run is one student and seed)."""

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def run_settings(
    run_args: GVBSMTrainingArguments,
    label_mode: str,
    stored_view_policy: str,
    backbone_kwargs: Mapping[str, Any] | None,
    fingerprints: Mapping[str, str | None],
) -> dict[str, Any]:
    """What a run's result depends on, as written to ``run_settings.json`` / ``run_result.json``.

    ``fingerprint`` (compared before reusing or resuming a run) hashes the rest; ``training`` is
    every result field of ``run_args`` (so a changed field can be named)."""
    settings = {
        "student": run_args.student,
        "seed": int(run_args.seed),
        "label_mode": label_mode,
        "stored_view_policy": stored_view_policy if label_mode == "stored" else None,
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "world_size": int(run_args.world_size),
        "training": config_to_dict(run_args, NON_RESULT_FIELDS | RUN_SELECTION_FIELDS),
        **fingerprints,
    }
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it reads back from disk
    return {**settings, "fingerprint": config_fingerprint(settings)}


def changed_fields(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """Names of the settings (``training.<field>`` for training arguments) that differ."""
    before = before if isinstance(before, Mapping) else {}
    out = [k for k in sorted(set(before) | set(now)) if k not in ("training", "fingerprint") and before.get(k) != now.get(k)]
    old_t, new_t = before.get("training") or {}, now.get("training") or {}
    return out + [f"training.{k}" for k in sorted(set(old_t) | set(new_t)) if old_t.get(k) != new_t.get(k)]


def read_json(path: str) -> Any:
    """The JSON in ``path``, or ``None`` if it is missing or torn."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_settings(saved: Any, settings: Mapping[str, Any]) -> bool:
    return isinstance(saved, Mapping) and saved.get("fingerprint") == settings["fingerprint"]


def saved_run(run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result in ``<run_dir>/run_result.json`` if it was trained with the same settings."""
    saved = read_json(os.path.join(run_dir, RUN_RESULT_FILE))
    if not isinstance(saved, dict) or not same_settings(saved.get("settings"), settings):
        return None
    row = saved.get("result")
    if not isinstance(row, dict) or "top1" not in row:
        return None
    return {**row, "output_dir": run_dir}


def checkpoint_step(path: str) -> int:
    """The global step of a Trainer checkpoint folder ``.../checkpoint-<step>``."""
    return int(_CHECKPOINT_RE.match(os.path.basename(path)).group(1))


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the Trainer checkpoints in ``run_dir``, newest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found, reverse=True)


def last_complete_checkpoint(run_dir: str, *, with_ema: bool = False) -> str | None:
    """Like ``transformers.trainer_utils.get_last_checkpoint``, skipping a checkpoint cut short by a kill.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint is taken only when that file reads back with its own step (and, with
    ``with_ema``, holds the student EMA, written right after it)."""
    for step, path in checkpoints(run_dir):
        state = read_json(os.path.join(path, "trainer_state.json"))
        if not isinstance(state, dict) or int(state.get("global_step", -1)) != step:
            continue
        if with_ema and not os.path.isfile(os.path.join(path, EMA_STATE_FILE)):
            continue
        return path
    return None


def _validation_digest(images: Any, labels: Any) -> str:
    """Of the validation images: their bytes (a tensor), or the split + view of a
    :class:`gvbsm_hf.data.DecodedImages` (never decoded for it)."""
    if isinstance(images, torch.Tensor) or not hasattr(images, "fingerprint"):
        return content_digest(torch.as_tensor(images), torch.as_tensor(labels))
    return content_digest("decoded-on-access", images.fingerprint, torch.as_tensor(labels))


def _soft_label_digest(soft_labeler: TeacherEnsemble | None, stored: StoredSoftLabels | None) -> str | None:
    """What the soft labels are made of: the stored views + logits, or the teachers' weights."""
    if stored is not None:
        return content_digest(
            stored.boxes, stored.flip, stored.logits, stored.topk_values, stored.topk_indices,
            stored.out_size, stored.fill_margin, stored.num_classes, stored.mix_partner, stored.mix_boxes,
        )
    if soft_labeler is not None:
        items: list[Any] = [type(soft_labeler).__name__]
        for attr in ("logit_norm", "mixed_precision"):
            items.append((attr, getattr(soft_labeler, attr, None)))
        for name, t in soft_labeler.state_dict().items():
            items += [name, t]
        return content_digest(*items)
    return None


def data_fingerprints(train_images: Any, train_labels: Any, validation: tuple[Any, Any],
                      soft_labeler: TeacherEnsemble | None, stored: StoredSoftLabels | None) -> dict[str, str | None]:
    """Content digests of what a run trains and is evaluated on."""
    return {
        "train_fingerprint": content_digest(torch.as_tensor(train_images), torch.as_tensor(train_labels)),
        "validation_fingerprint": _validation_digest(*validation),
        "soft_label_fingerprint": _soft_label_digest(soft_labeler, stored),
    }
