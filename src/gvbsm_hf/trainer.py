"""Evaluate: train a fresh student on the distilled set with ``transformers.Trainer`` (SPEC Eq. 11).

Every training batch is augmented ON THE DEVICE (random resized crop + flip, parameters from a
CPU generator seeded by ``(args.seed, global step, micro-step, process)``), optionally mixed by
CutMix, and soft-labelled for exactly that view:

* on the fly: the :class:`~gvbsm_hf.relabel.TeacherEnsemble` runs on the augmented (and mixed)
  batch (Eq. 8);
* stored: a view of :class:`~gvbsm_hf.relabel.StoredSoftLabels` is picked per image
  (``epoch % V`` or at random) and THAT view's crop/flip is applied, so label and view match;
* hard labels (neither): cross-entropy with the dataset labels.

Loss per ``args.loss_type``: ``"mse_gt"`` Eq. 11 (MSE to the ensemble logits + gamma * CE with the
ground truth), ``"kl"`` (SRe2L's KL at temperature ``kd_temperature``) or ``"ce"`` (ground-truth
CE only). The student is evaluated on the real validation split without augmentation (top-1).
:func:`evaluate_students` runs the protocol: several students x seeds, LAST-epoch accuracy,
mean +- std.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer

from .augment import apply_crop_flip, cutmix, sample_crop_flip
from .configs import GVBSMTrainingArguments
from .data import DatasetSpec
from .errors import DataValidationError, GVBSMError
from .losses import cross_entropy_loss, kl_soft_label_loss, mse_gt_loss
from .relabel import StoredSoftLabels, TeacherEnsemble, derive_seed

logger = get_logger(__name__)

__all__ = [
    "LOSS_TYPES",
    "SyntheticImageDataset",
    "RealImageDataset",
    "GVBSMTrainer",
    "compute_top1",
    "argmax_logits",
    "evaluate_students",
]

LOSS_TYPES = ("mse_gt", "kl", "ce")
STORED_VIEW_POLICIES = ("epoch", "random")


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
    """Real uint8 images ``(N, C, H, W)``, normalised per item with ``spec`` (memory-friendly)."""

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


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class GVBSMTrainer(Trainer):
    """``transformers.Trainer`` for the student of SPEC Eq. 11 (on-the-fly, stored or hard labels).

    Args:
        model: the student (any ``nn.Module`` mapping a normalised batch to logits).
        args: :class:`~gvbsm_hf.configs.GVBSMTrainingArguments`. ``remove_unused_columns`` is
            forced to ``False``, ``label_names`` to ``["labels"]`` and ``load_best_model_at_end``
            to ``False`` (the protocol reports the last epoch).
        train_dataset: yields ``{"pixel_values", "labels", "index"}`` (:class:`SyntheticImageDataset`).
        eval_dataset: the real validation split (:class:`RealImageDataset`), not augmented.
        spec: the dataset spec (image size, classes).
        soft_labeler: teachers for on-the-fly soft labels; kept out of the Trainer's
            ``prepare`` (never wrapped, never saved), moved to ``args.device``.
        stored_labels: precomputed views + logits (:func:`gvbsm_hf.relabel.relabel_stored`),
            one entry per training image, aligned by ``index``.
        stored_view_policy: ``"epoch"`` (view ``epoch % V`` for every image) or ``"random"``
            (a view per image drawn from the step generator). In stored mode the stored view's
            crop/flip is always applied (``student_augment`` only concerns the other modes) and
            under CutMix the stored logits are mixed with the same ``lam`` as the images (an
            approximation: the teachers never saw the mixed image; on-the-fly mode is exact).
        Remaining keyword arguments go to ``transformers.Trainer``.
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
            raise GVBSMError("GVBSMTrainer needs args=GVBSMTrainingArguments(...) (gvbsm_hf.configs).")
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
        probability vectors ``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` after CutMix.
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
            x = apply_crop_flip(x, st.view_params(views, index).to(device), st.out_size)
            soft = st.dense_logits(views, index).to(device)
        elif args.student_augment:
            params = sample_crop_flip(
                b, h, w, scale=tuple(float(s) for s in args.student_crop_scale), generator=generator
            ).to(device)
            x = apply_crop_flip(x, params, h)

        targets: torch.Tensor = labels
        if args.cutmix_prob > 0 and torch.rand((), generator=generator).item() < args.cutmix_prob:
            x, perm, lam = cutmix(x, alpha=1.0, generator=generator)
            perm = torch.as_tensor(perm, device=device, dtype=torch.long)
            lam_t = torch.as_tensor(lam, device=device, dtype=torch.float32)
            if lam_t.ndim == 1:
                lam_t = lam_t[:, None]
            k = self.spec.num_classes
            onehot = F.one_hot(labels.long(), k).float()
            targets = lam_t * onehot + (1.0 - lam_t) * onehot[perm]
            if soft is not None:  # stored logits: mix like the images (approximation, documented)
                soft = lam_t * soft + (1.0 - lam_t) * soft[perm]

        if self.soft_labeler is not None and self.args.loss_type != "ce":
            soft = self.soft_labeler(x)
        return x, soft, targets

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
) -> dict[str, Any]:
    """Train fresh students on the distilled set and report LAST-epoch validation top-1 (Eq. 11).

    For every student name (``students`` or ``args.eval_students`` or ``[args.student]``) and
    every seed (``seeds`` or ``args.eval_seeds``): ``transformers.set_seed(seed)``, build the
    student with :func:`gvbsm_hf.backbones.create_backbone`, train ``args.num_train_epochs`` in a
    fresh ``<output_dir>/<student>/seed<seed>`` and evaluate the final weights (never the best
    epoch) on ``validation`` = ``(uint8 images, labels)`` without augmentation.

    Returns ``{"per_run": [{"student", "seed", "top1", "eval_loss", "train_loss", "output_dir"}, ...],
    "summary": {student: {"mean", "std", "n"}}}`` with accuracies in % and ``std`` the sample
    standard deviation (ddof=1; 0 for one run). The result is also written to
    ``<output_dir>/evaluation_summary.json``.
    """
    from .backbones import create_backbone

    students = list(students or args.eval_students or [args.student])
    seeds = [int(s) for s in (seeds if seeds is not None else args.eval_seeds)]
    if not students or not seeds:
        raise GVBSMError("evaluate_students needs at least one student and one seed (eval_students / eval_seeds).")
    val_images, val_labels = validation
    train_ds = SyntheticImageDataset(train_images, train_labels, spec)
    eval_ds = RealImageDataset(val_images, val_labels, spec)
    if stored is not None and len(stored) != len(train_ds):
        raise DataValidationError(
            f"The stored soft labels cover {len(stored)} images but {len(train_ds)} training images were given: "
            "re-run relabel_stored on exactly these images (same order)."
        )

    per_run: list[dict[str, Any]] = []
    for student in students:
        for seed in seeds:
            run_dir = os.path.join(args.output_dir, student.replace("/", "_").replace(":", "_"), f"seed{seed}")
            run_args = dataclasses.replace(args, seed=seed, student=student, output_dir=run_dir)
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
            train_out = trainer.train()
            metrics = trainer.evaluate()  # final weights = last epoch
            trainer.save_metrics("eval", metrics)
            curve = [h["eval_top1"] for h in trainer.state.log_history if "eval_top1" in h]
            per_run.append(
                {
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
                }
            )
            del trainer, model
    summary = {s: _summary([r["top1"] for r in per_run if r["student"] == s]) for s in students}
    result = {"per_run": per_run, "summary": summary, "protocol": "last-epoch top-1 (%), mean +- sample std over seeds"}
    if args.process_index == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "evaluation_summary.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
