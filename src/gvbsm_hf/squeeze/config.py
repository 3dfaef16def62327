"""Squeeze options: which teachers, and how they are trained (docs/method.md "Stages")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from ..backbones.registry import has_pretrained_weights
from ..hub_utils import is_hub_repo_id
from ..validation import RecipeError, ValidatedArguments, check_range

@dataclass
class SqueezeArguments(ValidatedArguments):
    """Teacher backbones: train them (squeeze) or load them by folder / Hub id."""

    teachers: list[str] = field(
        default_factory=lambda: ["convnet128", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"],
        metadata={"help": "Backbone names to train (zoo, 'tv:' torchvision, 'timm:' timm, 'hf-hub:'), "
                  "or teacher folders / Hub ids (loaded, not trained)."},
    )
    teacher_epochs: int = field(default=5, metadata={"help": "Epochs per teacher (few epochs, docs/method.md)."})
    teacher_lr: float = field(default=0.05, metadata={"help": "Peak learning rate (SGD, cosine)."})
    teacher_batch_size: int = field(default=128, metadata={"help": "Global batch size (split across processes, so 1 and N processes train the same teacher)."})
    teacher_weight_decay: float = field(default=5e-4)
    teacher_momentum: float = field(default=0.9)
    teacher_label_smoothing: float = field(default=0.0)
    teacher_augment: bool = field(default=True, metadata={"help": "Random crop (pad 4) + flip."})
    teacher_pretrained: bool = field(
        default=False, metadata={"help": "Teachers that have pretrained weights ('timm:', 'tv:', 'hf-hub:' and bare "
                                 "timm names) start from them (downloaded once, then cached); zoo teachers have none "
                                 "and are trained from scratch."}
    )
    teacher_seed: int = field(default=0)

    def validate(self) -> None:
        if not self.teachers:
            raise RecipeError("teachers is empty: list at least one backbone, e.g. `teachers: [convnet128]`.")
        check_range("teacher_epochs", self.teacher_epochs, 0)
        check_range("teacher_lr", self.teacher_lr, 0, low_open=True)
        check_range("teacher_batch_size", self.teacher_batch_size, 1)
        check_range("teacher_weight_decay", self.teacher_weight_decay, 0)
        check_range("teacher_momentum", self.teacher_momentum, 0, 1, high_open=True)
        check_range("teacher_label_smoothing", self.teacher_label_smoothing, 0, 1, high_open=True)


def is_teacher_reference(name: str) -> bool:
    """A teacher given as a folder or Hub model id (loaded) rather than a backbone name (trained)."""
    if os.path.isdir(name):
        return True
    if name.startswith(("hf-hub:", "tv:", "timm:")):
        return False
    return is_hub_repo_id(name)


def teacher_starts_pretrained(name: str, teacher_pretrained: bool) -> bool:
    """``teacher_pretrained`` per teacher: backbones with pretrained weights (``timm:``, ``tv:``,
    ``hf-hub:``, bare timm names) start from them; zoo backbones have none and start from scratch."""
    return bool(teacher_pretrained) and has_pretrained_weights(name)


def untrained_teachers_message(untrained: Sequence[str], teacher_pretrained: bool) -> str:
    """Why ``teacher_epochs: 0`` cannot be used with these teachers, and the recipe fields that fix it."""
    zoo = [n for n in untrained if not has_pretrained_weights(n)]
    capable = [n for n in untrained if n not in zoo]
    parts = []
    if zoo:
        parts.append(f"zoo teacher(s) {zoo} have no pretrained weights, so teacher_epochs: 0 would leave them "
                     "untrained")
    if capable:
        parts.append(f"teacher(s) {capable} would be untrained because teacher_pretrained is false")
    fixes = ["set `teacher_epochs: N` with N >= 1 in the recipe (--teacher_epochs N)"]
    if capable and not teacher_pretrained:
        fixes.append("set `teacher_pretrained: true` (--teacher_pretrained true) to use the pretrained weights of "
                     f"{capable}")
    if zoo:
        fixes.append(f"remove {zoo} from `teachers:` (--teachers), or list trained teacher folders there instead")
    return "; ".join(parts) + ". Fix: " + ", or ".join(fixes) + "."
