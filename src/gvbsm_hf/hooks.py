"""Forward hooks that compute BatchNorm and Conv statistics inside the hook (docs/method.md Eq. 1, 6, 9, 10).

:class:`StatisticsHooks` attaches to every BatchNorm layer (:data:`BATCH_NORMS`) with running statistics and every
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

Per-instance statistics (docs/method.md Eq. 19): with ``bn_instance=True`` (or after
:meth:`StatisticsHooks.set_instance_stats`) every BN hook also reduces its input to the per-image spatial
channel means ``m_{i,c}`` ``(N, C)`` and keeps their variance over the images, ``bn_instance_stats[name]``
``(C,)`` (and their mean, ``bn_instance_means[name]``, which the record pass needs to pool batches):
:func:`~gvbsm_hf.moments.instance_mean_statistics`. Extra memory: ``N x C`` per layer.

Efficiency (issue 32): a BN layer's statistics are one ``var_mean`` (on the CPU a mean and a centred mean)
whose backward is one ``addcmul`` over the map (custom autograd Function saving only the activation and the mean); a Conv layer adds, for its
patch statistics, one pass ``x - t`` (``t`` the detached mean of the map, so a large common offset
cancels before any squaring) reduced over batch and channels to two ``(H, W)`` maps, again with a
one-``addcmul`` backward. Pooling into patches and the rest run on those small maps. A handful of
kernels per layer, forward and backward, and no host sync (:mod:`gvbsm_hf.moments`).
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from torch import nn

from .moments import (channel_statistics, class_channel_statistics, class_conv_statistics, class_weights, conv_statistics,
                      instance_mean_statistics)

logger = logging.getLogger(__name__)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""BatchNorm layers (timm's BatchNormAct2d subclasses nn.BatchNorm2d)."""

def _has_running_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, BATCH_NORMS)
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
        bn: hook BatchNorm layers (:data:`BATCH_NORMS`) that track running statistics (input statistics).
        conv: hook every ``nn.Conv2d`` (grouped and depthwise included).
        conv_target: ``"input"`` (authors' code, default) or ``"output"`` (paper text) of each Conv2d.
        patch_size: patch side ``Np`` of the patch statistics (4 small datasets, 16 ImageNet).
        layer_filter: optional ``(name, module) -> bool``; only layers where it is True are hooked.
        enabled: compute statistics (switch off cheaply with ``hooks.enabled = False``).
        bn_global: compute the (global) ``bn_stats`` of the hooked BN layers (``False``: only their
            per-class statistics, e.g. in the record pass, where the BN targets are the running stats).
        bn_instance: also compute ``bn_instance_stats`` / ``bn_instance_means`` of the hooked BN layers
            (docs/method.md Eq. 19); switch later with :meth:`set_instance_stats`.

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
        bn_instance: bool = False,
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
        self.bn_instance = bool(bn_instance)
        self.bn_instance_stats: dict[str, torch.Tensor] = {}
        self.bn_instance_means: dict[str, torch.Tensor] = {}
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
            if self.bn_instance:
                self.bn_instance_means[name], self.bn_instance_stats[name] = instance_mean_statistics(x)

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

    def set_instance_stats(self, on: bool = True) -> None:
        """Also compute (or stop computing) the per-instance statistic of every hooked BN layer in the next
        forwards: ``bn_instance_stats[name]`` ``(C,)``, the variance over the batch's images of their spatial
        channel means (docs/method.md Eq. 19)."""
        self.bn_instance = bool(on)

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
        self.bn_instance_stats.clear()
        self.bn_instance_means.clear()

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
