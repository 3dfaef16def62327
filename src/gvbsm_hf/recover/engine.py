"""Recover: the synthesis engine, generic over registered methods (docs/method.md "Recover").

Per iteration one backbone is chosen from the candidate teachers (GBM, Eq. 7), the synthetic
batch is augmented (random resized crop + flip), the teacher's forward hooks record the batch's
BN/Conv statistics, and the method's loss (:mod:`gvbsm_hf.methods`; G-VBSM:
``w_ce CE + r_bn L'_BN (Eq. 6) + r_conv L'_Conv (Eq. 10) + w_dd L_DD (Eq. 5)``) is minimised with
Adam and a cosine learning rate; pixels are clipped to the valid normalised range. Methods that
select rather than optimise (``random_real``) return their set directly.

Work is split into *jobs*: one job is one synthesis batch holding ``slots_per_batch`` IPC slots of
each of ``classes_per_batch`` classes (the "reorder loop", so DD sees several images per class).
Every job has its own seed and its own SDS EMA state and runs entirely on one process, so 1 and N
processes produce the same images; job ``j`` runs on process ``j % N``. A job checkpoints every
``syn_checkpoint_every`` iterations (safetensors: pixels, Adam moments, EMAs, RNG state) and a
restarted run continues from there to the same result.
"""

from __future__ import annotations

import inspect
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn

from ..record.config import StatisticsArguments
from ..data import DatasetSpec
from ..errors import GVBSMError, StatisticsMismatchError
from ..methods import SynthesisConfig, SynthesisProtocol, get_init, get_method, method_config
from ..progress import progress_bar
from ..record.statistics_file import TeacherStatistics
from ..synthetic_set import SyntheticSet
from ..utils import load_safetensors, save_safetensors
from .job_runner import JobRunner
from .jobs import SynthesisJob, plan_jobs
from .teacher_slot import TeacherSlot

logger = get_logger(__name__)


def as_method_config(args: SynthesisProtocol) -> SynthesisConfig:
    """The registered method's config: ``args`` itself, or built from recipe arguments
    (:func:`gvbsm_hf.methods.method_config` of ``args.syn_method``, as the main method)."""
    if isinstance(args, SynthesisConfig):
        return args
    return method_config(args.syn_method, args)


def _initial_images(method, job: SynthesisJob, real_train, spec: DatasetSpec, args: SynthesisConfig,
                    device: torch.device, slots: Sequence[TeacherSlot] = (), cache: dict | None = None
                    ) -> torch.Tensor | None:
    """The method's ``init`` if it has one, else the registered initialisation ``args.syn_init``
    (:func:`gvbsm_hf.methods.get_init`; ``cache`` is its per-process memo across jobs); ``None``: noise."""
    if method.init is not None:
        x = method.init(job, real_train, spec, args)
        return None if x is None else x.to(device)
    strategy = get_init(args.syn_init)
    if strategy.uses_teachers:  # scoring forwards compute no statistics (step() re-enables the hooks it uses)
        for slot in slots:
            slot.hooks.enabled = False
    x = strategy.fn(job, real_train, spec, args, [slot.model for slot in slots], device, cache)
    if strategy.uses_teachers:
        for slot in slots:
            slot.hooks.clear()
    return None if x is None else x.to(device)


def recover(
    teachers: Sequence[nn.Module],
    statistics: Sequence[TeacherStatistics | None],
    spec: DatasetSpec,
    args: SynthesisProtocol,
    *,
    stats_args: StatisticsArguments | None = None,
    accelerator: Accelerator | None = None,
    output_dir: str | Path,
    real_train: tuple[torch.Tensor, torch.Tensor] | None = None,
    stop_after_iterations: int | None = None,
) -> SyntheticSet | None:
    """Synthesise the distilled set (docs/method.md "Recover"); resumable, sharded over processes.

    Args:
        teachers: candidate backbones (normalised input -> logits), eval mode is enforced.
        statistics: per-teacher recorded Conv statistics (Eq. 9), ``None`` allowed when the
            method does not match Conv statistics.
        args: a registered method's config (:func:`gvbsm_hf.methods.method_config`), or recipe
            arguments (then ``args.syn_method`` is built as the main method).
        real_train: uint8 images and labels, needed for ``syn_init='real'`` and ``random_real``.
        stop_after_iterations: stop every job after this many iterations *in this call* (used to
            simulate a killed run in tests); returns ``None`` when stopped early.

    Returns the :class:`SyntheticSet` on every process (all jobs gathered through the files).
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    stats_args = stats_args or StatisticsArguments()
    args = as_method_config(args)
    method = get_method(args.syn_method)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not method.optimised:
        if real_train is None:
            raise GVBSMError(f"syn_method={args.syn_method!r} selects real images and needs the real train split (real_train).")
        accepts = inspect.signature(method.select).parameters
        extra = {k: v for k, v in (("teachers", list(teachers)), ("device", accelerator.device)) if k in accepts}
        return method.select(real_train, spec, args, **extra)
    if len(teachers) == 0:
        raise GVBSMError("recover needs at least one teacher.")
    if len(statistics) != len(teachers):
        raise StatisticsMismatchError(f"Got {len(teachers)} teachers but {len(statistics)} statistics entries.")
    if get_init(args.syn_init).needs_real and real_train is None:
        raise GVBSMError(f"syn_init={args.syn_init!r} needs the real train split (real_train).")
    if args.real_batch_size() > 0 and real_train is None:
        raise GVBSMError(f"syn_method={args.syn_method!r} draws real batches every iteration and needs the real "
                         "train split (real_train).")
    if args.syn_backbone_choice not in ("uniform", "round_robin"):
        raise GVBSMError(f"syn_backbone_choice must be 'uniform' or 'round_robin', got {args.syn_backbone_choice!r}.")
    pairs = list(zip(teachers, statistics))
    if args.syn_single_teacher:
        pairs = pairs[:1]
    device = accelerator.device
    jobs = plan_jobs(spec.num_classes, args.ipc, args.syn_classes_per_batch, args.syn_slots_per_batch)
    my_jobs = [j for j in jobs if j.index % accelerator.num_processes == accelerator.process_index]
    config = args.to_dict() | {"num_teachers": len(pairs), "num_jobs": len(jobs)}
    (folder / "jobs").mkdir(exist_ok=True)
    stopped_early = False
    init_cache: dict = {}  # syn_init='rded': each class's selection, computed once per process
    with ExitStack() as stack:
        slots = [TeacherSlot(t, s, args, stats_args, device, stack) for t, s in pairs]
        for job in my_jobs:
            runner = JobRunner(
                job, slots, spec, args, device, folder / "jobs",
                _initial_images(method, job, real_train, spec, args, device, slots, init_cache), real_train,
            )
            if runner.done_path.exists():
                continue
            resumed = runner.load_checkpoint()
            if resumed:
                logger.info(f"job {job.index}: resumed at iteration {runner.iteration}", main_process_only=False)
            bar = progress_bar(
                total=args.syn_iterations, initial=runner.iteration, desc=f"recover job {job.index + 1}/{len(jobs)}",
                disable=not accelerator.is_local_main_process, dynamic_ncols=True,
            )
            start, t0 = runner.iteration, time.perf_counter()
            while runner.iteration < args.syn_iterations:
                if stop_after_iterations is not None and runner.iteration - start >= stop_after_iterations:
                    stopped_early = True
                    break
                runner.step()
                bar.update(1)
                at_ckpt = runner.iteration % args.syn_checkpoint_every == 0
                if at_ckpt or runner.iteration == args.syn_iterations:
                    comps = runner.flush_components()  # reads the loss sums back: once per checkpoint interval
                    bar.set_postfix({k: f"{v:.3g}" for k, v in comps.items()})
                    accelerator.log({f"recover/{k}": v for k, v in comps.items()} | {"recover/job": job.index},
                                    step=job.index * args.syn_iterations + runner.iteration)
                    if at_ckpt and runner.iteration < args.syn_iterations:
                        runner.save_checkpoint()
            bar.close()
            if stopped_early:
                if runner.iteration > start and runner.iteration % args.syn_checkpoint_every != 0:
                    runner.flush_components()
                    runner.save_checkpoint()
                break
            final = {"images": runner.x.detach().float().cpu().contiguous(), "labels": job.labels, "slots": job.slot_ids}
            save_safetensors(final, runner.done_path, metadata={"seconds": f"{time.perf_counter() - t0:.2f}"})
            runner.ckpt_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if stopped_early:
        return None
    images, labels, slot_ids, job_ids = [], [], [], []
    for job in jobs:
        t = load_safetensors(folder / "jobs" / f"job_{job.index:05d}.safetensors", "recover")
        images.append(t["images"])
        labels.append(t["labels"])
        slot_ids.append(t["slots"])
        job_ids.append(torch.full_like(t["labels"], job.index))
    labels_t = torch.cat(labels)
    slots_t = torch.cat(slot_ids)
    order = torch.argsort(labels_t * (args.ipc + 1) + slots_t)  # class-major, slot order
    return SyntheticSet(
        torch.cat(images)[order], labels_t[order], slots_t[order], torch.cat(job_ids)[order], args.syn_method, config
    )
