"""Relabel options: ensemble soft labels (docs/method.md Eq. 8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..validation import ValidatedArguments, check_range

RelabelMode = Literal["on_the_fly", "stored"]

@dataclass
class RelabelArguments(ValidatedArguments):
    """Relabel: ensemble soft labels (docs/method.md Eq. 8)."""

    relabel_mode: RelabelMode = field(
        default="on_the_fly", metadata={"help": "'on_the_fly' (teachers per student batch) or 'stored'."}
    )
    relabel_teachers: Optional[list[str]] = field(default=None, metadata={"help": "Subset (None: all)."})
    relabel_logit_norm: bool = field(default=False, metadata={"help": "Logit normalisation (ImageNet-1k)."})
    relabel_num_views: Optional[int] = field(
        default=None, metadata={"help": "Stored augmented views per image, replayed as view (epoch mod V). None: one per "
                                "student epoch (num_train_epochs), the authors' FKD-style dense labels."})
    relabel_export_views: bool = field(
        default=True, metadata={"help": "Also store the views of the main method in relabel_mode on_the_fly, so the "
                                "export carries replayable soft labels (the `views` config) and evaluate reports "
                                "the 'stored_views' row (trained from the exported files alone)."})
    relabel_topk: Optional[int] = field(default=None, metadata={"help": "Keep only top-k logits (stored)."})
    relabel_seed: int = field(default=0)

    def validate(self) -> None:
        check_range("relabel_num_views", self.relabel_num_views, 1, allow_none=True)
        check_range("relabel_topk", self.relabel_topk, 1, allow_none=True)
