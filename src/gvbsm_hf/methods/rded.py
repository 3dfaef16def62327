"""Real-crop selection, RDED-style (docs/method.md "Beyond G-VBSM"): the ``rded`` method and ``syn_init: rded``.

No pixel is optimised. For every class ``c`` (``k = ipc * f^2`` crops are kept, ``f = syn_rded_factor``):

1. **Source images.** ``class_balanced_indices(labels, n_per_class=n, seed=syn_seed)`` with
   ``n = syn_rded_candidates`` (default ``5 k``): up to ``n`` real train images of each class,
   the same whether the whole split or only those rows are given (``real_per_class``).
2. **Candidates.** With ``g = seeded_generator(syn_seed, "rded", c)``: ``perm = randperm(n_c, g)``
   over the class's ``n_c`` source images, candidate ``i`` is cut from image ``perm[i mod n_c]``
   (distinct images while the class has ``n`` of them), with a square box whose area fraction is
   uniform in ``syn_rded_crop_scale`` (``sample_crop_flip(n, H, W, scale, ratio=(1, 1), flip_prob=0,
   generator=g)``: torchvision ``RandomResizedCrop`` semantics, no flip).
3. **Score.** Every crop is resized to the full image size (``apply_crop_flip``: area-averaged
   when shrinking, bilinear when enlarging) and scored by the cross-entropy of the teacher
   ensemble's logits (the mean of the teachers' logits, Eq. 8 without LN) with class ``c``.
4. **Select** (``syn_rded_selection``). ``lowest_ce`` (RDED): candidates in increasing cross-entropy
   (ties: candidate index), at most one crop per source image first (RDED keeps the best crop of each
   image), then the remaining crops in the same order if the class has fewer than ``k`` images; the
   first ``k`` are kept. ``cluster_lowest_ce`` / ``cluster_centroid`` (coverage, not only typicality):
   the candidates' mean teacher logits ``z̄`` (the soft labels' space) are split into ``k`` clusters by
   k-means (:func:`kmeans`, float64, k-means++ seeded by ``(syn_seed, "rded-kmeans", c)``), and each
   cluster keeps its member of lowest CE, or the member nearest its centre (ties: candidate index);
   clusters left empty are filled with the best remaining candidates by CE. The kept crops are then
   ranked by increasing CE, like ``lowest_ce``'s. ``boundary`` (hard, not typical): among the candidates
   whose ensemble argmax is ``c``, the ``k`` of HIGHEST CE (ties: candidate index), then, if fewer than
   ``k`` are classified ``c``, the misclassified ones of lowest CE; ranked by increasing CE. ``kcenter``
   (coverage in feature space, the core-set rule): each candidate's features are the inputs of every
   teacher's last ``nn.Linear`` (a forward pre-hook on the scoring pass, no per-architecture code), each teacher's divided by
   their mean L2 norm over the class's candidates and concatenated (:func:`combine_features`); among
   the candidates classified ``c``, greedy farthest-point selection from the lowest-CE one (ties:
   candidate index), then, if fewer than ``k`` are classified ``c``, the misclassified ones of lowest CE;
   ranked by increasing CE. ``facility_location`` (coverage on average, the k-medoids objective): the same
   features; among the candidates classified ``c``, greedy maximisation of
   ``sum_i max_{j in S} (d0 - ||phi_i - phi_j||)`` over ALL the class's candidates ``i`` (``d0``: the
   largest candidate-to-pool distance), each pick the largest marginal gain (ties: candidate index), then
   the misclassified fill as for ``kcenter``; ranked by increasing CE.
5. **Stitch.** Image ``t`` (slot ``t``) holds the crops ranked ``t, ipc + t, 2 ipc + t, ...`` in its
   ``f x f`` tiles, row-major, each box resized to its tile; the first ``side mod f`` rows
   (columns) of tiles get one extra pixel (RDED's split). ``f = 1``: the crop at full size, exactly
   the view that was scored.

Differences from RDED's code: the score is the ensemble's (RDED: one teacher) on the crop at full
size (RDED: the tile-size crop zero-padded to full size); the candidate images of a class are
distinct (RDED: ``mipc`` images x ``num_crop`` crops each). Deterministic from ``syn_seed``: a class's
crops do not depend on the job layout, the process count or the other classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import CropFlipParams, apply_crop_flip, sample_crop_flip
from ..data import DatasetSpec, class_balanced_indices
from ..errors import GVBSMError
from ..losses import ensemble_logits
from ..utils import seeded_generator
from ..synthetic_set import SyntheticSet
from .registry import SynthesisConfig, register_init, register_method
from .selection import (
    SCORE_BATCH,
    LastLinearInputs,
    combine_features,
    select_boundary,
    select_clustered,
    select_facility_location,
    select_kcenter,
    select_ranked,
)

FEATURE_SELECTIONS = ("kcenter", "facility_location")
"""``syn_rded_selection`` rules that read the teachers' penultimate features (:class:`LastLinearInputs`)."""



@dataclass
class RDEDConfig(SynthesisConfig):
    """``rded``: the crops of real images the teacher ensemble finds most typical, 2 x 2 stitched (RDED)."""

    syn_rded_factor: int = 2


def crops_per_class(config: SynthesisConfig) -> int:
    """``k = ipc * syn_rded_factor^2``: crops kept per class."""
    return int(config.ipc) * int(config.syn_rded_factor) ** 2


def num_candidates(config: SynthesisConfig) -> int:
    """``syn_rded_candidates``, default ``5 k`` (RDED's 5 crops per kept image); must be at least ``k``."""
    k = crops_per_class(config)
    n = int(config.syn_rded_candidates) if config.syn_rded_candidates is not None else 5 * k
    if n < k:
        raise GVBSMError(f"syn_rded_candidates={n} is below the {k} crops kept per class (ipc {config.ipc} x "
                         f"syn_rded_factor^2 = {config.syn_rded_factor}^2): raise it or lower syn_rded_factor.")
    return n


def tile_sizes(side: int, factor: int) -> list[int]:
    """RDED's split of ``side`` pixels into ``factor`` tiles: the first ``side mod factor`` get one more."""
    s, r = divmod(int(side), int(factor))
    if s < 1:
        raise GVBSMError(f"syn_rded_factor={factor} is larger than the image side {side}: lower it.")
    return [s + 1 if i < r else s for i in range(factor)]


def _source_indices(labels: torch.Tensor, config: SynthesisConfig) -> dict[int, torch.Tensor]:
    """Per class, the rows of its source images (ascending row order)."""
    rows = torch.tensor(class_balanced_indices(labels.tolist(), n_per_class=num_candidates(config),
                                               seed=config.syn_seed), dtype=torch.long)
    lab = labels[rows]
    return {int(c): rows[lab == c] for c in lab.unique().tolist()}


@torch.no_grad()
def score_crops(teachers: Sequence[nn.Module], views: torch.Tensor, label: int,
                return_logits: bool = False):
    """Cross-entropy ``(N,)`` (float32, CPU) of the ensemble logits (mean over ``teachers``) of ``views``
    (normalised, on the teachers' device) with class ``label``, in batches of :data:`SCORE_BATCH`;
    with ``return_logits`` also those logits ``(N, K)`` (float32, CPU)."""
    out, zs = [], []
    for chunk in views.split(SCORE_BATCH):
        logits = ensemble_logits([t(chunk) for t in teachers])
        target = torch.full((chunk.shape[0],), int(label), dtype=torch.long, device=logits.device)
        out.append(F.cross_entropy(logits, target, reduction="none").float().cpu())
        zs.append(logits.float().cpu())
    ce = torch.cat(out) if out else torch.zeros(0)
    if return_logits:
        return ce, (torch.cat(zs) if zs else torch.zeros(0, 0))
    return ce


@torch.no_grad()
def select_class(images: torch.Tensor, rows: torch.Tensor, label: int, teachers: Sequence[nn.Module],
                 spec: DatasetSpec, config: SynthesisConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Steps 2-5 of the module docstring for class ``label`` whose source images are ``images[rows]`` (uint8;
    read in requests of at most :data:`SCORE_BATCH` rows, then once more for the ``k`` kept ones).

    Returns ``images`` ``(ipc, C, H, W)`` (normalised float32, CPU), and per kept crop, best first:
    ``rows`` (source row), ``boxes`` ``(k, 4)`` and ``ce``."""
    k, f = crops_per_class(config), int(config.syn_rded_factor)
    n = num_candidates(config)
    if len(rows) == 0:
        raise GVBSMError(f"rded needs real train images of class {label}, found none.")
    h, w = spec.image_size, spec.image_size
    g = seeded_generator(config.syn_seed, "rded", int(label))
    perm = torch.randperm(len(rows), generator=g)
    source = perm[torch.arange(n) % len(rows)]  # position in `rows` of each candidate's image
    params = sample_crop_flip(n, h, w, scale=tuple(float(s) for s in config.syn_rded_crop_scale), ratio=(1.0, 1.0),
                              flip_prob=0.0, generator=g)
    mode = str(config.syn_rded_selection)
    ce, zs = [], []
    # kcenter / facility_location: the scoring forward also records the features (hooks), no second pass
    with LastLinearInputs(teachers) if mode in FEATURE_SELECTIONS else contextlib.nullcontext() as hooks:
        for start in range(0, n, SCORE_BATCH):
            idx = torch.arange(start, min(start + SCORE_BATCH, n))
            x = spec.normalize(images[rows[source[idx]]].to(device))
            views = apply_crop_flip(x, params.index(idx).to(device), (h, w))
            c, z = score_crops(teachers, views, label, return_logits=True)
            ce.append(c)
            zs.append(z)
    ce_t = torch.cat(ce)
    if mode == "lowest_ce":
        kept = select_ranked(ce_t, source, k)
    elif mode == "boundary":
        kept = select_boundary(ce_t, torch.cat(zs), label, k)
    elif mode == "kcenter":
        kept = select_kcenter(ce_t, torch.cat(zs), combine_features(hooks.features()), label, k)
    elif mode == "facility_location":
        kept = select_facility_location(ce_t, torch.cat(zs), combine_features(hooks.features()), label, k)
    else:
        kept = select_clustered(ce_t, torch.cat(zs), k, mode, seeded_generator(config.syn_seed, "rded-kmeans", int(label)))
    src = spec.normalize(images[rows[source[kept]]].to(device))
    boxes = params.boxes[kept]
    ipc = int(config.ipc)
    out = torch.empty(ipc, spec.channels, h, w, device=device)
    tiles_h, tiles_w = tile_sizes(h, f), tile_sizes(w, f)
    y0 = 0
    for i, th in enumerate(tiles_h):
        x0 = 0
        for j, tw in enumerate(tiles_w):
            part = slice((i * f + j) * ipc, (i * f + j + 1) * ipc)  # ranks (i f + j) ipc + t, t = 0..ipc-1
            p = CropFlipParams(boxes[part], torch.zeros(ipc, dtype=torch.bool))
            out[:, :, y0:y0 + th, x0:x0 + tw] = apply_crop_flip(src[part], p.to(device), (th, tw))
            x0 += tw
        y0 += th
    return {"images": out.cpu(), "rows": rows[source[kept]], "boxes": boxes, "ce": ce_t[kept]}


class _EvalMode:
    """Teachers on ``device`` in eval mode for the scoring, their training flags restored afterwards."""

    def __init__(self, teachers: Sequence[nn.Module], device: torch.device) -> None:
        self.teachers, self.device = list(teachers), device

    def __enter__(self) -> list[nn.Module]:
        self.modes = [t.training for t in self.teachers]
        for t in self.teachers:
            t.to(self.device).eval()
        return self.teachers

    def __exit__(self, *exc) -> None:
        for t, mode in zip(self.teachers, self.modes):
            t.train(mode)


def _teachers_and_device(teachers, config: SynthesisConfig, device) -> tuple[list[nn.Module], torch.device]:
    if not teachers:
        raise GVBSMError("rded scores real crops with the teachers: pass teachers= (recover does), at least one.")
    teachers = list(teachers)[:1] if config.syn_single_teacher else list(teachers)
    if device is None:
        param = next(teachers[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    return teachers, torch.device(device)


def rded_class_images(real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, config: SynthesisConfig,
                      teachers: Sequence[nn.Module], classes: Sequence[int], device=None,
                      cache: Optional[dict] = None) -> dict[int, torch.Tensor]:
    """``{c: (ipc, C, H, W)}`` normalised float32 CPU images of the classes ``classes`` (``cache``: a dict
    reused across calls, keyed by class)."""
    images, labels = real  # images: a uint8 tensor or anything indexed like one (gvbsm_hf.data.DecodedImages)
    labels = torch.as_tensor(labels)
    teachers, device = _teachers_and_device(teachers, config, device)
    cache = {} if cache is None else cache
    missing = [int(c) for c in classes if int(c) not in cache]
    if missing:
        sources = cache.setdefault("_sources", _source_indices(labels, config))
        with _EvalMode(teachers, device) as ts:
            for c in missing:
                rows = sources.get(c, torch.zeros(0, dtype=torch.long))
                cache[c] = select_class(images, rows, c, ts, spec, config, device)["images"]
    return {int(c): cache[int(c)] for c in classes}


@register_init("rded", needs_real=True, uses_teachers=True)
def rded_init_images(job, real, spec: DatasetSpec, config: SynthesisConfig, teachers: Sequence[nn.Module],
                     device=None, cache: Optional[dict] = None) -> torch.Tensor:
    """``syn_init="rded"``: the start images of ``job`` (class-major, slot order), normalised: slot ``s`` of
    class ``c`` is image ``s`` of the rded selection of ``c`` (the same as the ``rded`` method's with
    the same ``syn_rded_*`` fields and seed)."""
    per_class = rded_class_images(real, spec, config, teachers, job.classes, device, cache)
    return torch.cat([per_class[int(c)][list(job.slots)] for c in job.classes])


@register_method("rded", config=RDEDConfig, select=True, real_per_class=num_candidates,
                 description="RDED: real crops with the lowest teacher-ensemble CE, stitched f x f; no optimisation")
def rded_select(real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, config: SynthesisConfig, *,
                teachers: Sequence[nn.Module] | None = None, device=None):
    """The ``rded`` set (module docstring): ``ipc`` images per class, class-major, as a
    :class:`~gvbsm_hf.synthetic_set.SyntheticSet`."""
    classes = list(range(spec.num_classes))
    per_class = rded_class_images(real, spec, config, teachers or [], classes, device)
    ipc = int(config.ipc)
    images = torch.cat([per_class[c] for c in classes])
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)
    slots = torch.arange(ipc).repeat(spec.num_classes)
    meta = {"ipc": ipc, "seed": config.syn_seed, "factor": int(config.syn_rded_factor),
            "candidates": num_candidates(config), "crop_scale": list(config.syn_rded_crop_scale),
            "single_teacher": bool(config.syn_single_teacher), "selection": str(config.syn_rded_selection)}
    return SyntheticSet(images, labels, slots, torch.zeros_like(labels), "rded", meta)
