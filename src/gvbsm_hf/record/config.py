"""Record options: the global Conv statistics pass (GSM, docs/method.md Eq. 9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..augment_families import AugmentKind
from ..validation import ValidatedArguments, check_range

ConvTarget = Literal["input", "output"]
PatchMode = Literal["resize", "partial"]


@dataclass
class StatisticsArguments(ValidatedArguments):
    """Global Conv statistics (GSM, docs/method.md Eq. 9)."""

    stats_patch_size: int = field(default=4, metadata={"help": "Patch side Np: 4 small datasets, 16 ImageNet."})
    stats_conv_target: ConvTarget = field(
        default="input",
        metadata={"help": "Match the Conv2d 'input' (authors' code, default) or 'output' (paper text)."},
    )
    stats_batch_size: int = field(default=256)
    stats_augment: Optional[AugmentKind] = field(
        default=None, metadata={"help": "Augmentation of the real data while recording: 'authors' (each dataset's "
                                "train transform), 'per_image_rrc' or 'none'. Unset: the family of syn_augment. "
                                "Recorded in the statistics; synthesis refuses statistics of another family unless "
                                "this is set explicitly."})
    stats_patch_mode: Optional[PatchMode] = field(
        default=None, metadata={"help": "Patch statistics on maps whose side is not a multiple of stats_patch_size: "
                                "'resize' the map bilinearly (authors) or average 'partial' edge patches. Unset: "
                                "syn_protocol's."})
    stats_max_samples: Optional[int] = field(default=None, metadata={"help": "Cap on images in the pass."})
    stats_per_class: bool = field(
        default=False, metadata={"help": "Also record per-class BN-input and Conv statistics in the same pass (soft "
                                 "category-aware matching, syn_class_weight < 1; docs/method.md \"Beyond G-VBSM\"). "
                                 "Memory grows with classes x channels, not images."})
    stats_instance: bool = field(
        default=False, metadata={"help": "Also record, for every BN layer, the variance over the images of their "
                                 "per-image spatial channel means of the BN input (per-instance statistic matching, "
                                 "syn_r_instance > 0; docs/method.md Eq. 19). Memory: channels per layer."})

    def validate(self) -> None:
        check_range("stats_patch_size", self.stats_patch_size, 1)
        check_range("stats_batch_size", self.stats_batch_size, 1)
        check_range("stats_max_samples", self.stats_max_samples, 1, allow_none=True)
