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

Per-class statistics (``per_class=True``, ``stats_per_class``; soft category-aware matching, EDC,
docs/method.md "Beyond G-VBSM") are recorded in the same pass: for every BN layer the per-class
mean and variance of its input, for every Conv layer the four statistics of Eq. 9, each over the
images of one class (:func:`gvbsm_hf.hooks.class_conv_statistics`). A batch holds few images of a
class, so a per-class variance is the variance over ALL images of the class (pooled; per-batch
moments are merged exactly in float64 with Chan's formula, and across processes), not a mean of
per-batch variances. They are saved in the same file under extra keys
(``class_bn/<layer>/{mean,var}``, ``class_conv/<layer>/<stat>``, ``class_counts``); files without
them still load (``TeacherStatistics.per_class`` is False).

Memory grows with classes x channels, not images. Per teacher the file holds
``K x (2 sum_BN C + 2 sum_Conv C + 2 sum_Conv patches)`` float32 values (a mean and a variance per
BN-input channel, per Conv channel and per Conv patch cell); recording keeps as many float64 values
(a running mean and ``M2`` per pair), twice the file size, on the device. ImageNet-1k (K = 1000)
with torchvision's ResNet-18 (measured with :class:`gvbsm_hf.hooks.StatisticsHooks`): 20 BN
layers with 4800 input channels, 20 Conv2d with 3843 input channels, 320 patch cells
(``stats_patch_size`` 16, ``resize``). The four channel statistics (BN mean / var, Conv mean / var):
1000 classes x (2 x 4800 + 2 x 3843) x 4 B = 69.1 MB; with the patch statistics 1000 x 17,926 x
4 B = 71.7 MB per teacher file, 143 MB of float64 accumulators while recording. Synthesis keeps
the float32 targets of every synthesis teacher on the device (four ResNet-18-sized teachers:
about 290 MB).
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

from .. import __version__
from ..data import DatasetSpec
from ..errors import DataValidationError, StatisticsMismatchError
from ..hooks import CONV_STATISTICS, StatisticsHooks
from ..utils import damaged_file_error, model_fingerprint, save_safetensors, seeded_generator

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
    class_bn: dict[str, dict[str, torch.Tensor]] | None = None
    """Per-class BN-input statistics: ``{bn_layer: {"mean": (K, C), "var": (K, C)}}`` (``stats_per_class``)."""
    class_conv: dict[str, dict[str, torch.Tensor]] | None = None
    """Per-class Conv statistics: ``{conv_layer: {channel_mean, channel_var: (K, C), patch_mean, patch_var: (K, Hp, Wp)}}``."""
    class_counts: torch.Tensor | None = None
    """Images of each class in the pass ``(K,)`` (float32); a class with 0 has no per-class statistics."""

    @property
    def layer_names(self) -> list[str]:
        """Conv layer names in forward order."""
        return list(self.layers)

    @property
    def per_class(self) -> bool:
        """Whether per-class statistics were recorded (``stats_per_class``)."""
        return self.class_counts is not None


def augment_kind(augment: bool | str) -> str:
    """``True`` / ``False`` (gvbsm-hf 0.1 files and calls) as ``"per_image_rrc"`` / ``"none"``."""
    if isinstance(augment, bool):
        return "per_image_rrc" if augment else "none"
    return str(augment)


CLASS_BN_STATISTICS = ("mean", "var")
"""Keys of every ``TeacherStatistics.class_bn[layer]`` dict."""
CLASS_COUNTS_KEY = "class_counts"
CLASS_VARIANCE_DEFINITION = "per class: biased variance over all images of the class (pooled), merged exactly"


PAIR_KEYS = {("bn", ""): ("mean", "var"), ("conv", "channel"): ("channel_mean", "channel_var"),
             ("conv", "patch"): ("patch_mean", "patch_var")}
"""(layer kind, pair) -> the (mean, variance) statistic names stored for it."""


class _ClassMoments:
    """Per-class running mean and ``M2 = variance x images`` in float64, merged exactly (Chan et al.).

    Keys are ``(kind, layer, pair)`` (:data:`PAIR_KEYS`); each value is a (mean, variance) pair over the
    same elements, e.g. a Conv layer's channel mean and variance ``(K, C)``. Every element of a pair is
    averaged over the same number of elements per image, so counting images is exact."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # (K,) images per class, float64
        self.mean: dict[tuple[str, str, str], torch.Tensor] = {}
        self.m2: dict[tuple[str, str, str], torch.Tensor] = {}

    @staticmethod
    def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view((-1,) + (1,) * (like.dim() - 1))

    def add(self, stats: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor) -> None:
        """Merge one batch: ``stats[key] = (mean_b, var_b)`` ``(K, ...)`` over that batch's ``counts`` ``(K,)``:
        ``n = n_a + n_b``, ``mean = mean_a + d n_b / n``, ``M2 = M2_a + var_b n_b + d^2 n_a n_b / n``,
        ``d = mean_b - mean_a``."""
        n_b = counts.detach().to(torch.float64)
        n_a = torch.zeros_like(n_b) if self.count is None else self.count
        n = n_a + n_b
        ratio = torch.where(n > 0, n_b / n.clamp_min(1.0), torch.zeros_like(n))
        for key, (mean_b, var_b) in stats.items():
            mean_b, var_b = mean_b.detach().to(torch.float64), var_b.detach().to(torch.float64)
            r, nb, na = self._rows(ratio, mean_b), self._rows(n_b, mean_b), self._rows(n_a, mean_b)
            mean_a = self.mean.get(key, torch.zeros_like(mean_b))
            delta = torch.where(nb > 0, mean_b - mean_a, torch.zeros_like(mean_b))
            self.mean[key] = mean_a + delta * r
            self.m2[key] = self.m2.get(key, torch.zeros_like(mean_b)) + var_b * nb + delta * delta * na * r
        self.count = n

    def reduce(self, accelerator) -> None:
        """Exact merge over processes: the pooled means first, then ``sum_p M2_p + n_p (mean_p - pooled)^2``."""
        keys = list(self.mean)
        n = self.count
        flat = accelerator.reduce(torch.cat([n] + [(self.mean[k] * self._rows(n, self.mean[k])).reshape(-1)
                                                   for k in keys]), reduction="sum")
        total, offset, pooled = flat[: n.numel()], n.numel(), {}
        for k in keys:
            size = self.mean[k].numel()
            pooled[k] = flat[offset:offset + size].view_as(self.mean[k]) / self._rows(total.clamp_min(1.0), self.mean[k])
            offset += size
        parts = [(self.m2[k] + self._rows(n, self.mean[k]) * (self.mean[k] - pooled[k]).square()).reshape(-1)
                 for k in keys]
        m2 = accelerator.reduce(torch.cat(parts), reduction="sum")
        offset = 0
        for k in keys:
            size = self.mean[k].numel()
            self.m2[k] = m2[offset:offset + size].view_as(self.mean[k])
            self.mean[k] = pooled[k]
            offset += size
        self.count = total

    def result(self) -> tuple[dict, dict, torch.Tensor]:
        """``(class_bn, class_conv, class_counts)``, float32 CPU; a class without images gets zeros."""
        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {"bn": {}, "conv": {}}
        for (kind, layer, pair), mean in self.mean.items():
            mean_key, var_key = PAIR_KEYS[(kind, pair)]
            var = self.m2[(kind, layer, pair)] / self._rows(self.count.clamp_min(1.0), mean)
            layer_out = out[kind].setdefault(layer, {})
            layer_out[mean_key] = mean.to(torch.float32).cpu()
            layer_out[var_key] = var.to(torch.float32).cpu()
        return out["bn"], out["conv"], self.count.to(torch.float32).cpu()


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
    per_class: bool = False,
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
        per_class: also record per-class BN-input and Conv statistics (module docstring; the batches
            must carry labels in ``[0, spec.num_classes)``); the global ones are unchanged.

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
    from ..augment import recording_augment

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

    class_moments = _ClassMoments() if per_class else None
    num_classes = int(spec.num_classes)

    def accumulate_class(counts: torch.Tensor | None = None) -> None:
        stats: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (mean, var) in hooks.bn_class_stats.items():
            stats[("bn", name, "")] = (mean, var)
        for name, st in hooks.conv_class_stats.items():
            stats[("conv", name, "channel")] = (st["channel_mean"], st["channel_var"])
            stats[("conv", name, "patch")] = (st["patch_mean"], st["patch_var"])
        class_moments.add(stats, hooks.class_weights(device)[1] if counts is None else counts)

    hooks = StatisticsHooks(teacher, bn=per_class, conv=True, conv_target=conv_target, patch_size=patch_size,
                            patch_mode=patch_mode, bn_global=False)
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
            if class_moments is not None:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise DataValidationError("per_class statistics need (images, labels) batches.")
                labels = torch.as_tensor(batch[1]).long()
                if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                    raise DataValidationError(f"per_class statistics: labels must lie in [0, {num_classes}).")
                hooks.set_class_labels(labels.to(device), num_classes)
            teacher(x)
            n = int(x.shape[0])
            accumulate(hooks.conv_stats, float(n))
            if class_moments is not None:
                accumulate_class()
            count += n
        if world > 1:
            if not sums:  # an empty shard still has to take part in the reduction with the right shapes
                hooks.clear()
                h = w = spec.image_size
                if class_moments is not None:
                    hooks.set_class_labels(torch.zeros(1, dtype=torch.long, device=device), num_classes)
                teacher(torch.zeros(1, spec.channels, h, w, device=device))
                accumulate(hooks.conv_stats, 0.0)
                if class_moments is not None:
                    accumulate_class(torch.zeros(num_classes, device=device))
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
            if class_moments is not None:
                class_moments.reduce(accelerator)
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
    result = TeacherStatistics(layers=layers, provenance=provenance)
    if class_moments is not None:
        class_bn, class_conv, counts = class_moments.result()
        bn_order = [n for n in hooks.layer_names if n in class_bn]
        result.class_bn = {n: class_bn[n] for n in bn_order}
        result.class_conv = {n: class_conv[n] for n in order}
        result.class_counts = counts
        provenance.update(per_class=True, num_classes=num_classes,
                          per_class_variance_definition=CLASS_VARIANCE_DEFINITION)
    if show:
        logger.info("Recorded Conv statistics of %d layers over %d images (%s).", len(layers), count, teacher_name)
    return result


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
    if stats.per_class:  # extra keys; a file without them is a global-only file
        for kind, layers in (("class_bn", stats.class_bn or {}), ("class_conv", stats.class_conv or {})):
            for name, layer_stats in layers.items():
                if "/" in name:
                    raise ValueError(f"Layer name {name!r} contains '/', which the statistics file uses as separator.")
                for key, value in layer_stats.items():
                    tensors[f"{kind}/{name}/{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        tensors[CLASS_COUNTS_KEY] = stats.class_counts.detach().to("cpu", torch.float32).contiguous()
    metadata = {key: json.dumps(value) for key, value in stats.provenance.items()}
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
) -> TeacherStatistics:
    """Read a file written by :func:`save_statistics`, checking that it fits its use.

    Per-class statistics (extra keys) are loaded when present; ``expect_per_class=True`` requires them.

    Raises:
        FileNotFoundError: no such file (run the record stage).
        StatisticsMismatchError: another teacher (fingerprint), patch size, Conv target or layer set,
            or no per-class statistics where they are expected; the message names the mismatch and
            the fix (``--redo record``).
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
    per_class: dict[str, dict[str, dict[str, torch.Tensor]]] = {"class_bn": {}, "class_conv": {}}
    class_counts = tensors.pop(CLASS_COUNTS_KEY, None)
    for key, value in tensors.items():
        parts = key.split("/")
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
        return TeacherStatistics(layers=layers, provenance=provenance)
    bn_order = json.loads(metadata.get(_RESERVED_PREFIX + "class_bn_layers", "[]"))
    bn_order = [n for n in bn_order if n in per_class["class_bn"]] + sorted(set(per_class["class_bn"]) - set(bn_order))
    return TeacherStatistics(layers=layers, provenance=provenance,
                             class_bn={n: per_class["class_bn"][n] for n in bn_order},
                             class_conv={n: per_class["class_conv"][n] for n in layers}, class_counts=class_counts)


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
