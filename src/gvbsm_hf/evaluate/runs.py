"""The evaluation protocol: fresh students x seeds, LAST-epoch top-1 (docs/method.md Eq. 11), mean +- std.

Each finished run is saved (``run_result.json``) and reported at once; a later call reuses it when
its settings match (:mod:`gvbsm_hf.evaluate.reuse`), and a killed run resumes exactly from its
last Trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import PartialState
from accelerate.logging import get_logger
from transformers import Trainer

from ..backbones import create_backbone
from ..data import DatasetSpec
from ..ensemble import TeacherEnsemble
from ..errors import DataValidationError, GVBSMError
from ..progress import bar_mode
from ..relabel.store import StoredSoftLabels
from ..utils import write_json_atomic
from .callbacks import quiet_trainer_output
from .config import GVBSMTrainingArguments
from .datasets import RealImageDataset, SyntheticImageDataset
from .reuse import (
    RUN_RESULT_FILE,
    RUN_SETTINGS_FILE,
    changed_fields,
    checkpoint_step,
    checkpoints,
    data_fingerprints,
    last_complete_checkpoint,
    read_json,
    run_settings,
    same_settings,
    saved_run,
)
from .trainer import GVBSMTrainer

logger = get_logger(__name__)

__all__ = ["RUN_RESULT_FILE", "RUN_SETTINGS_FILE", "evaluate_students", "summarise_top1"]


def summarise_top1(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of accuracies; ``std`` is the sample standard deviation (0 for one run)."""
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()) if arr.size else float("nan"),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "n": int(arr.size),
    }


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

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.trainer.args.dataloader_num_workers = self.saved


def _prepare_run_dir(run_dir: str, settings: Mapping[str, Any], reuse: bool, is_main: bool,
                     state: PartialState) -> str | None:
    """The checkpoint to resume from (same settings, complete), after deleting every other one."""
    ckpt = None
    if reuse and same_settings(read_json(os.path.join(run_dir, RUN_SETTINGS_FILE)), settings):
        ckpt = last_complete_checkpoint(run_dir, with_ema=settings["training"].get("student_ema_decay") is not None)
    state.wait_for_everyone()  # every process decided before the main one changes the folder
    if is_main:
        resumed_step = -1 if ckpt is None else checkpoint_step(ckpt)
        for step, path in checkpoints(run_dir):
            if step > resumed_step:  # other settings, or cut short by the kill: never resume from it
                logger.warning(f"Deleting {path}: not a complete checkpoint of this run's settings.",
                               main_process_only=True)
                shutil.rmtree(path, ignore_errors=True)
        if ckpt is None:
            for name in (RUN_RESULT_FILE, RUN_SETTINGS_FILE):
                if os.path.exists(os.path.join(run_dir, name)):
                    os.remove(os.path.join(run_dir, name))
        write_json_atomic(os.path.join(run_dir, RUN_SETTINGS_FILE), settings)
    state.wait_for_everyone()
    return ckpt


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
    images may be a :class:`gvbsm_hf.data.DecodedImages`: the split is then streamed through the
    evaluation ``DataLoader`` (its ``num_workers`` worker processes), never decoded whole.

    Progress is kept per run, so a killed evaluation loses at most the run in progress:

    * ``completed``: rows of runs already done (at least ``"student"``, ``"seed"``, ``"top1"``);
      they are not trained and go into ``per_run`` / ``summary`` as given.
    * After each finished run its row is written atomically to ``<run folder>/run_result.json``
      (with its settings, :func:`gvbsm_hf.evaluate.reuse.run_settings`) and passed to
      ``on_run_done(row)`` (on every process; write files from the main process only). A later call
      reuses a ``run_result.json`` whose settings fingerprint equals this call's, instead of
      retraining; ``on_run_done`` is called for such a reused run too (not for ``completed`` ones).
    * A run killed mid-training resumes from the newest complete Trainer checkpoint in its run
      folder when ``run_settings.json`` matches; otherwise stale checkpoints are deleted and the
      run starts afresh. Checkpoints exist only with ``save_strategy: steps`` / ``epoch`` (e.g.
      ``save_steps: <k>``, ``save_total_limit: 1``). Resuming is exact (keep
      ``ignore_data_skip=False``): same weights, accuracy and ``train_loss`` as without the kill.
    * ``reuse_saved_runs=False`` retrains every run not in ``completed`` from scratch.

    Returns ``{"per_run": [{"student", "seed", "top1", "eval_loss", "train_loss", "output_dir",
    "resumed_from_step", ...}, ...], "summary": {student: {"mean", "std", "n"}}}`` (accuracies in
    %, ``per_run`` ordered by student, then seed), also written to ``<output_dir>/evaluation_summary.json``.
    """
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
            # no tqdm bar outside a terminal (disable_tqdm is a non-result field: no fingerprint changes)
            run_args = dataclasses.replace(args, seed=seed, student=student, output_dir=run_dir,
                                           disable_tqdm=bool(args.disable_tqdm) or bar_mode() != "live")
            if fingerprints is None:
                fingerprints = data_fingerprints(train_images, train_labels, validation, soft_labeler, stored)
            settings = run_settings(run_args, label_mode, stored_view_policy, backbone_kwargs, fingerprints)
            if reuse_saved_runs:
                row = saved_run(run_dir, settings)
                if row is not None:
                    logger.info(f"{student} seed {seed}: reusing {os.path.join(run_dir, RUN_RESULT_FILE)}")
                    per_run.append(row)
                    if on_run_done is not None:
                        on_run_done(dict(row))
                    continue
                before = read_json(os.path.join(run_dir, RUN_RESULT_FILE))
                if isinstance(before, dict):
                    logger.info(f"{student} seed {seed}: retraining, settings changed: "
                                f"{', '.join(changed_fields(before.get('settings'), settings)) or 'format'}")

            ckpt = _prepare_run_dir(run_dir, settings, reuse_saved_runs, is_main, state)
            row = _train_one(run_args, spec, train_ds, eval_ds, val_images, ckpt, backbone_kwargs=backbone_kwargs,
                             soft_labeler=soft_labeler, stored_labels=stored, stored_view_policy=stored_view_policy,
                             callbacks=callbacks)
            if is_main:
                write_json_atomic(os.path.join(run_dir, RUN_RESULT_FILE), {"settings": settings, "result": row})
            per_run.append(row)
            if on_run_done is not None:
                on_run_done(dict(row))
    summary = {s: summarise_top1([r["top1"] for r in per_run if r["student"] == s]) for s in students}
    result = {"per_run": per_run, "summary": summary, "protocol": "last-epoch top-1 (%), mean +- sample std over seeds"}
    if is_main:
        write_json_atomic(os.path.join(args.output_dir, "evaluation_summary.json"), result)
    return result


def _train_one(run_args: GVBSMTrainingArguments, spec: DatasetSpec, train_ds: SyntheticImageDataset,
               eval_ds: RealImageDataset, val_images: Any, ckpt: str | None, *,
               backbone_kwargs: Mapping[str, Any] | None, **trainer_kwargs: Any) -> dict[str, Any]:
    """Train one student (or resume it from ``ckpt``) and evaluate its final weights: the run's row."""
    student, seed = run_args.student, int(run_args.seed)
    transformers.set_seed(seed)
    model = create_backbone(student, spec.num_classes, in_chans=spec.channels, image_size=spec.image_size,
                            **dict(backbone_kwargs or {}))
    if run_args.student_channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = GVBSMTrainer(model=model, args=run_args, train_dataset=train_ds, eval_dataset=eval_ds, spec=spec,
                           **trainer_kwargs)
    quiet_trainer_output(trainer)
    if ckpt is not None:
        logger.info(f"{student} seed {seed}: resuming from {ckpt}")
    train_out = trainer.train(resume_from_checkpoint=ckpt)
    with _ValidationWorkers(trainer, val_images):
        metrics = trainer.evaluate()  # final weights = last epoch
    trainer.save_metrics("eval", metrics)
    curve = [h["eval_top1"] for h in trainer.state.log_history if "eval_top1" in h]
    return {
        "student": student,
        "seed": seed,
        "top1": float(metrics["eval_top1"]),
        "eval_loss": float(metrics.get("eval_loss", float("nan"))),
        "train_loss": float(train_out.training_loss),
        "epochs": float(run_args.num_train_epochs),
        "label_mode": trainer.label_mode,
        "loss_type": run_args.loss_type if trainer.label_mode != "hard" else "ce",
        "output_dir": run_args.output_dir,
        "eval_top1_history": curve[:-1],  # evaluations during training (eval_strategy), for curves
        "resumed_from_step": None if ckpt is None else checkpoint_step(ckpt),
    }
