"""Evaluate: train a fresh student on the distilled set with ``transformers.Trainer`` (docs/method.md Eq. 11).

Every training batch is augmented ON THE DEVICE (random resized crop + flip, parameters from a
CPU generator seeded by ``(args.seed, global step, micro-step, process)``), optionally mixed by
CutMix, and soft-labelled for exactly that view:

* on the fly: the :class:`~gvbsm_hf.ensemble.TeacherEnsemble` runs on the augmented (and mixed)
  batch (Eq. 8);
* stored: a view of :class:`~gvbsm_hf.relabel.engine.StoredSoftLabels` is picked per image
  (``epoch % V`` or at random) and THAT view is replayed (crop/flip, and the stored CutMix partner
  and box when the views were relabelled with CutMix), so label and view match;
* hard labels (neither): cross-entropy with the dataset labels.

Loss per ``args.loss_type``: ``"mse_gt"`` Eq. 11 (MSE to the ensemble logits + gamma * CE with the
ground truth), ``"kl"`` (SRe2L's KL at temperature ``kd_temperature``) or ``"ce"`` (ground-truth
CE only). The student is evaluated on the real validation split without augmentation (top-1).
:func:`evaluate_students` runs the protocol: several students x seeds, LAST-epoch accuracy,
mean +- std; each finished run is saved (``run_result.json``) and reported at once, and a killed
run resumes exactly from its last Trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from ..augment import apply_crop_flip, cutmix, sample_crop_flip
from .config import GVBSMTrainingArguments
from ..data import DatasetSpec
from ..errors import DataValidationError, GVBSMError
from ..losses import cross_entropy_loss, kl_soft_label_loss, mse_gt_loss
from ..relabel.store import StoredSoftLabels
from ..utils import derive_seed
from ..ensemble import TeacherEnsemble

logger = get_logger(__name__)

__all__ = [
    "LOSS_TYPES",
    "SyntheticImageDataset",
    "RealImageDataset",
    "GVBSMTrainer",
    "StudentEMACallback",
    "compute_top1",
    "argmax_logits",
    "evaluate_students",
    "RUN_RESULT_FILE",
    "RUN_SETTINGS_FILE",
]

LOSS_TYPES = ("mse_gt", "kl", "ce")
STORED_VIEW_POLICIES = ("epoch", "random")
RUN_RESULT_FILE = "run_result.json"  # <run_dir>/run_result.json: one finished (student, seed) run
RUN_SETTINGS_FILE = "run_settings.json"  # <run_dir>/run_settings.json: what the checkpoints there were trained with
LOSS_STATE_FILE = "gvbsm_loss_state.json"  # in each checkpoint: the Trainer's running loss sums
EMA_STATE_FILE = "gvbsm_student_ema.safetensors"  # in each checkpoint: the student EMA (student_ema_decay)


def _log_warning(msg: str) -> None:
    try:
        logger.warning(msg, main_process_only=True)
    except RuntimeError:  # accelerate logger used before any Accelerator state exists
        import logging

        logging.getLogger(__name__).warning(msg)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class SyntheticImageDataset(Dataset):
    """Distilled images held in memory, yielding ``{"pixel_values", "labels", "index"}``.

    ``images`` are normalised floats ``(N, C, H, W)``, or uint8 together with ``spec`` (then
    normalised once here). ``index`` is the row number, used to look up stored soft labels.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], spec: DatasetSpec | None = None):
        if images.ndim != 4:
            raise DataValidationError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
        if images.dtype == torch.uint8:
            if spec is None:
                raise DataValidationError("uint8 images need the DatasetSpec to be normalised: pass spec=.")
            images = spec.normalize(images)
        elif not images.is_floating_point():
            raise DataValidationError(f"images must be uint8 or normalised float, got {images.dtype}.")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataValidationError(
                f"{images.shape[0]} images but {labels.numel()} labels: pass one integer label per image."
            )
        self.images = images.detach().float().contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}


class RealImageDataset(Dataset):
    """Real uint8 images ``(N, C, H, W)``, normalised per item with ``spec`` (memory-friendly).

    ``images`` is a uint8 tensor or a :class:`gvbsm_hf.data.DecodedImages` (a split decoded on
    access): then each item is decoded when the evaluation ``DataLoader`` asks for it (in its
    worker processes), so the split is never held decoded."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], spec: DatasetSpec):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DataValidationError(
                f"RealImageDataset expects uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}: "
                "use gvbsm_hf.data.to_uint8_tensors."
            )
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataValidationError(f"{images.shape[0]} images but {labels.numel()} labels.")
        self.images, self.labels, self.spec = images, labels, spec

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.spec.normalize(self.images[i : i + 1])[0]
        return {"pixel_values": x, "labels": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep only the predicted class (saves memory in eval)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_top1(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy (in %) from predicted classes ``(N,)`` or logits ``(N, K)`` (torch, offline)."""
    preds = eval_pred.predictions
    if isinstance(preds, (tuple, list)):
        preds = preds[0]
    preds = torch.as_tensor(np.asarray(preds))
    labels = torch.as_tensor(np.asarray(eval_pred.label_ids)).long().reshape(-1)
    if preds.ndim > 1:
        preds = preds.argmax(dim=-1)
    preds = preds.long().reshape(-1)
    return {"top1": 100.0 * (preds == labels).double().mean().item() if labels.numel() else float("nan")}


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "logits"):
        return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise GVBSMError(f"The student returned {type(outputs).__name__}; it must return logits (B, K).")


def _atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class _ResumeHelper(TrainerCallback):
    """Restores the running loss sums of a resumed :class:`GVBSMTrainer` (see ``GVBSMTrainer.train``)
    and tells it whether the Trainer is in its end-of-epoch log / evaluate / save."""

    def __init__(self, trainer: "GVBSMTrainer") -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._deferred_save = False
            trainer._at_epoch_end_call = False
            trainer._restore_loss_state()

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._at_epoch_end_call = False

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.on_step_begin(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._at_epoch_end_call = True


class StudentEMACallback(TrainerCallback):
    """An exponential moving average of the student (EDC; ``student_ema_decay = d``).

    At ``on_train_begin`` the EMA starts as a copy of the weights training starts from, or is
    restored from the checkpoint being resumed (``gvbsm_student_ema.safetensors``, written with every
    checkpoint by :class:`GVBSMTrainer`). After every optimizer step (``on_step_end``, once per
    ``gradient_accumulation_steps`` micro-batches) every floating-point entry of the student's
    ``state_dict`` (parameters and float buffers such as BatchNorm running statistics) becomes
    ``ema = d * ema + (1 - d) * w``; integer buffers (``num_batches_tracked``) are copied.
    :meth:`GVBSMTrainer.evaluate` evaluates the EMA weights (the final evaluation and those of
    ``eval_strategy``) and puts the trained weights back afterwards, bit for bit.
    """

    def __init__(self, trainer: "GVBSMTrainer", decay: float) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise GVBSMError(f"student_ema_decay={decay} must lie in [0, 1).")
        self._trainer = weakref.ref(trainer)
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is None:
            return
        self.shadow = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        ckpt = trainer._resume_checkpoint
        if ckpt is not None:
            path = os.path.join(ckpt, EMA_STATE_FILE)
            if not os.path.isfile(path):
                _log_warning(f"{path} is missing: the student EMA restarts from the resumed weights.")
                return
            from safetensors.torch import load_file

            saved = load_file(path)
            with torch.no_grad():
                for k, v in self.shadow.items():
                    v.copy_(saved[k].to(v.device))

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and self.shadow is not None:
            self.update(trainer.model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * w`` for every float entry of ``model.state_dict()``."""
        d = self.decay
        for k, w in model.state_dict().items():
            e = self.shadow[k]
            if e.is_floating_point():
                e.mul_(d).add_(w.detach().to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(w)

    def save(self, folder: str) -> None:
        from ..utils import save_safetensors

        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.shadow.items()},
                         os.path.join(folder, EMA_STATE_FILE))

    class _Swap:
        def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
            self.model, self.weights = model, weights

        def __enter__(self):
            sd = self.model.state_dict()
            self.backup = {k: v.detach().clone() for k, v in sd.items()}
            with torch.no_grad():
                for k, v in sd.items():
                    v.copy_(self.weights[k])

        def __exit__(self, *exc):
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(self.backup[k])

    def swapped_into(self, model: nn.Module) -> "StudentEMACallback._Swap":
        """Context manager: ``model`` holds the EMA weights inside, its own weights again after."""
        return self._Swap(model, self.shadow)


class GVBSMTrainer(Trainer):
    """``transformers.Trainer`` for the student of docs/method.md Eq. 11 (on-the-fly, stored or hard labels).

    Args:
        model: the student (any ``nn.Module`` mapping a normalised batch to logits).
        args: :class:`~gvbsm_hf.evaluate.config.GVBSMTrainingArguments`. ``remove_unused_columns`` is
            forced to ``False``, ``label_names`` to ``["labels"]`` and ``load_best_model_at_end``
            to ``False`` (the protocol reports the last epoch).
        train_dataset: yields ``{"pixel_values", "labels", "index"}`` (:class:`SyntheticImageDataset`).
        eval_dataset: the real validation split (:class:`RealImageDataset`), not augmented.
        spec: the dataset spec (image size, classes).
        soft_labeler: teachers for on-the-fly soft labels; kept out of the Trainer's
            ``prepare`` (never wrapped, never saved), moved to ``args.device``.
        stored_labels: precomputed views + logits (:func:`gvbsm_hf.relabel.engine.relabel_stored`),
            one entry per training image, aligned by ``index``.
        stored_view_policy: ``"epoch"`` (view ``epoch % V`` for every image) or ``"random"``
            (a view per image drawn from the step generator). In stored mode the stored view is
            replayed exactly (:meth:`~gvbsm_hf.relabel.engine.StoredSoftLabels.replay`: crop/flip, and the
            CutMix partner's view pasted into the stored box; ``student_augment`` only concerns
            the other modes), so the stored logits are the teachers' on that very view;
            ``args.cutmix_prob`` must equal the one the views were relabelled with.
        Remaining keyword arguments go to ``transformers.Trainer``.

    Student-side options of ``args`` (EDC; each off by default): ``student_ema_decay`` evaluates an EMA
    of the student (:class:`StudentEMACallback`, saved in and restored from checkpoints);
    ``student_lr_smoothing = zeta`` replaces ``lr_scheduler_type`` by the smoothing schedule
    ``lr_t = lr * 0.5 * (1 + cos(pi * p / zeta))``, ``p = (t - warmup) / (T - warmup)`` after a linear
    warmup (``get_cosine_schedule_with_warmup`` with ``num_cycles = 0.5 / zeta``; ``zeta = 1`` is the
    plain cosine); ``student_crop_scale``, ``cutmix_prob`` and ``gamma`` as before.
    """

    # compute_loss returns a per-batch mean: let the Trainer divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: GVBSMTrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        *,
        spec: DatasetSpec,
        soft_labeler: TeacherEnsemble | None = None,
        stored_labels: StoredSoftLabels | None = None,
        stored_view_policy: str = "epoch",
        compute_metrics: Any = None,
        preprocess_logits_for_metrics: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, GVBSMTrainingArguments):
            raise GVBSMError("GVBSMTrainer needs args=GVBSMTrainingArguments(...) (gvbsm_hf.evaluate.config).")
        if args.loss_type not in LOSS_TYPES:
            raise GVBSMError(f"loss_type={args.loss_type!r} is not supported: use one of {LOSS_TYPES}.")
        if soft_labeler is not None and stored_labels is not None:
            raise GVBSMError(
                "Pass either soft_labeler (on-the-fly relabel) or stored_labels (stored relabel), not both."
            )
        if stored_view_policy not in STORED_VIEW_POLICIES:
            raise GVBSMError(f"stored_view_policy={stored_view_policy!r}: use one of {STORED_VIEW_POLICIES}.")
        if not 0.0 <= float(args.cutmix_prob) <= 1.0:
            raise GVBSMError(f"cutmix_prob={args.cutmix_prob} must be in [0, 1].")
        if len(args.student_crop_scale) != 2:
            raise GVBSMError(f"student_crop_scale={args.student_crop_scale} must be two numbers [min, max].")
        k_teachers = soft_labeler.num_classes if soft_labeler is not None else (
            stored_labels.num_classes if stored_labels is not None else None
        )
        if k_teachers is not None and k_teachers != spec.num_classes:
            raise GVBSMError(
                f"The soft labels have {k_teachers} classes but the dataset spec has {spec.num_classes}: use "
                "teachers / stored labels made for this dataset."
            )
        if stored_labels is not None and float(stored_labels.cutmix_prob) != float(args.cutmix_prob):
            raise DataValidationError(
                f"The stored views were relabelled with cutmix_prob={stored_labels.cutmix_prob} but the student "
                f"trains with cutmix_prob={args.cutmix_prob}: relabel with the student's cutmix_prob "
                "(relabel_stored(cutmix_prob=...); the relabel stage does it from the recipe) or set "
                f"cutmix_prob: {stored_labels.cutmix_prob}."
            )
        if stored_labels is not None and train_dataset is not None and len(stored_labels) != len(train_dataset):
            raise DataValidationError(
                f"The stored soft labels cover {len(stored_labels)} images but the training set has "
                f"{len(train_dataset)}: re-run relabel_stored on exactly these training images (same order), "
                "or pass the stored labels that belong to this distilled set."
            )
        # Trainer defaults that do not fit a custom batch dict / the last-epoch protocol
        args.remove_unused_columns = False
        args.label_names = ["labels"]
        if args.load_best_model_at_end:
            _log_warning("load_best_model_at_end=True ignored: the protocol reports the LAST epoch.")
            args.load_best_model_at_end = False
        if soft_labeler is None and stored_labels is None and args.loss_type != "ce":
            _log_warning(f"No soft labels given: training with hard labels (CE), not loss_type={args.loss_type!r}.")

        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics if compute_metrics is not None else compute_top1,
            preprocess_logits_for_metrics=(
                preprocess_logits_for_metrics if preprocess_logits_for_metrics is not None else argmax_logits
            ),
            **kwargs,
        )
        self.spec = spec
        self.soft_labeler = soft_labeler
        self.stored_labels = stored_labels
        self.stored_view_policy = stored_view_policy
        if soft_labeler is not None:
            soft_labeler.to(self.args.device)
            soft_labeler.eval()
        self._micro_key: tuple[int, int] = (-1, 0)
        self._resume_checkpoint: str | None = None
        self._loss_state_restored = False
        self._at_epoch_end_call = False  # inside the Trainer's end-of-epoch log / evaluate / save
        self._deferred_save = False
        self.add_callback(_ResumeHelper(self))
        self._student_ema: StudentEMACallback | None = None
        if getattr(args, "student_ema_decay", None) is not None:
            self._student_ema = StudentEMACallback(self, args.student_ema_decay)
            self.add_callback(self._student_ema)

    # ---- EDC student options ---------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Trainer's scheduler, or the smoothing cosine of ``student_lr_smoothing`` (class docstring)."""
        zeta = getattr(self.args, "student_lr_smoothing", None)
        if zeta is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from transformers import get_cosine_schedule_with_warmup

        self.lr_scheduler = get_cosine_schedule_with_warmup(
            optimizer if optimizer is not None else self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps, num_cycles=0.5 / float(zeta),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, on the student EMA's weights when ``student_ema_decay`` is set and training began."""
        ema = self._student_ema
        if ema is None or ema.shadow is None:
            return super().evaluate(*args, **kwargs)
        with ema.swapped_into(self.model):
            return super().evaluate(*args, **kwargs)

    # ---- exact resume --------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``, plus an exact running loss when resuming.

        The Trainer restores weights, optimizer, scheduler, RNG states and the data position
        from a checkpoint; the augmentation is keyed by the global step (:meth:`step_generator`),
        so a resumed run trains exactly like an uninterrupted one. The Trainer's reported
        ``training_loss`` would only average the resumed steps: the running loss sums are saved
        with every checkpoint (``gvbsm_loss_state.json``) and restored here, so ``training_loss``
        (and every logged ``loss``) equals the uninterrupted run's.
        """
        ckpt = resume_from_checkpoint
        if ckpt is True:
            ckpt = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = ckpt if isinstance(ckpt, str) else None
        self._loss_state_restored = False
        self._micro_key = (-1, 0)
        out = super().train(resume_from_checkpoint if ckpt is None else ckpt, *args, **kwargs)
        if self._resume_checkpoint is not None and self._loss_state_restored and self.state.global_step > 0:
            loss = self._total_loss_scalar / self.state.global_step  # = Trainer's formula without interruption
            out = TrainOutput(out.global_step, loss, {**(out.metrics or {}), "train_loss": loss})
        return out

    def _loss_state_path(self, checkpoint: str) -> str:
        name = LOSS_STATE_FILE if self.args.world_size <= 1 else LOSS_STATE_FILE.replace(
            ".json", f"_{self.args.process_index}.json"
        )
        return os.path.join(checkpoint, name)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # written first: the Trainer's trainer_state.json (written near the end) marks a complete checkpoint
        if self._has_loss_state():
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state = {
                "global_step": int(self.state.global_step),
                "total_loss_scalar": float(self._total_loss_scalar),
                "tr_loss": float(self._tr_loss.item()),  # float32 -> float is exact
                "globalstep_last_logged": int(self._globalstep_last_logged),
            }
            _atomic_write_json(self._loss_state_path(folder), state)
        if self._student_ema is not None and self._student_ema.shadow is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self._student_ema.save(folder)
        super()._save_checkpoint(model, trial)

    def _has_loss_state(self) -> bool:
        # the Trainer's running loss sums (transformers >= 5 keeps all three on the Trainer)
        return all(hasattr(self, a) for a in ("_tr_loss", "_total_loss_scalar", "_globalstep_last_logged"))

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        # A step checkpoint that falls on the last step of an epoch is written after that epoch's
        # own log / evaluation (not before, as the Trainer does), so that resuming from it keeps
        # the end-of-epoch eval in the history and the loss sums exactly as without interruption.
        epoch_done = float(self.state.epoch or 0.0).is_integer()
        if not self._at_epoch_end_call and epoch_done and self.control.should_save:
            self.control.should_save = False
            self._deferred_save = True
        elif self._at_epoch_end_call and self._deferred_save:
            self.control.should_save = True
            self._deferred_save = False
        super()._maybe_log_save_evaluate(*args, **kwargs)

    def _restore_loss_state(self) -> None:
        """Called at ``on_train_begin`` (after the Trainer zeroed its loss sums)."""
        ckpt = self._resume_checkpoint
        if ckpt is None:
            return
        path = self._loss_state_path(ckpt)
        if not os.path.isfile(path) or not self._has_loss_state():
            _log_warning(f"{path} is missing: the resumed training_loss averages the resumed steps only.")
            return
        with open(path) as f:
            st = json.load(f)
        if int(st["global_step"]) != int(self.state.global_step):
            _log_warning(f"{path} is for step {st['global_step']}, not {self.state.global_step}: ignored.")
            return
        self._total_loss_scalar = float(st["total_loss_scalar"])
        self._tr_loss.fill_(float(st["tr_loss"]))
        self._globalstep_last_logged = int(st["globalstep_last_logged"])
        self._loss_state_restored = True

    # ---- mode ----------------------------------------------------------------------------
    @property
    def label_mode(self) -> str:
        """``"on_the_fly"``, ``"stored"`` or ``"hard"``."""
        if self.stored_labels is not None:
            return "stored"
        if self.soft_labeler is not None:
            return "on_the_fly"
        return "hard"

    def step_generator(self) -> torch.Generator:
        """CPU generator of the current micro-batch, seeded by ``(seed, global step, micro-step, rank)``."""
        step = int(self.state.global_step)
        last_step, micro = self._micro_key
        micro = micro + 1 if step == last_step else 0
        self._micro_key = (step, micro)
        return torch.Generator().manual_seed(derive_seed(self.args.seed, step, micro, self.args.process_index))

    # ---- batch ---------------------------------------------------------------------------
    def prepare_batch(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Augment (+ CutMix) a batch on its device and soft-label that exact view.

        Returns ``(inputs, soft_logits or None, targets)``; ``targets`` are integer labels, or
        probability vectors ``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` after CutMix, except
        for Eq. 11 with ``cutmix_ce_label="original"`` (authors): the GT term keeps the original label
        while the soft label is computed on the mixed image. Hard-label training always mixes.
        """
        args = self.args
        x = pixel_values
        b, _, h, w = x.shape
        device = x.device
        soft: torch.Tensor | None = None
        if self.stored_labels is not None:
            st = self.stored_labels
            if index is None:
                raise DataValidationError(
                    "Stored soft labels need the dataset to yield 'index' (the row number): use SyntheticImageDataset."
                )
            if tuple(st.image_size) != (h, w):
                raise DataValidationError(
                    f"Stored soft labels were made on {st.image_size[0]}x{st.image_size[1]} images but the batch is "
                    f"{h}x{w}: relabel the same images that you train on."
                )
            index = index.detach().to("cpu", torch.long).reshape(-1)
            v = st.num_views
            if self.stored_view_policy == "epoch":
                epoch = int(math.floor(self.state.epoch or 0.0))
                views = torch.full((b,), epoch % v, dtype=torch.long)
            else:
                views = torch.randint(v, (b,), generator=generator)
            partner, _, lam = st.mix_params(views, index)
            partner_images = None
            if st.has_mix:  # the stored CutMix: the partner's own view pasted into the stored box
                partner_images, partner_labels = self._train_rows(partner.clamp(min=0))
                lab = labels.detach().to("cpu", torch.long).reshape(-1)
                stored_mix = (torch.where(partner >= 0, partner_labels, lab), lam)
            x = st.replay(x, views, index, partner_images=partner_images)
            soft = st.dense_logits(views, index).to(device)
        elif args.student_augment:
            params = sample_crop_flip(
                b, h, w, scale=tuple(float(s) for s in args.student_crop_scale), generator=generator
            ).to(device)
            x = apply_crop_flip(x, params, h)

        targets: torch.Tensor = labels
        if self.stored_labels is not None:
            if self.stored_labels.has_mix and not (args.loss_type == "mse_gt" and args.cutmix_ce_label == "original"):
                partner_labels, lam = stored_mix  # Eq. 11's GT term on the lambda-mixed label
                k, lam_t = self.spec.num_classes, lam.to(device)[:, None]
                onehot, onehot_partner = (F.one_hot(y.to(device, torch.long), k).float() for y in (labels, partner_labels))
                targets = lam_t * onehot + (1.0 - lam_t) * onehot_partner
        elif args.cutmix_prob > 0 and torch.rand((), generator=generator).item() < args.cutmix_prob:
            x, perm, lam = cutmix(x, alpha=1.0, generator=generator)
            perm = torch.as_tensor(perm, device=device, dtype=torch.long)
            lam_t = torch.as_tensor(lam, device=device, dtype=torch.float32)
            if lam_t.ndim == 1:
                lam_t = lam_t[:, None]
            k = self.spec.num_classes
            onehot = F.one_hot(labels.long(), k).float()
            targets = lam_t * onehot + (1.0 - lam_t) * onehot[perm]
            if self.label_mode != "hard" and args.loss_type == "mse_gt" and args.cutmix_ce_label == "original":
                targets = labels  # Eq. 11's GT term on the ORIGINAL label (authors' code); the soft label sees the mix

        if self.soft_labeler is not None and self.args.loss_type != "ce":
            soft = self.soft_labeler(x)
        return x, soft, targets

    def _train_rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values, labels)`` of training rows ``index`` (the stored CutMix partners), on the CPU."""
        ds = self.train_dataset
        if isinstance(ds, SyntheticImageDataset):
            return ds.images[index], ds.labels[index]
        rows = [ds[int(j)] for j in index]
        return (torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]),
                torch.as_tensor([int(r["labels"]) for r in rows], dtype=torch.long))

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.args.student_channels_last else x

    def student_loss(
        self, student_logits: torch.Tensor, soft_logits: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 11 (``mse_gt``), KL (``kl``) or ground-truth CE (``ce`` and hard-label mode)."""
        student_logits = student_logits.float()
        lt = self.args.loss_type
        if soft_logits is None or lt == "ce":
            return cross_entropy_loss(student_logits, targets)
        if lt == "mse_gt":
            return mse_gt_loss(student_logits, soft_logits, targets, gamma=self.args.gamma)
        return kl_soft_label_loss(student_logits, soft_logits, temperature=self.args.kd_temperature)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Augment on device, soft-label the view, student forward, loss per ``args.loss_type``."""
        x, soft, targets = self.prepare_batch(
            inputs["pixel_values"], inputs["labels"], inputs.get("index"), self.step_generator()
        )
        logits = _logits_of(model(self._memory_format(x)))
        loss = self.student_loss(logits, soft, targets)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        """Plain evaluation: no augmentation, CE loss and logits on the validation batch."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = _logits_of(model(self._memory_format(inputs["pixel_values"]))).float()
            loss = F.cross_entropy(logits, labels.long())
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), logits.detach(), labels


# --------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()) if arr.size else float("nan"),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "n": int(arr.size),
    }


def _fingerprint(*items: Any) -> str:
    """xxh64 of tensors / arrays (dtype, shape and bytes; no copy for CPU data) and plain values."""
    import xxhash

    h = xxhash.xxh64()
    for item in items:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(f"value|{item!r}|".encode())
    return h.hexdigest()


def _soft_label_fingerprint(soft_labeler: TeacherEnsemble | None, stored: StoredSoftLabels | None) -> str | None:
    """What the soft labels are made of: the stored views + logits, or the teachers' weights."""
    if stored is not None:
        return _fingerprint(
            stored.boxes, stored.flip, stored.logits, stored.topk_values, stored.topk_indices,
            stored.out_size, stored.fill_margin, stored.num_classes, stored.mix_partner, stored.mix_boxes,
        )
    if soft_labeler is not None:
        items: list[Any] = [type(soft_labeler).__name__]
        for attr in ("logit_norm", "mixed_precision"):
            items.append((attr, getattr(soft_labeler, attr, None)))
        for name, t in soft_labeler.state_dict().items():
            items += [name, t]
        return _fingerprint(*items)
    return None


def _jsonable(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums (SchedulerType, OptimizerNames, ...)
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# training arguments that change the trained student (checked before reusing a run or resuming it)
_SETTING_FIELDS = (
    "num_train_epochs", "max_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "optim", "optim_args", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio",
    "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "data_seed",
    "fp16", "bf16", "gamma", "kd_temperature", "student_augment", "student_crop_scale", "cutmix_prob",
    "cutmix_ce_label", "student_channels_last",
)


def _run_settings(
    student: str,
    seed: int,
    run_args: GVBSMTrainingArguments,
    label_mode: str,
    stored_view_policy: str,
    backbone_kwargs: Mapping[str, Any] | None,
    fingerprints: Mapping[str, str | None],
) -> dict[str, Any]:
    settings = {
        "student": student,
        "seed": int(seed),
        "num_train_epochs": float(run_args.num_train_epochs),
        "loss_type": run_args.loss_type if label_mode != "hard" else "ce",
        "label_mode": label_mode,
        "stored_view_policy": stored_view_policy if label_mode == "stored" else None,
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "training": {name: getattr(run_args, name, None) for name in _SETTING_FIELDS},
        **fingerprints,
    }
    for name in ("student_ema_decay", "student_lr_smoothing"):  # only when set: older runs' settings stay equal
        if getattr(run_args, name, None) is not None:
            settings["training"][name] = getattr(run_args, name)
    return json.loads(json.dumps(settings, sort_keys=True, default=_jsonable))  # as it reads back from disk


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _saved_run(run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result in ``<run_dir>/run_result.json`` if it was trained with exactly ``settings``."""
    saved = _read_json(os.path.join(run_dir, RUN_RESULT_FILE))
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return None
    row = saved.get("result")
    if not isinstance(row, dict) or "top1" not in row:
        return None
    return {**row, "output_dir": run_dir}


_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the Trainer checkpoints in ``run_dir``, newest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found, reverse=True)


def _last_complete_checkpoint(run_dir: str) -> str | None:
    """Like ``transformers.trainer_utils.get_last_checkpoint``, skipping a checkpoint cut short by a kill.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint is taken only when that file reads back with its own step.
    """
    for step, path in _checkpoints(run_dir):
        state = _read_json(os.path.join(path, "trainer_state.json"))
        if isinstance(state, dict) and int(state.get("global_step", -1)) == step:
            return path
    return None


def _validation_fingerprint(images: Any, labels: Any) -> str:
    """Of the validation images: their bytes (a tensor), or the split + view of a
    :class:`gvbsm_hf.data.DecodedImages` (never decoded for it)."""
    if isinstance(images, torch.Tensor) or not hasattr(images, "fingerprint"):
        return _fingerprint(torch.as_tensor(images), torch.as_tensor(labels))
    return _fingerprint("decoded-on-access", images.fingerprint, torch.as_tensor(labels))


class _ValidationWorkers:
    """While the final evaluation runs: the ``DataLoader`` workers of a validation split decoded on
    access (``DecodedImages.num_workers``, the recipe's ``dataloader_workers``) when the training
    arguments ask for none; training batches are not affected."""

    def __init__(self, trainer: Trainer, images: Any) -> None:
        self.trainer, self.workers = trainer, int(getattr(images, "num_workers", 0) or 0)
        self.saved: int | None = None

    def __enter__(self) -> None:
        if self.workers and not self.trainer.args.dataloader_num_workers:
            self.saved = self.trainer.args.dataloader_num_workers
            self.trainer.args.dataloader_num_workers = self.workers

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.trainer.args.dataloader_num_workers = self.saved


def evaluate_students(
    train_images: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    validation: tuple[torch.Tensor, torch.Tensor],
    spec: DatasetSpec,
    args: GVBSMTrainingArguments,
    *,
    soft_labeler: TeacherEnsemble | None = None,
    stored: StoredSoftLabels | None = None,
    students: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    stored_view_policy: str = "epoch",
    backbone_kwargs: Mapping[str, Any] | None = None,
    callbacks: list | None = None,
    on_run_done: Callable[[dict], None] | None = None,
    completed: Sequence[Mapping] = (),
    reuse_saved_runs: bool = True,
) -> dict[str, Any]:
    """Train fresh students on the distilled set and report LAST-epoch validation top-1 (Eq. 11).

    For every student name (``students`` or ``args.eval_students`` or ``[args.student]``) and
    every seed (``seeds`` or ``args.eval_seeds``): ``transformers.set_seed(seed)``, build the
    student with :func:`gvbsm_hf.backbones.create_backbone`, train ``args.num_train_epochs`` in
    ``<output_dir>/<student>/seed<seed>`` (the run folder) and evaluate the final weights (never
    the best epoch) on ``validation`` = ``(uint8 images, labels)`` without augmentation. The
    images may be a :class:`gvbsm_hf.data.DecodedImages` (``StageContext.real`` at ImageNet
    scale): the validation split is then streamed through the evaluation ``DataLoader`` (its
    ``num_workers`` worker processes), never decoded whole.

    Progress is kept per run, so a killed evaluation loses at most the run in progress:

    * ``completed``: rows of runs already done (the ``per_run`` entries of an earlier call, at
      least ``"student"``, ``"seed"``, ``"top1"``); these (student, seed) pairs are not trained
      and their rows go into ``per_run`` / ``summary`` as given.
    * After each finished run its row is written atomically to ``<run folder>/run_result.json``
      (with the settings it was trained with) and then passed to ``on_run_done(row)`` (called on
      every process; write files from the main process only). A later call reuses a
      ``run_result.json`` whose settings (student, seed, epochs, loss type, label mode, the other
      training hyperparameters, and fingerprints of the training images + labels, the validation
      split and the soft labels) equal this call's, instead of retraining; ``on_run_done`` is
      called for such a reused run too (not for ``completed`` ones).
    * A run killed mid-training resumes from the newest complete Trainer checkpoint in its run
      folder (``trainer.train(resume_from_checkpoint=...)``) when the run folder's
      ``run_settings.json`` matches; otherwise stale checkpoints there are deleted and the run
      starts afresh. Checkpoints exist only when ``args.save_strategy`` is ``"steps"`` or
      ``"epoch"`` (the default writes none): set ``save_strategy: steps``, ``save_steps: <k>`` and
      ``save_total_limit: 1`` to make students resumable. Resuming is exact: the Trainer restores
      weights, optimizer, scheduler, RNG states and skips the batches already seen (keep
      ``ignore_data_skip=False``), and the augmentation / CutMix / stored-view draws come from
      :meth:`GVBSMTrainer.step_generator`, keyed by the global step, so the resumed student ends
      with the same weights, accuracy and ``train_loss`` as an uninterrupted run.
    * ``reuse_saved_runs=False`` retrains every run not in ``completed`` from scratch (ignores
      ``run_result.json`` and deletes old checkpoints), e.g. for a forced redo.

    Returns ``{"per_run": [{"student", "seed", "top1", "eval_loss", "train_loss", "output_dir",
    "resumed_from_step", ...}, ...], "summary": {student: {"mean", "std", "n"}}}`` with accuracies
    in % and ``std`` the sample standard deviation (ddof=1; 0 for one run); ``per_run`` is ordered
    by student, then seed. The result is also written to ``<output_dir>/evaluation_summary.json``.
    """
    from accelerate import PartialState

    from ..backbones import create_backbone

    students = list(students or args.eval_students or [args.student])
    seeds = [int(s) for s in (seeds if seeds is not None else args.eval_seeds)]
    if not students or not seeds:
        raise GVBSMError("evaluate_students needs at least one student and one seed (eval_students / eval_seeds).")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for row in completed:
        missing = [k for k in ("student", "seed", "top1") if k not in row]
        if missing:
            raise GVBSMError(f"completed rows need 'student', 'seed' and 'top1'; {dict(row)} lacks {missing}.")
        done[(str(row["student"]), int(row["seed"]))] = dict(row)
    val_images, val_labels = validation
    train_ds = SyntheticImageDataset(train_images, train_labels, spec)
    eval_ds = RealImageDataset(val_images, val_labels, spec)
    if stored is not None and len(stored) != len(train_ds):
        raise DataValidationError(
            f"The stored soft labels cover {len(stored)} images but {len(train_ds)} training images were given: "
            "re-run relabel_stored on exactly these images (same order)."
        )
    label_mode = "stored" if stored is not None else ("on_the_fly" if soft_labeler is not None else "hard")
    fingerprints: dict[str, str | None] | None = None  # computed once, only if some run is not in `completed`
    state = PartialState()
    is_main = args.process_index == 0

    per_run: list[dict[str, Any]] = []
    for student in students:
        for seed in seeds:
            if (student, seed) in done:
                per_run.append(done[(student, seed)])
                continue
            run_dir = os.path.join(args.output_dir, student.replace("/", "_").replace(":", "_"), f"seed{seed}")
            run_args = dataclasses.replace(args, seed=seed, student=student, output_dir=run_dir)
            if fingerprints is None:
                fingerprints = {
                    "train_fingerprint": _fingerprint(torch.as_tensor(train_images), torch.as_tensor(train_labels)),
                    "validation_fingerprint": _validation_fingerprint(val_images, val_labels),
                    "soft_label_fingerprint": _soft_label_fingerprint(soft_labeler, stored),
                }
            settings = _run_settings(student, seed, run_args, label_mode, stored_view_policy, backbone_kwargs,
                                     fingerprints)
            if reuse_saved_runs:
                row = _saved_run(run_dir, settings)
                if row is not None:
                    logger.info(f"{student} seed {seed}: reusing {os.path.join(run_dir, RUN_RESULT_FILE)}")
                    per_run.append(row)
                    if on_run_done is not None:
                        on_run_done(dict(row))
                    continue

            # resume from a checkpoint of a run with the same settings, or start afresh
            ckpt = None
            if reuse_saved_runs and _read_json(os.path.join(run_dir, RUN_SETTINGS_FILE)) == settings:
                ckpt = _last_complete_checkpoint(run_dir)
            state.wait_for_everyone()  # every process decided before the main one changes the folder
            if is_main:
                resumed_step = -1 if ckpt is None else int(_CHECKPOINT_RE.match(os.path.basename(ckpt)).group(1))
                for step, path in _checkpoints(run_dir):
                    if step > resumed_step:  # other settings, or cut short by the kill: never resume from it
                        _log_warning(f"Deleting {path}: not a complete checkpoint of this run's settings.")
                        shutil.rmtree(path, ignore_errors=True)
                if ckpt is None:
                    for name in (RUN_RESULT_FILE, RUN_SETTINGS_FILE):
                        if os.path.exists(os.path.join(run_dir, name)):
                            os.remove(os.path.join(run_dir, name))
                _atomic_write_json(os.path.join(run_dir, RUN_SETTINGS_FILE), settings)
            state.wait_for_everyone()

            transformers.set_seed(seed)
            model = create_backbone(
                student, spec.num_classes, in_chans=spec.channels, image_size=spec.image_size,
                **dict(backbone_kwargs or {}),
            )
            if run_args.student_channels_last:
                model = model.to(memory_format=torch.channels_last)
            trainer = GVBSMTrainer(
                model=model,
                args=run_args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                spec=spec,
                soft_labeler=soft_labeler,
                stored_labels=stored,
                stored_view_policy=stored_view_policy,
                callbacks=callbacks,
            )
            resumed_from = None
            if ckpt is not None:
                resumed_from = int(_CHECKPOINT_RE.match(os.path.basename(ckpt)).group(1))
                logger.info(f"{student} seed {seed}: resuming from {ckpt}")
            train_out = trainer.train(resume_from_checkpoint=ckpt)
            with _ValidationWorkers(trainer, val_images):
                metrics = trainer.evaluate()  # final weights = last epoch
            trainer.save_metrics("eval", metrics)
            curve = [h["eval_top1"] for h in trainer.state.log_history if "eval_top1" in h]
            row = {
                "student": student,
                "seed": seed,
                "top1": float(metrics["eval_top1"]),
                "eval_loss": float(metrics.get("eval_loss", float("nan"))),
                "train_loss": float(train_out.training_loss),
                "epochs": float(run_args.num_train_epochs),
                "label_mode": trainer.label_mode,
                "loss_type": run_args.loss_type if trainer.label_mode != "hard" else "ce",
                "output_dir": run_dir,
                "eval_top1_history": curve[:-1],  # evaluations during training (eval_strategy), for curves
                "resumed_from_step": resumed_from,
            }
            del trainer, model
            if is_main:
                _atomic_write_json(os.path.join(run_dir, RUN_RESULT_FILE), {"settings": settings, "result": row})
            per_run.append(row)
            if on_run_done is not None:
                on_run_done(dict(row))
    summary = {s: _summary([r["top1"] for r in per_run if r["student"] == s]) for s in students}
    result = {"per_run": per_run, "summary": summary, "protocol": "last-epoch top-1 (%), mean +- sample std over seeds"}
    if is_main:
        _atomic_write_json(os.path.join(args.output_dir, "evaluation_summary.json"), result)
    return result
