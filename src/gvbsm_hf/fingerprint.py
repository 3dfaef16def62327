"""The one rule for "this field changes a result", and the package's hashers.

:func:`config_to_dict` is THE serializer of configs (dataclass -> plain JSON dict minus a deny-list):
the stage cache, the per-seed reuse of student runs, ``recipe.json`` and the export's
``gvbsm_config.json`` all go through it. :data:`NON_RESULT_FIELDS` is the deny-list of fields
that never change what a stage computes; :func:`config_fingerprint` hashes JSON-able values with
``datasets``' :class:`~datasets.fingerprint.Hasher`. Tensors are digested by content
(:func:`content_digest`, xxh64 of dtype, shape and bytes, read in place) and a model by its weights
(:func:`model_fingerprint`, sha256: recorded in statistics provenance, so its value never changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable

import numpy as np
import torch
import xxhash
from datasets.fingerprint import Hasher
from torch import nn
from transformers import TrainingArguments

SECRET_FIELDS = frozenset({"hub_token", "push_to_hub_token"})
"""Never written anywhere (recipe.json, cards)."""

NON_RESULT_FIELDS = SECRET_FIELDS | frozenset({
    # where and how a run reports and saves, not what it computes
    "output_dir", "logging_dir", "run_name", "report_to", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
    "save_strategy", "save_steps", "save_total_limit", "save_safetensors", "save_on_each_node", "save_only_model",
    "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "hub_always_push", "hub_revision", "push_to_hub_model_id", "push_to_hub_organization",
    "local_rank", "skip_memory_metrics", "dataloader_workers", "stages", "redo",
})
"""Deny-list of the stage cache: fields that never change a stage's output."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def config_to_dict(obj: Any, deny: Iterable[str] = SECRET_FIELDS) -> dict[str, Any]:
    """Every field of a config dataclass as plain JSON values, minus the ``deny`` names.

    ``TrainingArguments`` go through their own ``to_dict`` (enums as values, tokens masked)."""
    deny = set(deny)
    if isinstance(obj, TrainingArguments):
        d = obj.to_dict()
    elif dataclasses.is_dataclass(obj):
        d = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    else:
        raise TypeError(f"config_to_dict needs a dataclass, got {type(obj).__name__}")
    return _plain({k: v for k, v in d.items() if k not in deny})


def config_fingerprint(*values: Any) -> str:
    """``datasets.fingerprint.Hasher`` of JSON-able values."""
    return Hasher.hash(_plain(list(values)))


def content_digest(*items: Any) -> str:
    """xxh64 of tensors / arrays (dtype, shape and bytes, read in place) and plain values."""
    h = xxhash.xxh64()
    for item in items:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(f"value|{item!r}|".encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes, dtypes and bytes), first 16 hex digits.

    Identifies the teacher a statistics file was recorded with (statistics provenance).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
