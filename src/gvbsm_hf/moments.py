"""BatchNorm and Conv statistics of a feature map (docs/method.md Eq. 1, 6, 9, 10), per batch and per
class, computed in one pass with a custom backward; :mod:`gvbsm_hf.hooks` applies them inside
forward hooks. See :mod:`gvbsm_hf.hooks` for the definitions and the numerics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_STATISTICS = ("channel_mean", "channel_var", "patch_mean", "patch_var")
"""Keys of every ``conv_stats[layer]`` dict (and of :class:`gvbsm_hf.record.engine.TeacherStatistics`)."""


_CONSTANTS: dict[tuple[float, torch.device, torch.dtype], torch.Tensor] = {}


def _constant(value: float, like: torch.Tensor | tuple[torch.device, torch.dtype]) -> torch.Tensor:
    """A 0-dim tensor ``value`` on ``like``'s device and dtype, made once: multiplying by it is one kernel, where
    a Python float is first wrapped into a tensor and converted (several dispatches per use)."""
    device, dtype = like if isinstance(like, tuple) else (like.device, like.dtype)
    key = (float(value), device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(float(value), device=device, dtype=dtype)
    return _CONSTANTS[key]


def _compute_type(x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the statistics of ``x`` are computed (float64 stays, the rest is float32)."""
    return x.device, (torch.float64 if x.dtype == torch.float64 else torch.float32)


def _channel_var_mean(x: torch.Tensor, inv_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of ``x (N, C, H, W)`` per channel (``inv_m = 1 / (N H W)``, a 0-dim constant): one
    ``var_mean`` (one pass) on accelerators; on the CPU the sum, then the sum of the centred squares (two passes,
    but plain vectorised sums, which run 3-13x faster there than ``var_mean``'s reduction over ``(0, 2, 3)``,
    with the same ~1e-7 error; docs/scaling.md)."""
    if x.device.type == "cpu":
        mean = x.sum(dim=(0, 2, 3)) * inv_m
        return (x - mean.view(1, -1, 1, 1)).square_().sum(dim=(0, 2, 3)) * inv_m, mean
    return torch.var_mean(x, dim=(0, 2, 3), correction=0)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of ``x (N, C, H, W)`` over ``(N, H, W)`` (Eq. 1), one
    :func:`_channel_var_mean` (float32; float64 stays float64), any memory format. Backward in one pass over ``x``:
    ``dx = (g_mean + 2 g_var (x - mean)) / M``, ``M = N H W``, as ``addcmul(b, x, a)`` with per-channel
    ``a = 2 g_var / M`` and ``b = (g_mean - 2 g_var mean) / M``. Only ``x`` and the mean are saved; ``inv_m``,
    ``two_inv_m`` are the constants ``1 / M``, ``2 / M`` (made outside: a compiled graph must not fill a cache
    inside the Function)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inv_m: torch.Tensor, two_inv_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = _channel_var_mean(xf, inv_m)
        ctx.save_for_backward(x, mean, inv_m, two_inv_m)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor):
        x, mean, inv_m, two_inv_m = ctx.saved_tensors
        a = g_var * two_inv_m
        b = torch.addcmul(g_mean * inv_m, a, mean, value=-1.0)
        return torch.addcmul(b.view(1, -1, 1, 1), x, a.view(1, -1, 1, 1)).to(x.dtype), None, None


class _NoContext:
    """Stands in for an autograd context when a Function's forward runs without a graph."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


_INV_COUNTS: dict[tuple[int, int, int, int, torch.device], torch.Tensor] = {}


def _inverse_counts(h: int, w: int, p: int, nc: int, device: torch.device) -> torch.Tensor:
    """``1 / (nc * real pixels of each p x p patch)``, ``(ceil(h/p), ceil(w/p))`` float32, made once per shape."""
    key = (h, w, p, nc, device)
    if key not in _INV_COUNTS:
        rows = torch.full((-(-h // p),), float(p)).index_fill_(0, torch.tensor([-(-h // p) - 1]), float(h - p * (-(-h // p) - 1)))
        cols = torch.full((-(-w // p),), float(p)).index_fill_(0, torch.tensor([-(-w // p) - 1]), float(w - p * (-(-w // p) - 1)))
        _INV_COUNTS[key] = (1.0 / (nc * rows[:, None] * cols[None, :])).to(device)
    return _INV_COUNTS[key]


class _PatchMoments(torch.autograd.Function):
    """Patch mean and biased variance of ``x (N, C, H, W)`` over batch, channels and the pixels of each ``p x p``
    patch (Eq. 9; a partial last patch over its real pixels), about a detached shift ``t`` (float32
    ``(1, 1, 1, 1)``): ``(ceil(H/p), ceil(W/p))`` each, float32. Forward: one pass ``x - t`` reduced to two
    ``(H, W)`` sums, pooled per patch (sum pooling times the inverse counts). Backward: the per-patch
    coefficients ``c1 = dL/dM1``, ``c2 = dL/dM2`` of the patch moments ``M1 = E[x - t]``, ``M2 = E[(x - t)^2]``
    (``dL/dM1 = g_mean - 2 M1 g_var``, ``dL/dM2 = g_var`` where the variance is not clamped), spread to their
    pixels, and ``dx = c1 + 2 c2 (x - t)`` in one ``addcmul``. Saves ``x`` and small tensors only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, p: int, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        xs = torch.sub(x, t)  # float32 by type promotion (t is a float32 (1, 1, 1, 1))
        sums = torch.stack([xs.sum(dim=(0, 1)), xs.square_().sum(dim=(0, 1))])
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            sums = F.pad(sums, (0, pw, 0, ph))
        m1, m2 = (F.avg_pool2d(sums, p, p, divisor_override=1) * inv).unbind(0)
        var = torch.addcmul(m2, m1, m1, value=-1.0).clamp_min_(0.0)
        ctx.save_for_backward(x, t, m1, var, inv)
        ctx.p = p
        return m1 + t.view(()), var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor):
        x, t, m1, var, inv = ctx.saved_tensors
        p, (h, w) = ctx.p, x.shape[-2:]
        g2 = g_var * torch.sign(var)  # no gradient where the variance was clamped to 0 (var >= 0: sign is 0 or 1)
        coef = torch.stack([torch.addcmul(g_mean, m1, g2, value=-2.0), g2]) * inv  # (2, Hp, Wp)
        coef = F.interpolate(coef[None], scale_factor=p, mode="nearest")[0]  # each patch's value on its pixels
        if coef.shape[-2:] != (h, w):
            coef = coef[:, :h, :w]
        c1, c2 = coef.unbind(0)
        return torch.addcmul(c1, torch.sub(x, t), c2, value=2.0).to(x.dtype), None, None, None


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
        where, m = _compute_type(x), x.numel() // x.shape[1]
        if x.requires_grad and torch.is_grad_enabled():
            mean, var = _ChannelMoments.apply(x, _constant(1.0 / m, where), _constant(2.0 / m, where))
        else:  # no graph: skip the autograd.Function machinery
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            var, mean = _channel_var_mean(xf, _constant(1.0 / m, where))
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
    with torch.autocast(device_type=x.device.type, enabled=False):
        channel_mean, channel_var = channel_statistics(x)
        # the patch statistics about the map's mean (no large common offset); (1, 1, 1, 1): promotes bf16 maps
        t = (channel_mean.detach().sum() * _constant(1.0 / channel_mean.numel(), channel_mean)).view(1, 1, 1, 1)
        if patch_mode == "resize" and (h % p or w % p):
            size = (-(-h // p) * p, -(-w // p) * p)
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        inv = _inverse_counts(x.shape[-2], x.shape[-1], p, x.shape[0] * x.shape[1], x.device)
        if x.requires_grad and torch.is_grad_enabled():
            patch_mean, patch_var = _PatchMoments.apply(x, t, p, inv)
        else:  # no graph: the same forward without the autograd.Function machinery
            with torch.no_grad():
                patch_mean, patch_var = _PatchMoments.forward(_NoContext(), x, t, p, inv)
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


def instance_mean_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over the images of the per-image spatial channel means (docs/method.md Eq. 19):
    ``m_{i,c} = mean_{h,w} x[i, c]`` ``(N, C)``, returned as ``(E_i[m_{i,c}], V_c = Var_i(m_{i,c}))``, ``(C,)``
    each. ``x`` ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float32 (float64 stays),
    differentiable w.r.t. ``x``, no host sync (one spatial mean of the map, then a ``var_mean`` of ``(N, C)``)."""
    if x.dim() != 4:
        x = x.reshape(x.shape[0], x.shape[1], 1, -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = x.mean(dim=(2, 3), dtype=dtype)  # (N, C), no float32 copy of the map
        var, mean = torch.var_mean(m, dim=0, correction=0)
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
