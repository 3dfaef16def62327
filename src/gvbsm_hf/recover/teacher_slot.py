"""A teacher prepared for synthesis: frozen, hooked (docs/method.md "Recover"), with its BN/Conv
matching targets (Eq. 6, 9, 10) and first-layer weights."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from torch import nn

from ..errors import StatisticsMismatchError
from ..hooks import StatisticsHooks
from ..losses import first_layer_weights
from ..methods import SynthesisConfig
from ..record.compatibility import check_statistics_fit, stats_patch_mode
from ..record.config import StatisticsArguments
from ..record.statistics_file import TeacherStatistics


class TeacherSlot:
    """A teacher prepared for synthesis: frozen, hooked, with its matching targets."""

    def __init__(
        self,
        teacher: nn.Module,
        stats: TeacherStatistics | None,
        args: SynthesisConfig,
        stats_args: StatisticsArguments,
        device: torch.device,
        stack: ExitStack,
    ) -> None:
        self.model = teacher.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if args.syn_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        use_conv = args.uses_conv()
        if use_conv and stats is None:
            raise StatisticsMismatchError(
                f"Method {args.syn_method!r} matches Conv statistics and needs recorded statistics for every "
                "teacher; run the record stage first (`--stages record recover`) or set syn_r_conv: 0."
            )
        use_class = args.uses_class_stats()
        if use_class and (stats is None or not stats.per_class):
            raise StatisticsMismatchError(
                f"syn_class_weight={getattr(args, 'syn_class_weight', None)} matches per-class statistics, which "
                "every teacher's statistics file must hold: set `stats_per_class: true` and run the record stage "
                "(`--redo record`), or set syn_class_weight: 1.")
        use_instance = args.uses_instance_stats()
        if use_instance and (stats is None or not stats.per_instance):
            raise StatisticsMismatchError(
                f"syn_r_instance={getattr(args, 'syn_r_instance', None)} matches per-instance BN statistics "
                "(docs/method.md Eq. 19), which every teacher's statistics file must hold: set `stats_instance: true` "
                "and run the record stage (`--redo record`), or set syn_r_instance: 0.")
        self.hooks = stack.enter_context(  # removed when the stack closes, also on errors
            StatisticsHooks(
                self.model,
                bn=args.uses_bn() or use_instance,
                bn_global=args.uses_bn(),
                bn_instance=use_instance,
                conv=use_conv,
                conv_target=stats_args.stats_conv_target,
                patch_size=stats_args.stats_patch_size,
                patch_mode=stats_patch_mode(stats_args, args),
            )
        )
        self.bn_targets = {k: (m.to(device), v.to(device)) for k, (m, v) in self.hooks.bn_targets().items()}
        self.conv_targets: dict[str, dict[str, torch.Tensor]] = {}
        if use_conv:
            assert stats is not None
            missing = [n for n in self._conv_layer_names() if n not in stats.layers]
            if missing:
                raise StatisticsMismatchError(
                    f"The statistics file has no entry for Conv layer(s) {missing[:3]} of this teacher; it was "
                    "recorded for another backbone. Re-run the record stage (`--redo record`)."
                )
            check_statistics_fit(stats, stats_args, args)
            for name in self._conv_layer_names():
                self.conv_targets[name] = {k: v.to(device) for k, v in stats.layers[name].items()}
        self._weights: dict[tuple[str, float], dict[str, float]] = {}
        self.layouts: dict = {}  # the method's flattened matching targets (gvbsm_hf.matching.FlatLayout), by terms
        self._class_all: tuple[dict, dict] | None = None
        self.class_bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_conv_targets: dict[str, dict[str, torch.Tensor]] = {}
        if use_class:
            assert stats is not None
            check_statistics_fit(stats, stats_args, args)
            need_bn = self.hooks.bn_layers if args.uses_bn() else []
            need_conv = self.hooks.conv_layers if use_conv else []
            missing = [n for n in need_bn if n not in (stats.class_bn or {})]
            missing += [n for n in need_conv if n not in (stats.class_conv or {})]
            if missing:
                raise StatisticsMismatchError(
                    f"The per-class statistics have no entry for layer(s) {missing[:3]} of this teacher; they were "
                    "recorded for another backbone. Re-run the record stage (`--redo record`).")
            self._class_all = (
                {n: (stats.class_bn[n]["mean"].to(device), stats.class_bn[n]["var"].to(device)) for n in need_bn},
                {n: {k: v.to(device) for k, v in stats.class_conv[n].items()} for n in need_conv},
            )
            self._class_counts = stats.class_counts

        self.instance_bn_targets: dict[str, torch.Tensor] = {}
        if use_instance:
            assert stats is not None and stats.instance_bn is not None
            check_statistics_fit(stats, stats_args, args)
            missing = [n for n in self.hooks.bn_layers if n not in stats.instance_bn]
            if missing:
                raise StatisticsMismatchError(
                    f"The per-instance statistics have no entry for BN layer(s) {missing[:3]} of this teacher; they "
                    "were recorded for another backbone. Re-run the record stage (`--redo record`).")
            self.instance_bn_targets = {n: stats.instance_bn[n].to(device) for n in self.hooks.bn_layers}

    def set_job_classes(self, classes: Sequence[int], slots_per_class: int) -> None:
        """Per-class matching of a job (class-major batch, ``slots_per_class`` images per class): the hooks
        compute per-class statistics of the batch and the targets are the rows of ``classes``."""
        if self._class_all is None:
            return
        empty = [c for c in classes if float(self._class_counts[c]) <= 0]
        if empty:
            raise StatisticsMismatchError(
                f"The per-class statistics hold no image of class(es) {empty[:5]}: record them on a split with "
                "every class (raise stats_max_samples).")
        local = torch.arange(len(classes)).repeat_interleave(int(slots_per_class))
        self.hooks.set_class_labels(local, len(classes))
        rows = torch.tensor(list(classes), dtype=torch.long)
        bn_all, conv_all = self._class_all
        self.class_bn_targets = {n: (m[rows.to(m.device)], v[rows.to(v.device)]) for n, (m, v) in bn_all.items()}
        self.class_conv_targets = {n: {k: v[rows.to(v.device)] for k, v in st.items()} for n, st in conv_all.items()}

    def layer_weights(self, kind: str, multiplier: float) -> dict[str, float]:
        """Per-layer weights of the ``"bn"`` or ``"conv"`` terms: ``multiplier`` on the first layer."""
        key = (kind, float(multiplier))
        if key not in self._weights:
            names = list(self.bn_targets if kind == "bn" else self.conv_targets)
            self._weights[key] = first_layer_weights(names, multiplier)
        return self._weights[key]

    def _conv_layer_names(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]
