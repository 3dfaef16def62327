"""Record stage (GSM, docs/method.md Eq. 9): global Conv statistics of a teacher over real data.

One gradient-free pass over the (optionally augmented) real train split. For every Conv2d layer
the four statistics of :mod:`gvbsm_hf.hooks` are computed per batch and averaged over batches,
weighted by batch size::

    stat_global = sum_b n_b * stat_b / sum_b n_b                                     (Eq. 9)

(the variance is the mean of per-batch biased variances, as in the authors' code, not the
variance of the whole split). Sums are accumulated in float64 on the device, so memory does not
depend on the dataset size. With several processes each one sees its shard of batches (batch
``i`` -> process ``i % N``), sums and counts are reduced with ``accelerator.reduce`` at the end,
and the random crop of batch ``i`` uses a generator seeded from ``(seed, i)``: 1 and N processes
record the same statistics.

Statistics are stored as safetensors (``"<layer>/<stat>"`` keys) with their provenance in the
metadata, and can be turned into a ``datasets.Dataset`` for publishing.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .data import DatasetSpec
from .errors import DataValidationError, StatisticsMismatchError
from .hooks import CONV_STATISTICS, StatisticsHooks
from .utils import damaged_file_error, model_fingerprint, save_safetensors, seeded_generator

logger = logging.getLogger(__name__)

VARIANCE_DEFINITION = "mean of per-batch biased variances, weighted by batch size"
FORMAT_NAME = "gvbsm_hf.statistics"
FORMAT_VERSION = 1
_RESERVED_PREFIX = "gvbsm_hf."  # metadata keys not part of the provenance
_REDO_FIX = "Re-run the record stage for this teacher (`--redo record`)."


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

    @property
    def layer_names(self) -> list[str]:
        """Conv layer names in forward order."""
        return list(self.layers)


def augment_kind(augment: bool | str) -> str:
    """``True`` / ``False`` (gvbsm-hf 0.1 files and calls) as ``"per_image_rrc"`` / ``"none"``."""
    if isinstance(augment, bool):
        return "per_image_rrc" if augment else "none"
    return str(augment)


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """CPU generator of global batch ``batch_index``: the same on every process layout."""
    return seeded_generator(seed, "record", batch_index)


@torch.no_grad()
def record_statistics(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: DatasetSpec,
    *,
    accelerator=None,
    patch_size: int = 4,
    conv_target: str = "input",
    augment: bool | str = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    patch_mode: str = "partial",
    seed: int = 0,
    teacher_name: str = "",
    dataset_name: str = "",
    split: str = "train",
    total_batches: int | None = None,
) -> TeacherStatistics:
    """One gradient-free pass of ``teacher`` over ``batches``: global Conv statistics (Eq. 9).

    Args:
        teacher: the backbone (``TeacherModel`` or any ``nn.Module``); moved to the accelerator's
            device, put in eval mode for the pass and restored to its previous mode afterwards.
            Its fingerprint is ``gvbsm_hf.utils.model_fingerprint(teacher)`` (= ``TeacherModel.fingerprint``).
        batches: this process's shard of ``(uint8 images (N, C, H, W), labels)`` batches; local
            batch ``k`` is global batch ``k * num_processes + process_index``
            (``gvbsm_hf.data.image_batches`` shards that way).
        spec: normalisation of the images (``spec.normalize``).
        accelerator: ``accelerate.Accelerator`` (device, process index, reduction); None = one
            process on the teacher's device.
        patch_size, conv_target: as in :class:`gvbsm_hf.hooks.StatisticsHooks`.
        augment, crop_scale: the recording augmentation (:func:`gvbsm_hf.augment.recording_augment`):
            ``"authors"`` (each dataset's train transform), ``"per_image_rrc"`` (``True``),
            ``"none"`` (``False``), with a generator seeded from ``(seed, global batch index)``.
            Recorded in the provenance: synthesis refuses statistics of another family.
        patch_mode: ``"partial"`` or ``"resize"`` patches (:func:`gvbsm_hf.hooks.conv_statistics`).
        teacher_name, dataset_name, split: provenance.
        total_batches: number of batches of ALL processes (progress bar only).

    Returns:
        :class:`TeacherStatistics` (float32 CPU), the same on every process.
    """
    if accelerator is not None:
        device = accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
        show = accelerator.is_local_main_process
    else:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        rank, world, show = 0, 1, True
    fingerprint = model_fingerprint(teacher)
    was_training = teacher.training
    teacher.to(device).eval()
    augment = augment_kind(augment)
    from .augment import recording_augment

    local_total = None
    if total_batches is not None:
        local_total = len(range(rank, int(total_batches), world))

    sums: dict[str, dict[str, torch.Tensor]] = {}
    count = 0
    image_size: tuple[int, int] | None = None

    def accumulate(stats: dict[str, dict[str, torch.Tensor]], weight: float) -> None:
        for name, layer_stats in stats.items():
            acc = sums.setdefault(name, {})
            for key in CONV_STATISTICS:
                value = layer_stats[key]
                if key in acc:
                    acc[key].add_(value, alpha=weight)  # float32 -> float64 accumulator
                else:
                    acc[key] = value.to(torch.float64) * weight

    hooks = StatisticsHooks(teacher, bn=False, conv=True, conv_target=conv_target, patch_size=patch_size,
                            patch_mode=patch_mode)
    try:
        if not hooks.conv_layers:
            raise DataValidationError(
                f"{type(teacher).__name__} has no nn.Conv2d layer, so there are no Conv statistics to record. "
                "Use a convolutional teacher or set syn_r_conv: 0 (BN matching only) and skip the record stage."
            )
        progress = tqdm(batches, total=local_total, desc=f"record {teacher_name or 'teacher'}", disable=not show)
        for k, batch in enumerate(progress):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = spec.normalize(images.to(device, non_blocking=True))
            if augment != "none":
                x = recording_augment(x, augment, crop_scale=tuple(crop_scale), generator=_batch_generator(seed, k * world + rank))
            image_size = image_size or (int(x.shape[-2]), int(x.shape[-1]))
            hooks.clear()
            teacher(x)
            n = int(x.shape[0])
            accumulate(hooks.conv_stats, float(n))
            count += n
        if world > 1:
            if not sums:  # an empty shard still has to take part in the reduction with the right shapes
                hooks.clear()
                h = w = spec.image_size
                teacher(torch.zeros(1, spec.channels, h, w, device=device))
                accumulate(hooks.conv_stats, 0.0)
            names = list(sums)
            flat = torch.cat(
                [sums[name][key].reshape(-1) for name in names for key in CONV_STATISTICS]
                + [torch.tensor([float(count)], dtype=torch.float64, device=device)]
            )
            flat = accelerator.reduce(flat, reduction="sum")
            count = int(round(flat[-1].item()))
            offset = 0
            for name in names:
                for key in CONV_STATISTICS:
                    numel = sums[name][key].numel()
                    sums[name][key] = flat[offset : offset + numel].view_as(sums[name][key])
                    offset += numel
            if image_size is None:
                image_size = (spec.image_size, spec.image_size)
    finally:
        hooks.remove()
        teacher.train(was_training)

    if count == 0:
        raise DataValidationError(
            "record_statistics received no images. Check the dataset split and stats_max_samples, and that "
            "the batches iterable is not already exhausted."
        )
    layers = {
        name: {key: (acc[key] / count).to(torch.float32).cpu() for key in CONV_STATISTICS} for name, acc in sums.items()
    }
    # forward order, whatever the process that saw which layer first
    order = [n for n in hooks.layer_names if n in layers]
    layers = {n: layers[n] for n in order}
    h, w = image_size
    provenance: dict[str, str | int | float] = {
        "teacher_fingerprint": fingerprint,
        "teacher_name": teacher_name,
        "dataset": dataset_name or spec.name,
        "split": split,
        "num_images": count,
        "patch_size": int(patch_size),
        "conv_target": conv_target,
        "augment": augment,
        "crop_scale": json.dumps([float(c) for c in crop_scale]) if augment != "none" else "",
        "patch_mode": patch_mode,
        "image_size": h if h == w else f"{h}x{w}",
        "seed": int(seed),
        "gvbsm_hf_version": __version__,
        "variance_definition": VARIANCE_DEFINITION,
    }
    if show:
        logger.info("Recorded Conv statistics of %d layers over %d images (%s).", len(layers), count, teacher_name)
    return TeacherStatistics(layers=layers, provenance=provenance)


# ------------------------------------------------------------------------------------- files
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
    metadata = {key: json.dumps(value) for key, value in stats.provenance.items()}
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
) -> TeacherStatistics:
    """Read a file written by :func:`save_statistics`, checking that it fits its use.

    Raises:
        FileNotFoundError: no such file (run the record stage).
        StatisticsMismatchError: another teacher (fingerprint), patch size, Conv target or layer set;
            the message names the mismatch and the fix (``--redo record``).
    """
    from safetensors import safe_open

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
    for key, value in tensors.items():
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
    return TeacherStatistics(layers=layers, provenance=provenance)


# ------------------------------------------------------------------------------------- tables
def statistics_to_dataset(stats: Sequence[TeacherStatistics]):
    """One row per (teacher, layer, statistic): a ``datasets.Dataset`` for publishing.

    Columns: teacher, teacher_fingerprint, layer, statistic, shape (list[int]), values (flattened
    float32) and provenance (JSON). :func:`statistics_from_dataset` inverts it.
    """
    import datasets

    rows: dict[str, list] = {k: [] for k in ("teacher", "teacher_fingerprint", "layer", "statistic", "shape", "values", "provenance")}
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


def statistics_from_dataset(ds) -> list[TeacherStatistics]:
    """Inverse of :func:`statistics_to_dataset` (teachers in order of first appearance)."""
    import numpy as np

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
