"""BatchNorm and Conv statistics of a feature map (docs/method.md Eq. 1, 6, 9, 10), per batch and per
class, computed in one pass with a custom backward; :mod:`gvbsm_hf.hooks` applies them inside
forward hooks. See :mod:`gvbsm_hf.hooks` for the definitions and the numerics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_STATISTICS = ("channel_mean", "channel_var", "patch_mean", "patch_var")
"""Keys of every ``conv_stats[layer]`` dict (and of :class:`gvbsm_hf.record.engine.TeacherStatistics`)."""


class _ShiftedBatchMoments(torch.autograd.Function):
    """``(mean_n(x - s), mean_n((x - s)^2))`` over dim 0, float32, with a one-pass fused backward.

    Forward squares in place (one temporary); backward is ``dx = (g1 + 2 g2 (x - s)) / N`` in two
    elementwise passes. Only ``x`` itself is saved (no ``x - s`` copy is kept for backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = torch.sub(x, shift)  # float32 by type promotion (bf16/fp16 input is upcast in this pass)
        s1 = xc.mean(dim=0)
        s2 = xc.square_().mean(dim=0)
        ctx.save_for_backward(x, shift)
        return s1, s2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor):
        x, shift = ctx.saved_tensors
        n = x.shape[0]
        grad = torch.addcmul(g1 / n, torch.sub(x, shift), g2, value=2.0 / n)
        return grad.to(x.dtype), None


def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch averages of ``x - s`` and ``(x - s)^2``, shaped ``(C, H, W)``, and the shift ``s`` ``(C, 1, 1)``.

    ``x`` is ``(N, C, H, W)`` in any dtype / memory format; the result is float32. ``s`` is the detached
    per-channel mean of the first image (a cheap, well-placed shift; the statistics do not depend on it).
    """
    channels_last = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        xv = x.permute(0, 2, 3, 1)  # contiguous (N, H, W, C): reductions over N stream through memory
        shift = xv[:1].detach().float().mean(dim=(1, 2), keepdim=True)  # (1, 1, 1, C)
    else:
        xv = x if x.is_contiguous() else x.contiguous()
        shift = xv[:1].detach().float().mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    if xv.requires_grad and torch.is_grad_enabled():
        s1, s2 = _ShiftedBatchMoments.apply(xv, shift)
    else:  # no graph: skip the autograd.Function machinery
        xc = torch.sub(xv, shift)
        s1 = xc.mean(dim=0)
        s2 = xc.square_().mean(dim=0)
    shift = shift[0]
    if channels_last:
        s1, s2, shift = s1.permute(2, 0, 1), s2.permute(2, 0, 1), shift.permute(2, 0, 1)
    return s1, s2, shift


def _patch_average(t: torch.Tensor, p: int) -> torch.Tensor:
    """Average of ``t`` ``(K, H, W)`` over each ``p x p`` patch -> ``(K, ceil(H/p), ceil(W/p))``.

    A partial last patch is averaged over its real pixels only. Not ``avg_pool2d(ceil_mode=True)``:
    Inductor's backward of that divides overhanging windows by ``p*p`` (pytorch/pytorch#198119),
    so the map is zero-padded and divided by the pooled fraction of real pixels instead.
    """
    h, w = t.shape[-2:]
    ph, pw = (-h) % p, (-w) % p
    if ph == 0 and pw == 0:
        return F.avg_pool2d(t, p, p)
    padded = F.pad(torch.cat([t, t.new_ones((1, h, w))]), (0, pw, 0, ph))
    pooled = F.avg_pool2d(padded, p, p)
    return pooled[:-1] / pooled[-1:]


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` over every dimension but 1 (BN input, Eq. 1).

    Accepts ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float32 result.
    """
    if x.dim() != 4:
        x = x.reshape(x.shape[0], x.shape[1], 1, -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        s1, s2, shift = _batch_moments(x)
        a = s1.mean(dim=(1, 2))
        mean = a + shift.view(-1)
        var = (s2.mean(dim=(1, 2)) - a * a).clamp_min(0.0)
    return mean, var


PATCH_MODES = ("resize", "partial")


def _check_feature_map(x: torch.Tensor, patch_mode: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"Conv statistics need a 4-D (N, C, H, W) feature map, got shape {tuple(x.shape)}.")
    if patch_mode not in PATCH_MODES:
        raise ValueError(f"patch_mode must be one of {PATCH_MODES}, got {patch_mode!r} (stats_patch_mode).")


def conv_statistics(x: torch.Tensor, patch_size: int, patch_mode: str = "partial") -> dict[str, torch.Tensor]:
    """Channel and patch mean / biased variance of a Conv feature map ``(N, C, H, W)`` (Eq. 9).

    Returns ``channel_mean``, ``channel_var`` (``(C,)``) and ``patch_mean``, ``patch_var``
    (``(ceil(H/p), ceil(W/p))``), float32, differentiable w.r.t. ``x``. On a map whose side is not
    a multiple of ``p``: ``patch_mode="partial"`` averages a partial edge patch over its real pixels;
    ``"resize"`` (authors' code) first resizes the map bilinearly (``align_corners=False``) up to
    the next multiple of ``p`` for the PATCH statistics (channel statistics use the map as is).
    """
    _check_feature_map(x, patch_mode)
    p = int(patch_size)
    h, w = x.shape[-2:]
    if patch_mode == "resize" and (h % p or w % p):
        with torch.autocast(device_type=x.device.type, enabled=False):
            channel = conv_statistics(x, p, "partial")
            size = (-(-h // p) * p, -(-w // p) * p)
            resized = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
            patch = conv_statistics(resized, p, "partial")
        return {"channel_mean": channel["channel_mean"], "channel_var": channel["channel_var"],
                "patch_mean": patch["patch_mean"], "patch_var": patch["patch_var"]}
    with torch.autocast(device_type=x.device.type, enabled=False):
        s1, s2, shift = _batch_moments(x)  # (C, H, W), (C, H, W), (C, 1, 1)
        # channel statistics, shifted per channel
        a = s1.mean(dim=(1, 2))
        channel_mean = a + shift.view(-1)
        channel_var = (s2.mean(dim=(1, 2)) - a * a).clamp_min(0.0)
        # patch statistics about one scalar shift t shared by all channels
        t = shift.mean()
        d = shift - t  # (C, 1, 1)
        m_t = (s1 + d).mean(dim=0, keepdim=True)  # E_c[x - t] per pixel, (1, H, W)
        q_t = (s2 + d * (2.0 * s1 + d)).mean(dim=0, keepdim=True)  # E_c[(x - t)^2] per pixel
        pm_t, pq_t = _patch_average(torch.cat([m_t, q_t]), p).unbind(0)
        patch_mean = pm_t + t
        patch_var = (pq_t - pm_t * pm_t).clamp_min(0.0)
    return {
        "channel_mean": channel_mean,
        "channel_var": channel_var,
        "patch_mean": patch_mean,
        "patch_var": patch_var,
    }


def class_weights(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, counts)``: ``W[n, k] = [labels_n = k] / max(counts_k, 1)`` ``(N, K)`` float32 and the images per
    class ``counts`` ``(K,)``; ``W.T @ r`` is the per-class mean of per-image rows ``r``."""
    onehot = F.one_hot(labels.long(), int(num_classes)).float()
    counts = onehot.sum(0)
    return onehot / counts.clamp_min(1.0), counts


def _per_image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x - s`` and its square (float32), and the per-image rows ``mean_hw(x - s)``, ``mean_hw((x - s)^2)``
    ``(N, C)``, with ``s`` the detached per-channel mean of the first image ``(1, C, 1, 1)`` (returned last)."""
    shift = x[:1].detach().float().mean(dim=(2, 3), keepdim=True)
    xs = x.float() - shift
    sq = xs * xs
    return xs, sq, torch.stack([xs.mean(dim=(2, 3)), sq.mean(dim=(2, 3))]), shift


def class_channel_statistics(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class channel mean and biased variance ``(K, C)`` of ``x`` ``(N, C, ...)`` over the images of each
    class and every spatial position (Eq. 1 restricted to one class); ``weights`` from :func:`class_weights`.
    A class without images gets mean = the shift and variance 0 (its count is 0). float32, differentiable."""
    if x.dim() != 4:
        x = x.reshape(x.shape[0], x.shape[1], 1, -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, _, rows, shift = _per_image_moments(x)
        m1, m2 = (weights.t() @ rows[0]), (weights.t() @ rows[1])
        mean = m1 + shift.view(1, -1)
        var = (m2 - m1 * m1).clamp_min(0.0)
    return mean, var


def class_conv_statistics(x: torch.Tensor, weights: torch.Tensor, patch_size: int,
                          patch_mode: str = "partial") -> dict[str, torch.Tensor]:
    """The four statistics of :func:`conv_statistics` per class: ``channel_mean``/``channel_var`` ``(K, C)``
    and ``patch_mean``/``patch_var`` ``(K, ceil(H/p), ceil(W/p))`` over the images of each class (patch
    statistics over those images, all channels and the pixels of a patch; ``"resize"`` resizes the map
    first for the patch statistics, as :func:`conv_statistics`). float32, differentiable w.r.t. ``x``."""
    _check_feature_map(x, patch_mode)
    p = int(patch_size)
    h, w = x.shape[-2:]
    wt = weights.t()
    with torch.autocast(device_type=x.device.type, enabled=False):
        xs, sq, rows, shift = _per_image_moments(x)
        m1, m2 = wt @ rows[0], wt @ rows[1]
        out = {"channel_mean": m1 + shift.view(1, -1), "channel_var": (m2 - m1 * m1).clamp_min(0.0)}
        if patch_mode == "resize" and (h % p or w % p):
            size = (-(-h // p) * p, -(-w // p) * p)
            xr = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
            xs, sq = xr - shift, (xr - shift).square()
        # about one scalar t = mean_c s_c, per pixel of each image: E_c[x - t], E_c[(x - t)^2]
        t = shift.mean()
        d = (shift - t).view(-1)
        m_t = xs.mean(dim=1) + d.mean()
        q_t = sq.mean(dim=1) + torch.einsum("nchw,c->nhw", xs, 2.0 * d) / d.numel() + (d * d).mean()
        n = x.shape[0]
        pooled = _patch_average(torch.cat([m_t, q_t]), p)  # (2N, Hp, Wp)
        pm = torch.einsum("nk,nij->kij", weights, pooled[:n])
        pq = torch.einsum("nk,nij->kij", weights, pooled[n:])
        out["patch_mean"] = pm + t
        out["patch_var"] = (pq - pm * pm).clamp_min(0.0)
    return out
