"""Record stage (GSM, docs/method.md Eq. 9): global Conv statistics of a teacher over real data.

One gradient-free pass over the (optionally augmented) real train split. For every Conv2d layer
the four statistics of :mod:`gvbsm_hf.hooks` are computed per batch and averaged over batches,
weighted by batch size::

    stat_global = sum_b n_b * stat_b / sum_b n_b                                     (Eq. 9)

(the variance is the mean of per-batch biased variances, as in the authors' code). Sums are
float64 on the device, so memory does not depend on the dataset size. With N processes batch
``i`` goes to process ``i % N``, its crop is seeded from ``(seed, i)`` and the sums are reduced at
the end: 1 and N processes record the same statistics.

Per-class statistics (``stats_per_class``, docs/method.md "Beyond G-VBSM", which gives their size)
are recorded in the same pass: the BN-input mean / variance and the four Conv statistics of each
class over ALL its images (pooled), merged exactly in float64 (Chan et al.) across batches and
processes. Per-instance statistics (``stats_instance``, docs/method.md Eq. 19) likewise: for every BN
layer, ``V_{l,c}`` = the biased variance over ALL recorded images of their spatial channel means ``m_{i,c}``
of the BN input, i.e. ``E[m^2] - E[m]^2`` pooled over every image (not a mean of per-batch variances),
merged exactly in float64 across batches and processes the same way. Files:
:mod:`gvbsm_hf.record.statistics_file`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import torch
from torch import nn

from .. import __version__
from ..augment_families import recording_augment
from ..data import DatasetSpec
from ..errors import DataValidationError
from ..hooks import StatisticsHooks
from ..moments import CONV_STATISTICS
from ..fingerprint import model_fingerprint
from ..progress import progress_bar
from ..utils import seeded_generator
from .config import StatisticsArguments
from .statistics_file import TeacherStatistics, augment_kind

logger = logging.getLogger(__name__)

VARIANCE_DEFINITION = "mean of per-batch biased variances, weighted by batch size"
CLASS_VARIANCE_DEFINITION = "per class: biased variance over all images of the class (pooled), merged exactly"
INSTANCE_VARIANCE_DEFINITION = ("per BN layer and channel: biased variance over all recorded images of the per-image "
                                "spatial means of the BN input (pooled), merged exactly")

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

    def reduce(self, accelerator: Any) -> None:
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


class _ConvSums:
    """The numerator of Eq. 9: ``sum_b n_b * stat_b`` per Conv layer and statistic (float64), and ``sum_b n_b``."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.count = 0

    def add(self, stats: dict[str, dict[str, torch.Tensor]], weight: float) -> None:
        for name, layer_stats in stats.items():
            acc = self.sums.setdefault(name, {})
            for key in CONV_STATISTICS:
                value = layer_stats[key]
                if key in acc:
                    acc[key].add_(value, alpha=weight)  # float32 -> float64 accumulator
                else:
                    acc[key] = value.to(torch.float64) * weight

    def reduce(self, accelerator: Any, device: torch.device) -> None:
        """Sum over processes (one flat ``accelerator.reduce``)."""
        names = list(self.sums)
        flat = torch.cat(
            [self.sums[name][key].reshape(-1) for name in names for key in CONV_STATISTICS]
            + [torch.tensor([float(self.count)], dtype=torch.float64, device=device)]
        )
        flat = accelerator.reduce(flat, reduction="sum")
        self.count = int(round(flat[-1].item()))
        offset = 0
        for name in names:
            for key in CONV_STATISTICS:
                numel = self.sums[name][key].numel()
                self.sums[name][key] = flat[offset : offset + numel].view_as(self.sums[name][key])
                offset += numel

    def means(self, order: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Eq. 9, float32 CPU, layers in ``order`` (forward order)."""
        layers = {name: {key: (acc[key] / self.count).to(torch.float32).cpu() for key in CONV_STATISTICS}
                  for name, acc in self.sums.items()}
        return {n: layers[n] for n in order if n in layers}


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """CPU generator of global batch ``batch_index``: the same on every process layout."""
    return seeded_generator(seed, "record", batch_index)


def _class_stats(hooks: StatisticsHooks) -> dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]]:
    """This batch's per-class (mean, variance) pairs, keyed as in :data:`PAIR_KEYS`."""
    stats: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (mean, var) in hooks.bn_class_stats.items():
        stats[("bn", name, "")] = (mean, var)
    for name, st in hooks.conv_class_stats.items():
        stats[("conv", name, "channel")] = (st["channel_mean"], st["channel_var"])
        stats[("conv", name, "patch")] = (st["patch_mean"], st["patch_var"])
    return stats


def _instance_stats(hooks: StatisticsHooks) -> dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]]:
    """This batch's per-instance (mean, variance) of the per-image channel means, one 'class' row ``(1, C)``."""
    return {("bn", name, ""): (hooks.bn_instance_means[name][None], var[None])
            for name, var in hooks.bn_instance_stats.items()}


def _set_class_labels(hooks: StatisticsHooks, batch: Any, num_classes: int, device: torch.device) -> None:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataValidationError("per_class statistics need (images, labels) batches.")
    labels = torch.as_tensor(batch[1]).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataValidationError(f"per_class statistics: labels must lie in [0, {num_classes}).")
    hooks.set_class_labels(labels.to(device), num_classes)


@torch.no_grad()
def record_statistics(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: DatasetSpec,
    args: StatisticsArguments | None = None,
    *,
    accelerator: Any = None,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    teacher_name: str = "",
    total_batches: int | None = None,
) -> TeacherStatistics:
    """One gradient-free pass of ``teacher`` over ``batches``: global Conv statistics (Eq. 9).

    Args:
        teacher: the backbone (``TeacherModel`` or any ``nn.Module``); eval mode during the pass,
            its previous mode restored after; fingerprint ``gvbsm_hf.fingerprint.model_fingerprint``.
        batches: this process's shard of ``(uint8 images (N, C, H, W), labels)`` batches: local
            batch ``k`` is global batch ``k * num_processes + process_index`` (as
            ``gvbsm_hf.data.image_batches`` shards).
        spec: the images' normalisation (``spec.normalize``), classes and name (provenance).
        args: ``stats_patch_size``, ``stats_conv_target``, ``stats_patch_mode`` (unset: ``"partial"``),
            ``stats_augment`` (unset: ``"none"``; :func:`gvbsm_hf.augment_families.recording_augment`) and
            ``stats_per_class``, ``stats_instance``; ``None``: the defaults. Batch size and sample cap belong to the caller.
        accelerator: ``accelerate.Accelerator`` (device, process index, reduction); None = one
            process on the teacher's device.
        seed, crop_scale: the recording augmentation's generator seed (with the global batch
            index) and crop scale (``training.seed``, ``synthesis.syn_crop_scale`` in a recipe).
        teacher_name: provenance and progress bar.
        total_batches: number of batches of ALL processes (progress bar only).

    Returns:
        :class:`TeacherStatistics` (float32 CPU), the same on every process.
    """
    args = args if args is not None else StatisticsArguments()
    patch_size, conv_target, per_class = args.stats_patch_size, args.stats_conv_target, args.stats_per_class
    patch_mode = args.stats_patch_mode or "partial"
    augment = augment_kind(args.stats_augment or "none")
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
    local_total = len(range(rank, int(total_batches), world)) if total_batches is not None else None
    num_classes = int(spec.num_classes)
    sums = _ConvSums()
    class_moments = _ClassMoments() if per_class else None
    per_instance = bool(getattr(args, "stats_instance", False))
    instance_moments = _ClassMoments() if per_instance else None  # one row: every image in one 'class'
    image_size: tuple[int, int] | None = None

    hooks = StatisticsHooks(teacher, bn=per_class or per_instance, conv=True, conv_target=conv_target,
                            patch_size=patch_size, patch_mode=patch_mode, bn_global=False, bn_instance=per_instance)
    try:
        if not hooks.conv_layers:
            raise DataValidationError(
                f"{type(teacher).__name__} has no nn.Conv2d layer, so there are no Conv statistics to record. "
                "Use a convolutional teacher or set syn_r_conv: 0 (BN matching only) and skip the record stage."
            )
        progress = progress_bar(batches, total=local_total, desc=f"record {teacher_name or 'teacher'}",
                                disable=not show)
        for k, batch in enumerate(progress):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = spec.normalize(images.to(device, non_blocking=True))
            if augment != "none":
                x = recording_augment(x, augment, crop_scale=tuple(crop_scale),
                                      generator=_batch_generator(seed, k * world + rank))
            image_size = image_size or (int(x.shape[-2]), int(x.shape[-1]))
            hooks.clear()
            if class_moments is not None:
                _set_class_labels(hooks, batch, num_classes, device)
            teacher(x)
            n = int(x.shape[0])
            sums.add(hooks.conv_stats, float(n))
            if class_moments is not None:
                class_moments.add(_class_stats(hooks), hooks.class_weights(device)[1])
            if instance_moments is not None:
                instance_moments.add(_instance_stats(hooks), torch.full((1,), float(n), device=device))
            sums.count += n
        if world > 1:
            if not sums.sums:  # an empty shard still has to take part in the reduction with the right shapes
                hooks.clear()
                if class_moments is not None:
                    hooks.set_class_labels(torch.zeros(1, dtype=torch.long, device=device), num_classes)
                teacher(torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=device))
                sums.add(hooks.conv_stats, 0.0)
                if class_moments is not None:
                    class_moments.add(_class_stats(hooks), torch.zeros(num_classes, device=device))
                if instance_moments is not None:
                    instance_moments.add(_instance_stats(hooks), torch.zeros(1, device=device))
            sums.reduce(accelerator, device)
            if image_size is None:
                image_size = (spec.image_size, spec.image_size)
            if class_moments is not None:
                class_moments.reduce(accelerator)
            if instance_moments is not None:
                instance_moments.reduce(accelerator)
    finally:
        hooks.remove()
        teacher.train(was_training)

    if sums.count == 0:
        raise DataValidationError(
            "record_statistics received no images. Check the dataset split and stats_max_samples, and that "
            "the batches iterable is not already exhausted."
        )
    order = list(hooks.layer_names)  # forward order, whatever the process that saw which layer first
    layers = sums.means(order)
    h, w = image_size
    provenance: dict[str, str | int | float] = {
        "teacher_fingerprint": fingerprint,
        "teacher_name": teacher_name,
        "dataset": spec.name,
        "split": "train",
        "num_images": sums.count,
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
        result.class_bn = {n: class_bn[n] for n in order if n in class_bn}
        result.class_conv = {n: class_conv[n] for n in layers}
        result.class_counts = counts
        provenance.update(per_class=True, num_classes=num_classes,
                          per_class_variance_definition=CLASS_VARIANCE_DEFINITION)
    if instance_moments is not None:
        instance_bn = instance_moments.result()[0]
        result.instance_bn = {n: instance_bn[n]["var"][0] for n in order if n in instance_bn}
        provenance.update(per_instance=True, instance_variance_definition=INSTANCE_VARIANCE_DEFINITION)
    if show:
        logger.info("Recorded Conv statistics of %d layers over %d images (%s).", len(layers), sums.count, teacher_name)
    return result
