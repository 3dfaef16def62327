"""Evaluate options: the student's training (docs/method.md Eq. 11), ``transformers.TrainingArguments`` extended."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import TrainingArguments

from ..validation import RecipeError, check_choice, check_crop_scale, check_range

LossType = Literal["mse_gt", "kl", "ce"]
CutMixLabel = Literal["original", "mixed"]


@dataclass
class GVBSMTrainingArguments(TrainingArguments):
    """Student training on a distilled set (docs/method.md Eq. 11), extends ``transformers.TrainingArguments``.

    Every value the student uses is checked here, at parse time, with a message naming the field
    and the fix. ``student_lr_smoothing = zeta`` sets ``lr_scheduler_type: cosine`` with
    ``lr_scheduler_kwargs: {num_cycles: 0.5 / zeta}`` (EDC's smoothing schedule, docs/method.md
    "Beyond G-VBSM")."""

    student: str = field(default="convnet128", metadata={"help": "Evaluator backbone name."})
    loss_type: LossType = field(default="mse_gt", metadata={"help": "'mse_gt' (Eq. 11), 'kl' (SRe2L) or 'ce'."})
    gamma: float = field(default=0.1, metadata={"help": "GT cross-entropy weight (0.15 CIFAR in code)."})
    kd_temperature: float = field(
        default=4.0, metadata={"help": "tau of Eq. 8's softmax(z/tau) for loss_type='kl' (teacher and student); mse_gt uses raw logits."}
    )
    student_augment: bool = field(default=True)
    student_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    cutmix_prob: float = field(default=0.0, metadata={"help": "Probability of CutMix on a batch (authors: 1.0)."})
    cutmix_ce_label: CutMixLabel = field(
        default="original", metadata={"help": "Under CutMix, the GT cross-entropy of Eq. 11 uses the 'original' label "
                                      "(authors) or the lambda-'mixed' one."})
    student_channels_last: bool = field(
        default=False, metadata={"help": "channels_last memory format for the student and its batches (faster convs)."}
    )
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, mean +- std."})
    eval_students: Optional[list[str]] = field(
        default=None, metadata={"help": "Several evaluators (cross-architecture table); None: [student]."}
    )
    student_ema_decay: Optional[float] = field(
        default=None, metadata={"help": "Keep an EMA of the student (ema = d * ema + (1 - d) * w after every optimizer "
                                "step, parameters and float buffers) and evaluate with it (EDC). None: off."})
    student_lr_smoothing: Optional[float] = field(
        default=None, metadata={"help": "EDC's smoothing schedule: a cosine whose period is this factor zeta >= 1 "
                                "times the run, lr = 0.5 (1 + cos(pi t / (zeta T))) after warmup; replaces "
                                "lr_scheduler_type. None: off (zeta = 1 is the plain cosine)."})

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, typing.get_args(LossType))
        check_range("gamma", self.gamma, 0)
        check_range("kd_temperature", self.kd_temperature, 0, low_open=True)
        check_range("cutmix_prob", self.cutmix_prob, 0, 1)
        check_choice("cutmix_ce_label", self.cutmix_ce_label, typing.get_args(CutMixLabel))
        check_crop_scale("student_crop_scale", self.student_crop_scale)
        check_range("student_ema_decay", self.student_ema_decay, 0, 1, high_open=True, allow_none=True)
        check_range("student_lr_smoothing", self.student_lr_smoothing, 1, allow_none=True)
        self._check_training_values()
        if not self.eval_seeds:
            raise RecipeError("eval_seeds is empty: give at least one seed, e.g. `eval_seeds: [0, 1, 2]`.")
        if self.push_to_hub:
            raise RecipeError(
                "push_to_hub is the Trainer's upload of student checkpoints and is not used here: to publish, set "
                "`push_dataset: true` with `dataset_repo_id: <org>/<name>` (and `teacher_repo_prefix: <org>/<name>` "
                "for the teachers)."
            )
        if self.student_lr_smoothing is not None:  # EDC smoothing = the cosine schedule with a longer period
            self.lr_scheduler_type = "cosine"
            self.lr_scheduler_kwargs = {"num_cycles": 0.5 / float(self.student_lr_smoothing)}
        super().__post_init__()

    def _check_training_values(self) -> None:
        """The ``TrainingArguments`` values the student uses, checked before the Trainer sees them."""
        check_range("learning_rate", self.learning_rate, 0, low_open=True)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        check_range("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        if self.max_steps is None or self.max_steps <= 0:
            try:
                check_range("num_train_epochs", self.num_train_epochs, 0, low_open=True)
            except RecipeError as err:
                raise RecipeError(f"{err} Or set `max_steps:` > 0 to train a fixed number of steps.") from None
