"""The student's ``transformers.Trainer`` (docs/method.md Eq. 11), on the Trainer's public API only.

Every training batch is augmented ON THE DEVICE (random resized crop + flip, parameters from a
CPU generator seeded by ``(args.seed, global step, micro-step, process)``), optionally mixed by
CutMix, and soft-labelled for exactly that view:

* on the fly: the :class:`~gvbsm_hf.ensemble.TeacherEnsemble` runs on the augmented (and mixed)
  batch (Eq. 8);
* stored: a view of :class:`~gvbsm_hf.relabel.store.StoredSoftLabels` is picked per image
  (``epoch % V`` or at random) and THAT view is replayed (crop/flip, and the stored CutMix partner
  and box when the views were relabelled with CutMix), so label and view match;
* hard labels (neither): cross-entropy with the dataset labels.

Loss per ``args.loss_type``: ``"mse_gt"`` Eq. 11, ``"kl"`` (SRe2L's KL at ``kd_temperature``) or
``"ce"``. The student is evaluated on the real validation split without augmentation (top-1).
"""

from __future__ import annotations

import math
import typing
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from ..augment import apply_crop_flip, cutmix, sample_crop_flip
from ..data import DatasetSpec
from ..ensemble import TeacherEnsemble
from ..errors import DataValidationError, GVBSMError
from ..losses import cross_entropy_loss, kl_soft_label_loss, mse_gt_loss
from ..relabel.store import StoredSoftLabels
from ..utils import derive_seed
from .callbacks import ExactResumeCallback, StudentEMACallback
from .config import GVBSMTrainingArguments, LossType
from .datasets import SyntheticImageDataset
from .metrics import argmax_logits, compute_top1, logits_of

logger = get_logger(__name__)

__all__ = ["LOSS_TYPES", "STORED_VIEW_POLICIES", "GVBSMTrainer"]

LOSS_TYPES = typing.get_args(LossType)
STORED_VIEW_POLICIES = ("epoch", "random")


class GVBSMTrainer(Trainer):
    """``transformers.Trainer`` for the student of docs/method.md Eq. 11 (on-the-fly, stored or hard labels).

    Args:
        model: the student (any ``nn.Module`` mapping a normalised batch to logits).
        args: :class:`~gvbsm_hf.evaluate.config.GVBSMTrainingArguments`. ``remove_unused_columns`` is
            forced to ``False``, ``label_names`` to ``["labels"]`` and ``load_best_model_at_end``
            to ``False`` (the protocol reports the last epoch).
        train_dataset: yields ``{"pixel_values", "labels", "index"}`` (:class:`SyntheticImageDataset`).
        eval_dataset: the real validation split (:class:`~gvbsm_hf.evaluate.datasets.RealImageDataset`).
        spec: the dataset spec (image size, classes).
        soft_labeler: teachers for on-the-fly soft labels; kept out of the Trainer's
            ``prepare`` (never wrapped, never saved), moved to ``args.device``.
        stored_labels: precomputed views + logits (:func:`gvbsm_hf.relabel.engine.relabel_stored`),
            one entry per training image, aligned by ``index``; ``args.cutmix_prob`` must equal the
            one the views were relabelled with.
        stored_view_policy: ``"epoch"`` (view ``epoch % V`` for every image) or ``"random"`` (a view
            per image from the step generator). The stored view is replayed exactly, so the stored
            logits are the teachers' on that very view (``student_augment`` concerns the other modes).
        Remaining keyword arguments go to ``transformers.Trainer``.

    EDC options of ``args``: ``student_ema_decay`` evaluates an EMA of the student
    (:class:`~gvbsm_hf.evaluate.callbacks.StudentEMACallback`); ``student_lr_smoothing`` is the
    cosine schedule with a longer period (set in ``GVBSMTrainingArguments``). A run resumed from a
    checkpoint ends exactly like an uninterrupted one
    (:class:`~gvbsm_hf.evaluate.callbacks.ExactResumeCallback`).
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
        self._check_inputs(args, train_dataset, spec, soft_labeler, stored_labels, stored_view_policy)
        # Trainer defaults that do not fit a custom batch dict / the last-epoch protocol
        args.remove_unused_columns = False
        args.label_names = ["labels"]
        ignored_best = args.load_best_model_at_end
        args.load_best_model_at_end = False
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
        if ignored_best:
            logger.warning("load_best_model_at_end=True ignored: the protocol reports the LAST epoch.",
                           main_process_only=True)
        if soft_labeler is None and stored_labels is None and args.loss_type != "ce":
            logger.warning(f"No soft labels given: training with hard labels (CE), not loss_type={args.loss_type!r}.",
                           main_process_only=True)
        self.spec = spec
        self.soft_labeler = soft_labeler
        self.stored_labels = stored_labels
        self.stored_view_policy = stored_view_policy
        if soft_labeler is not None:
            soft_labeler.to(self.args.device)
            soft_labeler.eval()
        self._micro_key: tuple[int, int] = (-1, 0)
        self.add_callback(ExactResumeCallback())
        if args.student_ema_decay is not None:
            self.add_callback(StudentEMACallback(args.student_ema_decay))

    @staticmethod
    def _check_inputs(args, train_dataset, spec, soft_labeler, stored_labels, stored_view_policy) -> None:
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
        labels = soft_labeler if soft_labeler is not None else stored_labels
        k = None if labels is None else labels.num_classes  # None: teachers that do not say
        if k is not None and k != spec.num_classes:
            raise GVBSMError(
                f"The soft labels have {k} classes but the dataset spec has {spec.num_classes}: "
                "use teachers / stored labels made for this dataset."
            )
        if stored_labels is not None and float(stored_labels.cutmix_prob) != float(args.cutmix_prob):
            raise DataValidationError(
                f"The stored views were relabelled with cutmix_prob={stored_labels.cutmix_prob} but the student "
                f"trains with cutmix_prob={args.cutmix_prob}: relabel with the student's cutmix_prob "
                "(the relabel stage does it from the recipe) or set "
                f"cutmix_prob: {stored_labels.cutmix_prob}."
            )
        if stored_labels is not None and train_dataset is not None and len(stored_labels) != len(train_dataset):
            raise DataValidationError(
                f"The stored soft labels cover {len(stored_labels)} images but the training set has "
                f"{len(train_dataset)}: re-run relabel_stored on exactly these training images (same order), "
                "or pass the stored labels that belong to this distilled set."
            )

    # ---- callbacks -------------------------------------------------------------------------
    def _callback(self, kind: type[TrainerCallback]) -> Any:
        """This trainer's callback of class ``kind`` (``None`` if absent), looked up where the Trainer keeps it."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, kind)), None)

    @property
    def student_ema(self) -> StudentEMACallback | None:
        """The EMA of the student (``student_ema_decay``), ``None`` when off."""
        return self._callback(StudentEMACallback)


    # ---- training, logging, evaluation -------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``; when resuming, the EMA and the running loss come back from the checkpoint, so
        ``training_loss`` (and every logged ``loss``) equals the uninterrupted run's."""
        ckpt = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        ckpt = ckpt if isinstance(ckpt, str) else None
        ema = self.student_ema
        if ema is not None:
            ema.resume_from = ckpt
        self._micro_key = (-1, 0)
        out = super().train(resume_from_checkpoint if ckpt is None else ckpt, *args, **kwargs)
        tracker = self._callback(ExactResumeCallback)
        if tracker is not None and tracker.loss_since_log is not None:
            loss = tracker.train_loss(self.state.global_step)
            out = TrainOutput(out.global_step, loss, {**(out.metrics or {}), "train_loss": loss})
        return out

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """``Trainer.training_step``, its loss also added to the resumable running loss."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        tracker = self._callback(ExactResumeCallback)
        if tracker is not None:
            tracker.add(loss, self.args, self.state)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``, with ``loss`` / ``train_loss`` from the resumable running loss."""
        tracker = self._callback(ExactResumeCallback)
        if tracker is not None and tracker.active:
            if "loss" in logs:
                logs["loss"] = tracker.drain(self._mean_over_processes, self.state.global_step)
            if "train_loss" in logs:
                logs["train_loss"] = tracker.train_loss(self.state.global_step)
        super().log(logs, *args, **kwargs)

    def _mean_over_processes(self, value: torch.Tensor) -> float:
        if self.args.world_size > 1:
            value = self.accelerator.gather(value.reshape(1))
        return value.mean().item()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, on the student EMA's weights when ``student_ema_decay`` is set and training began."""
        ema = self.student_ema
        if ema is None or ema.averaged is None:
            return super().evaluate(*args, **kwargs)
        with ema.swapped_into(self.model):
            return super().evaluate(*args, **kwargs)

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
        """Augment (+ CutMix) a batch on its device and soft-label that exact view (Eq. 8 / stored views).

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
            x, soft, stored_mix = self._stored_view(x, labels, index, generator)
        elif args.student_augment:
            params = sample_crop_flip(
                b, h, w, scale=tuple(float(s) for s in args.student_crop_scale), generator=generator
            ).to(device)
            x = apply_crop_flip(x, params, h)

        targets: torch.Tensor = labels
        if self.stored_labels is not None:
            if stored_mix is not None and not (args.loss_type == "mse_gt" and args.cutmix_ce_label == "original"):
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

    def _stored_view(
        self, x: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The stored view of each image (replayed), its stored logits and, under the stored CutMix,
        ``(label of the partner or own label, lambda)``."""
        st = self.stored_labels
        b, _, h, w = x.shape
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
            epoch = math.floor(self.state.epoch or 0.0)
            views = torch.full((b,), epoch % v, dtype=torch.long)
        else:
            views = torch.randint(v, (b,), generator=generator)
        partner, _, lam = st.mix_params(views, index)
        partner_images, stored_mix = None, None
        if st.has_mix:  # the stored CutMix: the partner's own view pasted into the stored box
            partner_images, partner_labels = self._train_rows(partner.clamp(min=0))
            lab = labels.detach().to("cpu", torch.long).reshape(-1)
            stored_mix = (torch.where(partner >= 0, partner_labels, lab), lam)
        soft = st.dense_logits(views, index).to(x.device)
        return st.replay(x, views, index, partner_images=partner_images), soft, stored_mix

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

    # ---- loss ----------------------------------------------------------------------------
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
        """Augment on device, soft-label the view, student forward, loss per ``args.loss_type`` (Eq. 11)."""
        x, soft, targets = self.prepare_batch(
            inputs["pixel_values"], inputs["labels"], inputs.get("index"), self.step_generator()
        )
        logits = logits_of(model(self._memory_format(x)))
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
        inputs = send_to_device(inputs, self.args.device)
        labels = inputs["labels"]
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = logits_of(model(self._memory_format(inputs["pixel_values"]))).float()
            loss = F.cross_entropy(logits, labels.long())
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), logits.detach(), labels
