"""Which recorded statistics a synthesis accepts (docs/differences.md rows 2 and 6): the same
recording augmentation family and patch mode as the synthesis protocol expects."""

from __future__ import annotations

from ..errors import StatisticsMismatchError
from ..methods import PROTOCOLS, SynthesisProtocol
from .config import StatisticsArguments
from .statistics_file import TeacherStatistics, augment_kind


def stats_patch_mode(stats_args: StatisticsArguments, args: SynthesisProtocol) -> str:
    """``stats_patch_mode``, or the synthesis protocol's when unset."""
    return stats_args.stats_patch_mode or PROTOCOLS[args.syn_protocol]["stats_patch_mode"]


def stats_augment_kind(stats_args: StatisticsArguments, syn_augment: str) -> str:
    """``stats_augment``, or the family of the synthesis augmentation when unset."""
    return stats_args.stats_augment or syn_augment


def check_statistics_fit(stats: TeacherStatistics, stats_args: StatisticsArguments, args: SynthesisProtocol) -> None:
    """Recorded statistics must come from the recording augmentation family and patch mode this
    synthesis expects (docs/differences.md rows 2 and 6); raise :class:`StatisticsMismatchError`."""
    name = stats.provenance.get("teacher_name") or "a teacher"
    found = augment_kind(stats.provenance.get("augment", False))
    expected = stats_augment_kind(stats_args, args.syn_augment)
    if found != expected:
        raise StatisticsMismatchError(
            f"The statistics of {name} were recorded with augmentation {found!r}, but this synthesis expects "
            f"{expected!r} (syn_augment={args.syn_augment!r}, stats_augment={stats_args.stats_augment!r}). Record "
            "them again (`--redo record`), or set `stats_augment` explicitly to use statistics of another family.")
    mode = stats.provenance.get("patch_mode", "partial")
    if mode != stats_patch_mode(stats_args, args):
        raise StatisticsMismatchError(
            f"The statistics of {name} were recorded with stats_patch_mode {mode!r}, this synthesis uses "
            f"{stats_patch_mode(stats_args, args)!r}: record them again (`--redo record`).")
