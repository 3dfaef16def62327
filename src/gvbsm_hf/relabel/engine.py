"""Relabel: ensemble soft labels (docs/method.md Eq. 8), on the fly or stored.

* :func:`build_ensemble` makes the :class:`~gvbsm_hf.ensemble.TeacherEnsemble` of the relabel
  options: every teacher runs on the SAME (augmented) batch and the logits are averaged (optionally
  with logit normalisation); the soft label is ``softmax(z~ / tau)``. On the fly, the student's
  trainer calls it on each batch.
* :func:`relabel_stored` precomputes, for every synthetic image, ``V`` augmented views
  (:mod:`gvbsm_hf.relabel.views`: random resized crop + flip, optionally CutMix-ed with a partner)
  and the ensemble logits of each view (FKD-style, docs/method.md "Where the authors' code differs
  from the paper"), as :class:`~gvbsm_hf.relabel.store.StoredSoftLabels`. The student then replays
  exactly those views (:class:`gvbsm_hf.evaluate.trainer.GVBSMTrainer`), so that each soft label
  matches its view. Logits are stored in fp16, optionally only the top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..augment import CropFlipParams
from ..ensemble import TeacherEnsemble
from ..errors import DataValidationError, GVBSMError
from ..progress import progress_bar
from .config import RelabelArguments
from .store import StoredSoftLabels
from .views import ViewSampling, replay_views, sample_views

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

__all__ = ["build_ensemble", "relabel_stored", "stored_view_count"]


def build_ensemble(
    teachers: Sequence[nn.Module], names: Sequence[str], args: RelabelArguments, *, mixed_precision: str = "no"
) -> TeacherEnsemble:
    """The relabel ensemble: the teachers named in ``args.relabel_teachers`` (all when ``None``;
    ``names[i]`` names ``teachers[i]``) with ``args.relabel_logit_norm``."""
    subset = set(args.relabel_teachers or ())
    chosen = [t for t, name in zip(teachers, names) if not subset or name in subset]
    return TeacherEnsemble(chosen, logit_norm=args.relabel_logit_norm, mixed_precision=mixed_precision)


def stored_view_count(args: RelabelArguments, num_train_epochs: float) -> int:
    """``V``: ``relabel_num_views``, or one view per student epoch when it is ``None``."""
    return int(args.relabel_num_views or max(1, math.ceil(float(num_train_epochs))))


def relabel_stored(
    images: torch.Tensor,
    ensemble: TeacherEnsemble,
    args: RelabelArguments,
    sampling: ViewSampling,
    *,
    accelerator: Accelerator | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> StoredSoftLabels:
    """Ensemble logits (Eq. 8) of ``args.relabel_num_views`` augmented views of every image.

    Args:
        images: normalised float ``(N, C, H, W)`` (CPU or device).
        ensemble: the teachers (:func:`build_ensemble`); they run on the same crops (one forward
            each per batch), on ``accelerator.device`` (else where they are).
        args: ``relabel_num_views`` (``V``, required here: :func:`stored_view_count` resolves
            ``None``), ``relabel_seed`` (view ``v`` of image ``i`` is drawn with
            :func:`~gvbsm_hf.relabel.views.sample_image_views` from ``(seed, i)``) and
            ``relabel_topk`` (keep only the ``k`` largest logits per view, see
            :meth:`StoredSoftLabels.dense_logits`).
        sampling: how the views are drawn (:class:`~gvbsm_hf.relabel.views.ViewSampling`: crop size,
            the student's crop scale and CutMix probability, ``clean_view``); under CutMix the
            teachers label the mixed crop.
        batch_size: crops per teacher forward: each batch holds ``max(1, batch_size // V)`` images and
            all their ``V`` views, so memory is bounded by ``batch_size`` crops (at least ``V``), not by
            ``batch_size * V``; results do not depend on it.
        accelerator: shards batches (``batch % num_processes == process_index``) and gathers the
            logits; every process returns the full result.
    """
    num_views, seed, k = args.relabel_num_views, int(args.relabel_seed), args.relabel_topk
    if images.ndim != 4:
        raise DataValidationError(f"images must be (N, C, H, W) normalised floats, got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise DataValidationError("images must be normalised floats: call spec.normalize(uint8_images) first.")
    if num_views is None:
        raise GVBSMError("relabel_num_views=None means one view per student epoch: resolve it first, "
                         "dataclasses.replace(args, relabel_num_views=stored_view_count(args, num_train_epochs)).")
    if num_views < 1:
        raise GVBSMError(f"num_views={num_views}: need at least 1 view per image.")
    if batch_size < 1:
        raise GVBSMError(f"batch_size={batch_size} must be >= 1.")
    n, _, h, w = images.shape
    out_size = sampling.out_size
    device = torch.device(accelerator.device if accelerator is not None else ensemble.device)
    ensemble.to(device)

    # View parameters: cheap and deterministic, computed for every image on every process.
    is_main = accelerator.is_local_main_process if accelerator is not None else True
    boxes, flip, mix_partner, mix_boxes = sample_views(n, num_views, h, w, sampling, seed=seed,
                                                       show_progress=show_progress and is_main)
    mixing = mix_partner is not None

    num_procs = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    per_batch = max(1, batch_size // num_views)  # images per forward: their V views are the crops
    num_batches = math.ceil(n / per_batch)
    my_batches = [b for b in range(num_batches) if b % num_procs == rank]

    k = None if k is None else int(k)
    out_chunks: list[torch.Tensor] = []
    idx_chunks: list[torch.Tensor] = []
    num_classes: int | None = None
    for b in progress_bar(my_batches, desc="relabel", disable=not (show_progress and is_main)):
        lo, hi = b * per_batch, min(n, (b + 1) * per_batch)
        x = images[lo:hi].to(device, non_blocking=True)
        # crops ordered image-major: row j -> image lo + j // V, view j % V
        xr = x.repeat_interleave(num_views, dim=0)
        params = CropFlipParams(boxes=boxes[lo:hi].reshape(-1, 4), flip=flip[lo:hi].reshape(-1))
        if mixing:  # the partner's own view v pasted into view v (what the student replays)
            partner = mix_partner[lo:hi].reshape(-1).long().clamp(min=0)
            view = torch.arange(num_views).repeat(hi - lo)
            views = replay_views(xr, params, out_size, partner_images=images[partner.to(images.device)],
                                 partner_params=CropFlipParams(boxes=boxes[partner, view], flip=flip[partner, view]),
                                 mix_boxes=mix_boxes[lo:hi].reshape(-1, 4))
        else:
            views = replay_views(xr, params, out_size)
        z = ensemble(views).float()
        num_classes = z.shape[-1]
        z = z.reshape(hi - lo, num_views, num_classes)
        if k is not None:
            if not 1 <= k <= num_classes:
                raise GVBSMError(f"topk={k} must be in [1, num_classes={num_classes}].")
            vals, inds = z.topk(k, dim=-1)
            z = torch.cat([vals, inds.float()], dim=-1)  # indices < 2**24: exact in float32
        out_chunks.append(z)
        idx_chunks.append(torch.arange(lo, hi, device=device))

    if accelerator is not None and num_procs > 1:
        # processes without a batch do not know K: agree on it first
        nc = torch.tensor([num_classes if num_classes is not None else -1], device=device)
        num_classes = int(accelerator.gather(nc).max().item())
        num_classes = None if num_classes < 0 else num_classes
    if num_classes is None:
        raise GVBSMError("Cannot tell the number of classes of an empty image set: relabel at least one image.")
    width = (2 * k) if k is not None else num_classes
    local = torch.cat(out_chunks) if out_chunks else torch.empty(0, num_views, width, device=device)
    local_idx = torch.cat(idx_chunks) if idx_chunks else torch.empty(0, dtype=torch.long, device=device)
    if accelerator is not None and num_procs > 1:
        local = accelerator.pad_across_processes(local, dim=0)
        local_idx = accelerator.pad_across_processes(local_idx, dim=0, pad_index=-1)
        local, local_idx = accelerator.gather(local), accelerator.gather(local_idx)
        keep = local_idx >= 0
        local, local_idx = local[keep], local_idx[keep]
    full = torch.empty(n, num_views, width, dtype=torch.float32)
    full[local_idx.cpu()] = local.cpu()

    if k is None:
        kwargs = {"logits": full.to(torch.float16)}
    else:
        idx_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
        kwargs = {"topk_values": full[..., :k].to(torch.float16), "topk_indices": full[..., k:].round().to(idx_dtype)}
    return StoredSoftLabels(
        boxes=boxes,
        flip=flip,
        num_classes=int(num_classes),
        image_size=(h, w),
        out_size=int(out_size),
        seed=seed,
        crop_scale=sampling.crop_scale,
        clean_view=bool(sampling.clean_view),
        logit_norm=bool(ensemble.logit_norm),
        mix_partner=mix_partner,
        mix_boxes=mix_boxes,
        cutmix_prob=sampling.cutmix_prob,
        cutmix_alpha=sampling.cutmix_alpha,
        **kwargs,
    )
