"""The statistics file of one teacher (record stage, docs/method.md Eq. 9): :class:`TeacherStatistics`,
safetensors on disk (``"<layer>/<stat>"`` keys, provenance as JSON metadata) and a
``datasets.Dataset`` table for publishing.

Per-class statistics (``stats_per_class``, docs/method.md "Beyond G-VBSM") go in the same file
under extra keys (``class_bn/<layer>/{mean,var}``, ``class_conv/<layer>/<stat>``,
``class_counts``); files without them still load (``TeacherStatistics.per_class`` is False).
Per-instance statistics (``stats_instance``, docs/method.md Eq. 19) likewise: ``instance_bn/<layer>/mean_var``
(``TeacherStatistics.instance_bn``; ``TeacherStatistics.per_instance`` is False without them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from safetensors import safe_open

from ..errors import DataValidationError, StatisticsMismatchError
from ..moments import CONV_STATISTICS
from ..utils import damaged_file_error, save_safetensors

FORMAT_NAME = "gvbsm_hf.statistics"
FORMAT_VERSION = 1
_RESERVED_PREFIX = "gvbsm_hf."  # metadata keys not part of the provenance
_REDO_FIX = "Re-run the record stage for this teacher (`--redo record`)."
CLASS_BN_STATISTICS = ("mean", "var")
"""Keys of every ``TeacherStatistics.class_bn[layer]`` dict."""
CLASS_COUNTS_KEY = "class_counts"
INSTANCE_PREFIX = "instance_bn"
INSTANCE_STATISTIC = "mean_var"
"""``instance_bn/<bn_layer>/mean_var``: the per-instance statistic ``V_{l,c}`` of Eq. 19 in the file."""


@dataclass
class TeacherStatistics:
    """Global Conv statistics of one teacher (Eq. 9) and where they come from.

    ``layers[name]`` maps ``channel_mean``, ``channel_var`` (``(C,)``) and ``patch_mean``,
    ``patch_var`` (``(ceil(H/p), ceil(W/p))``) to float32 CPU tensors; layers in forward order.
    ``provenance`` holds teacher_fingerprint, teacher_name, dataset, split, num_images,
    patch_size, conv_target, augment, crop_scale, image_size, seed, gvbsm_hf_version and
    variance_definition.
    """

    layers: dict[str, dict[str, torch.Tensor]]
    provenance: dict[str, str | int | float] = field(default_factory=dict)
    class_bn: dict[str, dict[str, torch.Tensor]] | None = None
    """Per-class BN-input statistics: ``{bn_layer: {"mean": (K, C), "var": (K, C)}}`` (``stats_per_class``)."""
    class_conv: dict[str, dict[str, torch.Tensor]] | None = None
    """Per-class Conv statistics: ``{conv_layer: {channel_mean, channel_var: (K, C), patch_mean, patch_var: (K, Hp, Wp)}}``."""
    class_counts: torch.Tensor | None = None
    """Images of each class in the pass ``(K,)`` (float32); a class with 0 has no per-class statistics."""
    instance_bn: dict[str, torch.Tensor] | None = None
    """Per-instance statistic of every BN layer (``stats_instance``, docs/method.md Eq. 19): ``{bn_layer: V (C,)}``,
    the variance over all recorded images of their per-image spatial channel means of the BN input."""

    @property
    def layer_names(self) -> list[str]:
        """Conv layer names in forward order."""
        return list(self.layers)

    @property
    def per_class(self) -> bool:
        """Whether per-class statistics were recorded (``stats_per_class``)."""
        return self.class_counts is not None

    @property
    def per_instance(self) -> bool:
        """Whether the per-instance statistics were recorded (``stats_instance``)."""
        return self.instance_bn is not None


def augment_kind(augment: bool | str) -> str:
    """``True`` / ``False`` (gvbsm-hf 0.1 files and calls) as ``"per_image_rrc"`` / ``"none"``."""
    if isinstance(augment, bool):
        return "per_image_rrc" if augment else "none"
    return str(augment)


def save_statistics(stats: TeacherStatistics, path: str | Path) -> Path:
    """Write ``stats`` as safetensors: ``"<layer>/<stat>"`` tensors, provenance as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer_stats in stats.layers.items():
        if "/" in name:
            raise ValueError(f"Layer name {name!r} contains '/', which the statistics file uses as separator.")
        for key, value in layer_stats.items():
            tensors[f"{name}/{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    if stats.per_class:  # extra keys; a file without them is a global-only file
        for kind, layers in (("class_bn", stats.class_bn or {}), ("class_conv", stats.class_conv or {})):
            for name, layer_stats in layers.items():
                if "/" in name:
                    raise ValueError(f"Layer name {name!r} contains '/', which the statistics file uses as separator.")
                for key, value in layer_stats.items():
                    tensors[f"{kind}/{name}/{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        tensors[CLASS_COUNTS_KEY] = stats.class_counts.detach().to("cpu", torch.float32).contiguous()
    if stats.per_instance:  # extra keys, optional as the per-class ones
        for name, value in (stats.instance_bn or {}).items():
            if "/" in name:
                raise ValueError(f"Layer name {name!r} contains '/', which the statistics file uses as separator.")
            tensors[f"{INSTANCE_PREFIX}/{name}/{INSTANCE_STATISTIC}"] = value.detach().to("cpu", torch.float32).contiguous()
    metadata = {key: json.dumps(value) for key, value in stats.provenance.items()}
    if stats.per_instance:
        metadata[_RESERVED_PREFIX + "instance_bn_layers"] = json.dumps(list(stats.instance_bn or {}))
    if stats.per_class:
        metadata[_RESERVED_PREFIX + "class_bn_layers"] = json.dumps(list(stats.class_bn or {}))
    metadata[_RESERVED_PREFIX + "format"] = FORMAT_NAME
    metadata[_RESERVED_PREFIX + "format_version"] = str(FORMAT_VERSION)
    metadata[_RESERVED_PREFIX + "layers"] = json.dumps(list(stats.layers))
    save_safetensors(tensors, path, metadata=metadata)  # atomic: a kill never leaves a torn file
    return path


def _mismatch(path: Path, what: str, found, expected) -> StatisticsMismatchError:
    return StatisticsMismatchError(
        f"Statistics file {path} was recorded with {what}={found!r}, but {expected!r} is expected here. "
        f"{_REDO_FIX}"
    )


def load_statistics(
    path: str | Path,
    *,
    expect_fingerprint: str | None = None,
    expect_patch_size: int | None = None,
    expect_conv_target: str | None = None,
    expect_layers: Sequence[str] | None = None,
    expect_augment: str | None = None,
    expect_patch_mode: str | None = None,
    expect_per_class: bool = False,
    expect_per_instance: bool = False,
) -> TeacherStatistics:
    """Read a file written by :func:`save_statistics`, checking that it fits its use.

    Per-class statistics (extra keys) are loaded when present; ``expect_per_class=True`` requires them; the
    same for the per-instance statistics (Eq. 19) and ``expect_per_instance=True``.

    Raises:
        FileNotFoundError: no such file (run the record stage).
        StatisticsMismatchError: another teacher (fingerprint), patch size, Conv target or layer set,
            or no per-class statistics where they are expected; the message names the mismatch and
            the fix (``--redo record``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No statistics file at {path}. Run the record stage (stages: [record]) first.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get(_RESERVED_PREFIX + "format") != FORMAT_NAME:
                raise StatisticsMismatchError(
                    f"{path} is not a gvbsm-hf statistics file (no '{_RESERVED_PREFIX}format' metadata). {_REDO_FIX}"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except StatisticsMismatchError:
        raise
    except Exception as err:  # a torn file: safetensors cannot read its header
        raise damaged_file_error(path, "record", f"{type(err).__name__}: {err}") from None
    provenance = {
        key: json.loads(value) for key, value in metadata.items() if not key.startswith(_RESERVED_PREFIX)
    }
    order = json.loads(metadata.get(_RESERVED_PREFIX + "layers", "[]"))
    layers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in order}
    per_class: dict[str, dict[str, dict[str, torch.Tensor]]] = {"class_bn": {}, "class_conv": {}}
    class_counts = tensors.pop(CLASS_COUNTS_KEY, None)
    instance: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == INSTANCE_PREFIX:
            if parts[2] != INSTANCE_STATISTIC:
                raise StatisticsMismatchError(f"{path} holds an unknown per-instance statistic {key!r}. {_REDO_FIX}")
            instance[parts[1]] = value
            continue
        if len(parts) == 3 and parts[0] in per_class:  # a layer name never holds '/': not a global key
            per_class[parts[0]].setdefault(parts[1], {})[parts[2]] = value
            continue
        name, _, stat = key.rpartition("/")
        layers.setdefault(name, {})[stat] = value
    incomplete = [name for name, st in layers.items() if set(st) != set(CONV_STATISTICS)]
    if incomplete:
        raise StatisticsMismatchError(
            f"{path} lacks some of {CONV_STATISTICS} for layer(s) {incomplete[:3]}; the file is incomplete. {_REDO_FIX}"
        )

    if expect_fingerprint is not None and provenance.get("teacher_fingerprint") != expect_fingerprint:
        raise StatisticsMismatchError(
            f"Statistics file {path} was recorded for teacher fingerprint "
            f"{provenance.get('teacher_fingerprint')!r} ({provenance.get('teacher_name') or 'unnamed'}), but the "
            f"teacher in use has fingerprint {expect_fingerprint!r}: its weights changed since recording. {_REDO_FIX}"
        )
    if expect_patch_size is not None and provenance.get("patch_size") != int(expect_patch_size):
        raise _mismatch(path, "patch_size (stats_patch_size)", provenance.get("patch_size"), int(expect_patch_size))
    if expect_conv_target is not None and provenance.get("conv_target") != expect_conv_target:
        raise _mismatch(path, "conv_target (stats_conv_target)", provenance.get("conv_target"), expect_conv_target)
    if expect_augment is not None and augment_kind(provenance.get("augment", False)) != expect_augment:
        raise _mismatch(path, "recording augmentation (stats_augment)", augment_kind(provenance.get("augment", False)),
                        expect_augment)
    if expect_patch_mode is not None and provenance.get("patch_mode", "partial") != expect_patch_mode:
        raise _mismatch(path, "patch mode (stats_patch_mode)", provenance.get("patch_mode", "partial"), expect_patch_mode)
    has_class = class_counts is not None or any(per_class.values())
    if has_class:
        bad = [n for n, st in per_class["class_bn"].items() if set(st) != set(CLASS_BN_STATISTICS)]
        bad += [n for n, st in per_class["class_conv"].items() if set(st) != set(CONV_STATISTICS)]
        if class_counts is None or bad or set(per_class["class_conv"]) != set(layers):
            raise StatisticsMismatchError(f"{path} holds incomplete per-class statistics ({bad[:3]}). {_REDO_FIX}")
    elif expect_per_class:
        raise StatisticsMismatchError(
            f"Statistics file {path} has no per-class statistics, which soft category-aware matching "
            "(syn_class_weight < 1) needs: set `stats_per_class: true` and re-run the record stage (`--redo record`).")
    has_instance = bool(instance) or (_RESERVED_PREFIX + "instance_bn_layers") in metadata
    if expect_per_instance and not has_instance:
        raise StatisticsMismatchError(
            f"Statistics file {path} has no per-instance statistics, which per-instance statistic matching "
            "(syn_r_instance > 0, docs/method.md Eq. 19) needs: set `stats_instance: true` and re-run the record "
            "stage (`--redo record`).")
    instance_bn = None
    if has_instance:
        inst_order = json.loads(metadata.get(_RESERVED_PREFIX + "instance_bn_layers", "[]"))
        inst_order = [n for n in inst_order if n in instance] + sorted(set(instance) - set(inst_order))
        instance_bn = {n: instance[n] for n in inst_order}
    if expect_layers is not None:
        expected = list(expect_layers)
        missing = [n for n in expected if n not in layers]
        extra = [n for n in layers if n not in set(expected)]
        if missing or extra:
            raise StatisticsMismatchError(
                f"Statistics file {path} does not cover the teacher's Conv layers: missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''} "
                f"({len(missing)} missing, {len(extra)} unexpected); it was recorded for another backbone. {_REDO_FIX}"
            )
    if not has_class:
        return TeacherStatistics(layers=layers, provenance=provenance, instance_bn=instance_bn)
    bn_order = json.loads(metadata.get(_RESERVED_PREFIX + "class_bn_layers", "[]"))
    bn_order = [n for n in bn_order if n in per_class["class_bn"]] + sorted(set(per_class["class_bn"]) - set(bn_order))
    return TeacherStatistics(layers=layers, provenance=provenance,
                             class_bn={n: per_class["class_bn"][n] for n in bn_order},
                             class_conv={n: per_class["class_conv"][n] for n in layers}, class_counts=class_counts,
                             instance_bn=instance_bn)


def statistics_to_dataset(stats: Sequence[TeacherStatistics]) -> datasets.Dataset:
    """One row per (teacher, layer, statistic): a ``datasets.Dataset`` for publishing.

    Columns: teacher, teacher_fingerprint, layer, statistic, shape (list[int]), values (flattened
    float32) and provenance (JSON). :func:`statistics_from_dataset` inverts it.
    """
    columns = ("teacher", "teacher_fingerprint", "layer", "statistic", "shape", "values", "provenance")
    rows: dict[str, list] = {k: [] for k in columns}
    for s in stats:
        prov = json.dumps(s.provenance, sort_keys=True)
        for name, layer_stats in s.layers.items():
            for key, value in layer_stats.items():
                rows["teacher"].append(str(s.provenance.get("teacher_name", "")))
                rows["teacher_fingerprint"].append(str(s.provenance.get("teacher_fingerprint", "")))
                rows["layer"].append(name)
                rows["statistic"].append(key)
                rows["shape"].append(list(value.shape))
                rows["values"].append(value.detach().to("cpu", torch.float32).reshape(-1).numpy())
                rows["provenance"].append(prov)
    features = datasets.Features(
        {
            "teacher": datasets.Value("string"),
            "teacher_fingerprint": datasets.Value("string"),
            "layer": datasets.Value("string"),
            "statistic": datasets.Value("string"),
            "shape": datasets.List(datasets.Value("int32")),
            "values": datasets.List(datasets.Value("float32")),
            "provenance": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def statistics_from_dataset(ds: datasets.Dataset) -> list[TeacherStatistics]:
    """Inverse of :func:`statistics_to_dataset` (teachers in order of first appearance)."""
    groups: dict[tuple[str, str, str], TeacherStatistics] = {}
    for row in ds:
        key = (row["teacher"], row["teacher_fingerprint"], row.get("provenance") or "{}")
        if key not in groups:
            groups[key] = TeacherStatistics(layers={}, provenance=json.loads(key[2]))
        values = torch.from_numpy(np.asarray(row["values"], dtype=np.float32).copy())
        shape = [int(d) for d in row["shape"]]
        if math.prod(shape) != values.numel():
            raise DataValidationError(
                f"Row ({row['layer']}, {row['statistic']}) has {values.numel()} values for shape {shape}; the "
                "statistics table is corrupt. Re-export it with statistics_to_dataset."
            )
        groups[key].layers.setdefault(row["layer"], {})[row["statistic"]] = values.view(shape)
    return list(groups.values())
