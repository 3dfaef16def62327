"""Forward hooks that compute BatchNorm and Conv statistics inside the hook (docs/method.md Eq. 1, 6, 9, 10).

:class:`StatisticsHooks` attaches to every ``_BatchNorm`` layer with running statistics and every
``nn.Conv2d`` of any model (timm, torchvision, the zoo) found by ``named_modules()``. Each hook
reduces its feature map to a handful of small tensors right away, so no activation is ever stored;
the statistics keep the autograd graph, so synthesis back-propagates through them.

Statistics (all float32, variances biased):

- BN layer ``l`` (Eq. 1/6): per-channel mean and variance of the layer's INPUT over batch and space.
- Conv layer ``l`` (Eq. 9/10): ``channel_mean``/``channel_var`` (``C`` values, over batch and space)
  and ``patch_mean``/``patch_var`` (over batch, channels and the pixels of each ``p x p`` patch; grid
  ``ceil(H/p) x ceil(W/p)``; a partial last patch averages over its real pixels only).

Conv statistics are taken on the Conv2d INPUT by default (authors' code); ``conv_target="output"``
follows the paper's text (docs/method.md "Where the authors' code differs from the paper").

Per-class statistics (soft category-aware matching, docs/method.md "Beyond G-VBSM"): after
:meth:`StatisticsHooks.set_class_labels` every hook also reduces its map per class of the batch
labels: BN layer -> ``bn_class_stats[name] = (mean, var)`` ``(K, C)``; Conv layer ->
``conv_class_stats[name]`` with ``channel_mean``/``channel_var`` ``(K, C)`` and ``patch_mean``/
``patch_var`` ``(K, ceil(H/p), ceil(W/p))``: the same four statistics, each over the images of one
class only (:func:`class_channel_statistics`, :func:`class_conv_statistics`). The map is first reduced
per image (``(N, C)`` and ``(N, ceil(H/p), ceil(W/p))``), then per class with a ``(K, N)`` weight
matrix, so the extra memory is ``K x (channels + patches)`` per layer, never ``K x`` the map.

Efficiency: one elementwise pass ``x - shift`` (a detached per-channel shift taken from the first
image, which makes ``E[x^2] - E[x]^2`` well conditioned), an in-place square, and two reductions
over the batch dimension; the backward is one fused ``addcmul`` (custom autograd Function, which
saves only the activation itself). Everything else (channel and patch reductions, patch pooling)
runs on the ``(C, H, W)`` batch averages, ``N`` times smaller. Patch statistics use the exact identity
``E[(x-t)^2] = E[(x-s_c)^2] + 2 (s_c-t) E[x-s_c] + (s_c-t)^2`` with the scalar ``t = mean_c s_c``
on those small averages, so a large common offset cancels before any squaring.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

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


def _has_running_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, _BatchNorm)
        and bool(module.track_running_stats)
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


class StatisticsHooks:
    """Forward hooks computing BN and Conv statistics of a model (docs/method.md Eq. 1, 6, 9, 10).

    Use as a context manager (the hooks are removed on exit, also on exceptions) or call
    :meth:`remove`. After a forward pass, ``bn_stats[name] = (mean, var)`` and
    ``conv_stats[name] = {"channel_mean", "channel_var", "patch_mean", "patch_var"}`` hold the
    statistics of the last batch that went through each hooked layer (with their autograd graph).

    Args:
        model: any ``nn.Module``; layers are found with ``named_modules()``.
        bn: hook ``_BatchNorm`` layers that track running statistics (input statistics).
        conv: hook every ``nn.Conv2d`` (grouped and depthwise included).
        conv_target: ``"input"`` (authors' code, default) or ``"output"`` (paper text) of each Conv2d.
        patch_size: patch side ``Np`` of the patch statistics (4 small datasets, 16 ImageNet).
        layer_filter: optional ``(name, module) -> bool``; only layers where it is True are hooked.
        enabled: compute statistics (switch off cheaply with ``hooks.enabled = False``).
        bn_global: compute the (global) ``bn_stats`` of the hooked BN layers (``False``: only their
            per-class statistics, e.g. in the record pass, where the BN targets are the running stats).

    Works under ``torch.compile`` (hooks registered before the compiled call are traced into the
    graph; toggling ``enabled`` recompiles once per value) and with channels_last inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bn: bool = True,
        conv: bool = True,
        conv_target: Literal["input", "output"] = "input",
        patch_size: int = 4,
        patch_mode: str = "partial",
        layer_filter: Callable[[str, nn.Module], bool] | None = None,
        enabled: bool = True,
        bn_global: bool = True,
    ) -> None:
        if conv_target not in ("input", "output"):
            raise ValueError(f"conv_target must be 'input' or 'output', got {conv_target!r} (stats_conv_target).")
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r} (stats_patch_size).")
        self.conv_target = conv_target
        self.patch_size = int(patch_size)
        self.patch_mode = patch_mode
        self.enabled = enabled
        self.bn_global = bn_global
        self.class_labels: torch.Tensor | None = None
        self.num_label_classes = 0
        self._class_weights: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bn_class_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv_class_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.bn_layers: list[str] = []
        self.conv_layers: list[str] = []
        self._bn_modules: dict[str, nn.Module] = {}
        self._fired: dict[str, None] = {}  # insertion order = order of first forward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in model.named_modules():
            if layer_filter is not None and not layer_filter(name, module):
                continue
            if bn and _has_running_stats(module):
                self.bn_layers.append(name)
                self._bn_modules[name] = module
                self._handles.append(module.register_forward_hook(self._bn_hook(name), with_kwargs=True))
            elif conv and isinstance(module, nn.Conv2d):
                self.conv_layers.append(name)
                self._handles.append(module.register_forward_hook(self._conv_hook(name), with_kwargs=True))
        if not self._handles:
            logger.warning("StatisticsHooks found no layer to hook (bn=%s, conv=%s) in %s.", bn, conv, type(model).__name__)

    # ----------------------------------------------------------------------------- hooks
    @staticmethod
    def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["input"]

    def _bn_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if not self.enabled:
                return
            self._fired[name] = None
            x = self._first_input(args, kwargs)
            if self.bn_global:
                self.bn_stats[name] = channel_statistics(x)
            if self.class_labels is not None:
                self.bn_class_stats[name] = class_channel_statistics(x, self.class_weights(x.device)[0])

        return hook

    def _conv_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if not self.enabled:
                return
            self._fired[name] = None
            x = self._first_input(args, kwargs) if self.conv_target == "input" else output
            self.conv_stats[name] = conv_statistics(x, self.patch_size, self.patch_mode)
            if self.class_labels is not None:
                self.conv_class_stats[name] = class_conv_statistics(
                    x, self.class_weights(x.device)[0], self.patch_size, self.patch_mode)

        return hook

    # ----------------------------------------------------------------------------- API
    @property
    def layer_names(self) -> list[str]:
        """Hooked layer names in forward order (registration order for layers not run yet)."""
        fired = list(self._fired)
        seen = set(fired)
        return fired + [n for n in self._registered_order() if n not in seen]

    def _registered_order(self) -> list[str]:
        order = {n: None for n in self.bn_layers}
        order.update({n: None for n in self.conv_layers})
        return list(order)

    def bn_targets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (running_mean, running_var)}`` of the hooked BN layers (detached float32 copies)."""
        return {
            name: (m.running_mean.detach().float().clone(), m.running_var.detach().float().clone())
            for name, m in self._bn_modules.items()
        }

    def set_class_labels(self, labels: torch.Tensor | None, num_classes: int | None = None) -> None:
        """Also compute per-class statistics of the next forwards, for batch labels ``labels`` ``(N,)`` in
        ``[0, num_classes)`` (row ``k`` of every per-class statistic is class ``k``); ``None`` switches
        them off. The labels stay set until changed (one call per job / batch)."""
        if labels is None:
            self.class_labels, self.num_label_classes = None, 0
        else:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
            self.class_labels, self.num_label_classes = labels, k
        self._class_weights = {}

    def class_weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`class_weights` of the current class labels, on ``device`` (computed once per device)."""
        if self.class_labels is None:
            raise ValueError("No class labels: call set_class_labels(labels, num_classes) first.")
        if device not in self._class_weights:
            self._class_weights[device] = class_weights(self.class_labels.to(device), self.num_label_classes)
        return self._class_weights[device]

    def clear(self) -> None:
        """Drop the statistics of the last forward pass (and their graphs)."""
        self.bn_stats.clear()
        self.conv_stats.clear()
        self.bn_class_stats.clear()
        self.conv_class_stats.clear()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached."""
        return bool(self._handles)

    def __enter__(self) -> "StatisticsHooks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.bn_layers) + len(self.conv_layers)

    def __repr__(self) -> str:
        return (
            f"StatisticsHooks(bn_layers={len(self.bn_layers)}, conv_layers={len(self.conv_layers)}, "
            f"conv_target={self.conv_target!r}, patch_size={self.patch_size}, enabled={self.enabled})"
        )
