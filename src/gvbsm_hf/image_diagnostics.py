"""What differs between a synthetic set and real images of the same classes (docs/method.md "Image
diagnostics", Eq. 13-17): per-image brightness and contrast, saturated pixels, high-frequency power,
per-instance activation statistics inside the teachers, and within-class diversity in the teachers'
penultimate feature space.

Pixel measures are taken in the space the images are shipped in: uint8 (divided by 255) or float in
``[0, 1]``; the teachers see ``spec.normalize`` of the same pixels. Activation statistics come from the
package's forward hooks (:class:`~gvbsm_hf.hooks.StatisticsHooks` with one "class" per image, so its
per-class statistics are per-instance ones); features from
:func:`~gvbsm_hf.methods.selection.teacher_features` (the input of each teacher's last ``nn.Linear``).
No code here knows an architecture. :func:`diagnose` returns one flat dict of floats (JSON-ready).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .data import DatasetSpec
from .hooks import StatisticsHooks
from .methods.selection import teacher_features

SATURATION_EPS = 0.5 / 255
"""A pixel is saturated when it lies within this of 0 or 1 (it would round to a uint8 extreme), Eq. 14."""
HIGH_FREQUENCY_CUTOFF = 0.5
"""High frequencies: radius above this fraction of the Nyquist radius (1/2 cycle per pixel), Eq. 15."""
SPREAD_FLOOR = 0.1
"""``κ`` of Eq. 16: a channel's real spread is floored at this fraction of its layer's mean spread."""
BATCH = 64
"""Images per teacher forward of the per-instance statistics (the hooks' per-image weight is BATCH x BATCH)."""

DIAGNOSTIC_ROWS: tuple[tuple[str, str, str | float], ...] = (
    ("mean pixel value (Eq. 13)", "pixel_mean_syn", "pixel_mean_real"),
    ("spread of the per-image mean (Eq. 13)", "pixel_mean_spread_syn", "pixel_mean_spread_real"),
    ("contrast: per-image pixel std (Eq. 13)", "contrast_syn", "contrast_real"),
    ("spread of the contrast (Eq. 13)", "contrast_spread_syn", "contrast_spread_real"),
    ("saturated-pixel fraction (Eq. 14)", "saturated_fraction_syn", "saturated_fraction_real"),
    ("high-frequency power share (Eq. 15)", "high_frequency_share_syn", "high_frequency_share_real"),
    ("per-instance channel means: distance to real (Eq. 16)", "instance_mean_distance", 0.0),
    ("per-instance channel stds: distance to real (Eq. 16)", "instance_std_distance", 0.0),
    ("spread of per-instance channel means, relative to real (Eq. 16)", "instance_mean_spread_ratio", 1.0),
    ("within-class distance in the teachers' features (Eq. 17)", "within_class_distance_syn",
     "within_class_distance_real"),
    ("within-class diversity, relative to real (Eq. 17)", "within_class_diversity", 1.0),
)
"""The card's table: (measure, key of the synthetic value, key of the real value or its fixed reference)."""


# ----------------------------------------------------------------------------------------- pixels


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` shipped pixels as float64 in ``[0, 1]``: uint8 divided by 255, float kept (it must
    lie in ``[0, 1]``: normalised images are an error, not a silent wrong answer)."""
    if images.dim() != 4:
        raise ValueError(f"image diagnostics need (N, C, H, W) images, got shape {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    x = images.double()
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(f"float images must be pixels in [0, 1] (the shipped space), got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]: pass uint8 images or spec.denormalize(x).")
    return x


def pixel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13: per image ``i``, ``(μ_i, σ_i)`` ``(N,)`` float64, the mean and the biased standard deviation
    (contrast) of its ``C·H·W`` pixel values in ``[0, 1]``."""
    x = unit_pixels(images).flatten(1)
    var, mean = torch.var_mean(x, dim=1, correction=0)
    return mean, var.sqrt()


def saturated_fraction(images: torch.Tensor, eps: float = SATURATION_EPS) -> float:
    """Eq. 14: the fraction of all pixel values ``v`` of the set with ``v <= ε`` or ``v >= 1 - ε``
    (uint8: exactly 0 or 255)."""
    x = unit_pixels(images)
    return float(((x <= eps) | (x >= 1.0 - eps)).double().mean()) if x.numel() else 0.0


def high_frequency_share(images: torch.Tensor, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> torch.Tensor:
    """Eq. 15: per image, the share of the spectral power at radius ``r > cutoff · 1/2`` cycle per pixel,
    ``P = mean_c |fft2(x_c - mean(x_c))|^2`` with ``r(u, v) = sqrt(f_u^2 + f_v^2)`` (``torch.fft.fftfreq``
    frequencies); an image without power (constant) has share 0. ``(N,)`` float64."""
    x = unit_pixels(images)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().square().mean(dim=1)  # (N, H, W), averaged over channels
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > cutoff * 0.5
    total = power.sum(dim=(1, 2))  # Parseval: (H W)^2 times the image's pixel variance
    share = (power * high).sum(dim=(1, 2)) / total.clamp_min(1e-300)
    flat = total <= 1e-20 * float(x.shape[2] * x.shape[3]) ** 2
    return torch.where(flat, torch.zeros_like(share), share)


# ------------------------------------------------------------------------------ teacher activations


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def instance_statistics(model: nn.Module, images: torch.Tensor,
                        batch_size: int = BATCH) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eq. 16 (per instance): for every BatchNorm and Conv2d layer ``l`` of ``model`` (the inputs
    :class:`StatisticsHooks` hooks), ``(m, s)`` ``(N, C_l)`` float64: each image's per-channel mean and
    biased standard deviation over space, what an instance-norm layer normalises away. ``images`` are
    normalised (the model's input); ``model`` runs in eval mode (its mode is restored)."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        with StatisticsHooks(model, bn=True, conv=True, bn_global=False) as hooks:
            for chunk in images.split(batch_size):
                n = chunk.shape[0]
                hooks.set_class_labels(torch.arange(n), n)  # one "class" per image: per-instance statistics
                hooks.clear()
                model(chunk.to(device))
                stats = {**{f"bn:{k}": v for k, v in hooks.bn_class_stats.items()},
                         **{f"conv:{k}": (v["channel_mean"], v["channel_var"]) for k, v in hooks.conv_class_stats.items()}}
                for name, (mean, var) in stats.items():
                    out.setdefault(name, []).append((mean.double().cpu(), var.double().clamp_min(0).sqrt().cpu()))
    finally:
        model.train(was_training)
    return {k: (torch.cat([m for m, _ in v]), torch.cat([s for _, s in v])) for k, v in out.items()}


def _standardised_shift(syn: torch.Tensor, real: torch.Tensor) -> float:
    """Eq. 16: ``mean_c |E_syn - E_real| / (S_real,c + κ mean_c S_real)`` over the channels of one layer."""
    s_real = real.std(dim=0, correction=0)
    scale = s_real + SPREAD_FLOOR * s_real.mean() + 1e-12
    return float(((syn.mean(0) - real.mean(0)).abs() / scale).mean())


def _within_class_spread(values: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """``W`` of Eq. 16 per channel: the biased std of ``values`` ``(N, C)`` within each class, pooled (root of
    the mean within-class variance over the classes with 2 or more rows; ``None`` if there is none, e.g.
    IPC 1); the plain std without labels."""
    if labels is None:
        return values.std(dim=0, correction=0)
    parts = [values[labels == c].var(dim=0, correction=0) for c in labels.unique() if int((labels == c).sum()) >= 2]
    return torch.stack(parts).mean(0).sqrt() if parts else None


def instance_statistic_distances(syn: dict[str, tuple[torch.Tensor, torch.Tensor]],
                                 real: dict[str, tuple[torch.Tensor, torch.Tensor]],
                                 syn_labels: torch.Tensor | None = None,
                                 real_labels: torch.Tensor | None = None) -> dict[str, float]:
    """Eq. 16 over the layers both dicts share (:func:`instance_statistics` of one or several teachers):
    ``instance_mean_distance`` / ``instance_std_distance`` (the standardised shift of the per-instance
    channel means / stds, mean over layers; 0 for two samples of one distribution) and
    ``instance_mean_spread_ratio`` (``Σ_c S_syn / Σ_c S_real`` of the per-instance means within each class
    (pooled; the whole set without labels), mean over layers: 1 when the synthetic images of a class vary
    as much as real ones, 0 when they all look alike to the layer; left out when a side has no class with
    2 images)."""
    layers = [k for k in syn if k in real]
    if not layers:
        raise ValueError("instance_statistic_distances: the two sets share no hooked layer.")
    d_mean = [_standardised_shift(syn[k][0], real[k][0]) for k in layers]
    d_std = [_standardised_shift(syn[k][1], real[k][1]) for k in layers]
    n = float(len(layers))
    out = {"instance_mean_distance": sum(d_mean) / n, "instance_std_distance": sum(d_std) / n, "instance_layers": n}
    spreads = [(_within_class_spread(syn[k][0], syn_labels), _within_class_spread(real[k][0], real_labels))
               for k in layers]
    if all(s is not None and r is not None for s, r in spreads):  # left out without a within-class spread
        out["instance_mean_spread_ratio"] = sum(float(s.sum() / r.sum().clamp_min(1e-12)) for s, r in spreads) / n
    return out


# ------------------------------------------------------------------------------------- diversity


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance over the pairs ``i < j`` of the rows of ``x`` ``(N, D)`` (float64); needs N >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 rows, got {x.shape[0]}.")
    return float(torch.pdist(x.double().flatten(1)).mean())


def _class_spreads(features: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                   real_labels: torch.Tensor) -> list[tuple[int, float, float]]:
    """Eq. 17: ``(c, D_c(syn), D_c(real))`` for every class ``c`` with 2 or more images on both sides."""
    out = []
    for c in sorted(set(labels.tolist()) & set(real_labels.tolist())):
        syn, real = features[labels == c], real_features[real_labels == c]
        if syn.shape[0] >= 2 and real.shape[0] >= 2:
            out.append((c, mean_pairwise_distance(syn), mean_pairwise_distance(real)))
    if not out:
        raise ValueError("within_class_diversity: no class has 2 or more images on both sides (ipc >= 2 needed).")
    return out


def within_class_diversity(features: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                           real_labels: torch.Tensor) -> float:
    """Eq. 17: mean over classes of ``D_c(syn) / D_c(real)``, ``D_c`` the mean pairwise distance of the class's
    features (float64). Classes with fewer than 2 images on either side are left out (an error if that
    leaves none). A random real subset scores about 1; one image repeated per class scores 0."""
    ratios = []
    for c, syn, real in _class_spreads(features, labels, real_features, real_labels):
        if real <= 0.0:
            raise ValueError(f"class {c}: the real images have zero spread in feature space; cannot normalise.")
        ratios.append(syn / real)
    return float(sum(ratios) / len(ratios))


@torch.no_grad()
def teacher_feature_space(teachers: Sequence[nn.Module], images: torch.Tensor,
                          real_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 17's space: ``(features of images, features of real_images)`` (both normalised inputs) in the
    teachers' joint penultimate space: each teacher's features (the input of its last ``nn.Linear``,
    :func:`teacher_features`) divided by the mean L2 norm of its real features (so every teacher weighs the
    same), concatenated; the scale comes from the real images only, so both sets share one space."""
    devices = [_device(t) for t in teachers]
    syn_f = [teacher_features([t], images.to(d))[0] for t, d in zip(teachers, devices)]
    real_f = [teacher_features([t], real_images.to(d))[0] for t, d in zip(teachers, devices)]
    scales = [r.norm(dim=1).mean().clamp_min(1e-12) for r in real_f]
    return (torch.cat([f / s for f, s in zip(syn_f, scales)], 1), torch.cat([f / s for f, s in zip(real_f, scales)], 1))


# ---------------------------------------------------------------------------------------- entry


def _spread(values: torch.Tensor) -> float:
    return float(values.std(correction=0)) if values.numel() else 0.0


def pixel_diagnostics(images: torch.Tensor, side: str) -> dict[str, float]:
    """Eq. 13-15 of one set: ``pixel_mean``, ``pixel_mean_spread``, ``contrast``, ``contrast_spread``,
    ``saturated_fraction``, ``high_frequency_share`` (spreads: biased std over images), each ``_<side>``."""
    mean, contrast = pixel_statistics(images)
    out = {"pixel_mean": float(mean.mean()), "pixel_mean_spread": _spread(mean), "contrast": float(contrast.mean()),
           "contrast_spread": _spread(contrast), "saturated_fraction": saturated_fraction(images),
           "high_frequency_share": float(high_frequency_share(images).mean())}
    return {f"{k}_{side}": v for k, v in out.items()}


def diagnose(synthetic_images: torch.Tensor, synthetic_labels: torch.Tensor, real_images: torch.Tensor,
             real_labels: torch.Tensor, teachers: Sequence[nn.Module], spec: DatasetSpec) -> dict[str, float]:
    """Every image diagnostic (docs/method.md Eq. 13-17) of a synthetic set against real images of the same
    classes, as one flat dict of floats: :func:`pixel_diagnostics` of both sets (``_syn`` / ``_real``),
    :func:`instance_statistic_distances` over every hooked layer of every teacher, and
    ``within_class_distance_syn`` / ``_real`` (mean over classes of ``D_c``) and ``within_class_diversity``
    (Eq. 17; left out when no class has 2 images on both sides), plus ``num_images_syn`` / ``_real`` and
    ``instance_layers`` (hooked layers over all teachers). Images are shipped pixels (uint8, or float in
    ``[0, 1]``); the teachers see ``spec.normalize`` of them. Real images of classes the synthetic set lacks
    are left out, and so is a measure that is not finite (the dict stays JSON-ready)."""
    syn_labels = torch.as_tensor(synthetic_labels).long().cpu()
    real_labels = torch.as_tensor(real_labels).long().cpu()
    keep = torch.isin(real_labels, syn_labels.unique())
    real_images, real_labels = real_images[keep], real_labels[keep]
    if len(synthetic_images) == 0 or len(real_images) == 0:
        raise ValueError(f"diagnose needs images on both sides, got {len(synthetic_images)} synthetic and "
                         f"{len(real_images)} real images of the same classes.")
    out: dict[str, float] = {"num_images_syn": float(len(synthetic_images)), "num_images_real": float(len(real_images))}
    out.update(pixel_diagnostics(synthetic_images, "syn"))
    out.update(pixel_diagnostics(real_images, "real"))
    syn_x = spec.normalize(unit_pixels(synthetic_images).float())
    real_x = spec.normalize(unit_pixels(real_images).float())
    syn_stats: dict[str, Any] = {}
    real_stats: dict[str, Any] = {}
    for i, t in enumerate(teachers):
        syn_stats.update({f"{i}:{k}": v for k, v in instance_statistics(t, syn_x).items()})
        real_stats.update({f"{i}:{k}": v for k, v in instance_statistics(t, real_x).items()})
    if syn_stats:
        out.update(instance_statistic_distances(syn_stats, real_stats, syn_labels, real_labels))
    if teachers:
        modes = [t.training for t in teachers]
        try:
            for t in teachers:
                t.eval()
            syn_f, real_f = teacher_feature_space(teachers, syn_x, real_x)
        finally:
            for t, mode in zip(teachers, modes):
                t.train(mode)
        try:
            spreads = _class_spreads(syn_f, syn_labels, real_f, real_labels)
        except ValueError:  # IPC 1 or a single real image per class: no within-class spread to measure
            spreads = []
        if spreads:
            out["within_class_distance_syn"] = sum(s for _, s, _ in spreads) / len(spreads)
            out["within_class_distance_real"] = sum(r for _, _, r in spreads) / len(spreads)
            out["within_class_diversity"] = within_class_diversity(syn_f, syn_labels, real_f, real_labels)
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def diagnostic_rows(diagnostics: dict[str, Any], digits: int = 3) -> list[dict[str, str]]:
    """The card's table (:data:`DIAGNOSTIC_ROWS`): ``{"measure", "synthetic", "real"}`` strings for every
    measure the dict holds; where the measure is already relative to real images, the real column is what
    real images score by definition, marked "(reference)"."""
    rows = []
    for label, syn_key, real in DIAGNOSTIC_ROWS:
        if syn_key not in diagnostics:
            continue
        if isinstance(real, str):
            text = "–" if diagnostics.get(real) is None else f"{float(diagnostics[real]):.{digits}f}"
        else:
            text = f"{float(real):g} (reference)"
        rows.append({"measure": label, "synthetic": f"{float(diagnostics[syn_key]):.{digits}f}", "real": text})
    return rows
