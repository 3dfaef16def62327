"""Squeeze: train teacher backbones from scratch on a small dataset (docs/method.md "Stages", first row).

One global batch of ``args.teacher_batch_size`` images per optimiser step, split across processes
(each takes its slice); the permutation and the augmentation parameters are drawn for the whole
global batch from seeded generators, BatchNorm is synchronised across processes, and the loss is
normalised by the global batch size, so 1 and N processes train the same teacher (up to float
rounding). Checkpoints (``accelerator.save_state``) are written every epoch and optionally every
N steps; a run resumes from the latest one and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn

from .config import SqueezeArguments
import torch.distributed as dist

from ..augment import pad_crop_flip
from ..backbones.registry import has_pretrained_weights
from ..progress import progress_bar
from ..utils import seeded_generator
from ..data import DatasetSpec
from ..errors import DataValidationError, GVBSMError, NonFiniteLossError
from ..teacher import TeacherModel

logger = get_logger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------ helpers


def _lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check_split(name: str, split: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec) -> None:
    images, labels = split
    expected = (spec.channels, spec.image_size, spec.image_size)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataValidationError(
            f"{name} images must be uint8 (N, {expected[0]}, {expected[1]}, {expected[2]}) as in the DatasetSpec "
            f"{spec.name!r}; got {images.dtype} {tuple(images.shape)}. Use gvbsm_hf.data.to_uint8_tensors."
        )
    if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise DataValidationError(
            f"{name} labels must be an integer tensor (N,) with N={len(images)}; got {labels.dtype} {tuple(labels.shape)}."
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataValidationError(
            f"{name} labels must lie in [0, {spec.num_classes}); got [{int(labels.min())}, {int(labels.max())}]. "
            "Check the label column / num_classes of the DatasetSpec."
        )


def _augment(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad-4 random crop + horizontal flip of a whole global batch (``gvbsm_hf.augment.pad_crop_flip``)."""
    return pad_crop_flip(images01, padding=4, generator=generator)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over processes is the sum of gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _AllReduceSum.apply(grad)


class _CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the *global* batch of all processes.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so CPU multi-process runs (gloo) use this one:
    per-channel sums are all-reduced with a differentiable all-reduce (gradients are all-reduced in
    backward, as in SyncBatchNorm), giving the mean and variance of the global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = all_reduce(x.float().sum(dim=(0, 2, 3))) / n
        centred = x.float() - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def _convert_cross_process_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` by :class:`_CrossProcessBatchNorm2d` (same parameters and buffers)."""
    if type(module) is nn.BatchNorm2d:
        new = _CrossProcessBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cross_process_bn(child))
    return module


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state), oldest first."""
    root = output_dir / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / TRAINER_STATE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    validation: tuple[torch.Tensor, torch.Tensor],
    spec: DatasetSpec,
    accelerator: Accelerator,
    batch_size: int = 512,
) -> float:
    """Top-1 on the validation split: each process takes a contiguous shard, counts are summed."""
    images, labels = validation
    shard = torch.tensor_split(torch.arange(len(images)), accelerator.num_processes)[accelerator.process_index]
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(shard), batch_size):
        idx = shard[start:start + batch_size]
        x = spec.normalize(images[idx].to(accelerator.device))
        with accelerator.autocast():
            pred = model(x).argmax(dim=1)
        correct += (pred.cpu() == labels[idx]).sum().double().to(accelerator.device)
    model.train(was_training)
    total = accelerator.reduce(correct, reduction="sum")
    return float(total.item()) / max(1, len(images))


# --------------------------------------------------------------------------------- train_teacher


def train_teacher(
    backbone: str,
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor],
    spec: DatasetSpec,
    args: SqueezeArguments,
    *,
    accelerator: Accelerator,
    output_dir: str | Path,
    backbone_kwargs: dict | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    nesterov: bool = False,
    warmup_ratio: float = 0.03,
    pretrained: bool | None = None,
) -> TeacherModel:
    """Train ``backbone`` on ``train`` (uint8 images, labels) and save it as a teacher in ``output_dir``.

    SGD (momentum, optional Nesterov, weight decay), linear warm-up (``warmup_ratio`` of the steps)
    then cosine lr, cross-entropy with label smoothing, pad-4 crop + flip. ``args.teacher_batch_size``
    is the *global* batch, split across processes. Resumes from ``output_dir/checkpoints/step_<k>``.
    ``max_steps`` stops after that many optimiser steps in total (the schedule still spans
    ``args.teacher_epochs``), saving a checkpoint; the final teacher (``save_pretrained``, with
    metrics ``val_top1``, ``epochs``, ``train_time_s`` and a model card) is written only when all
    epochs are done. Returns the (unwrapped, plain-BatchNorm) :class:`TeacherModel`.
    ``pretrained``: start from pretrained weights; ``None`` (default) follows
    ``args.teacher_pretrained`` for backbones that have them (``tv:``, ``timm:``, ``hf-hub:``) and
    trains zoo backbones (no pretrained weights) from scratch.
    Note: ``accelerator.free_memory()`` is called before and after, so the accelerator's
    checkpoint registry only holds this teacher's model and optimiser.
    """
    _check_split("train", train, spec)
    _check_split("validation", validation, spec)
    if pretrained is None:
        pretrained = bool(args.teacher_pretrained) and has_pretrained_weights(backbone)
    if args.teacher_epochs < 1 or args.teacher_batch_size < 1:
        raise GVBSMError("teacher_epochs and teacher_batch_size must be >= 1.")
    output_dir = Path(output_dir)
    train_images, train_labels = train[0].cpu(), train[1].cpu().long()
    n_train = len(train_images)
    global_batch = args.teacher_batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(n_train / global_batch)
    total_steps = steps_per_epoch * args.teacher_epochs
    warmup_steps = max(1, round(warmup_ratio * total_steps))
    recipe = {
        "optimizer": "SGD" + (" (Nesterov)" if nesterov else ""),
        "epochs": args.teacher_epochs,
        "peak lr": args.teacher_lr,
        "lr schedule": f"linear warm-up {warmup_steps} steps, cosine to 0",
        "global batch size": global_batch,
        "momentum": args.teacher_momentum,
        "weight decay": args.teacher_weight_decay,
        "label smoothing": args.teacher_label_smoothing,
        "augmentation": "random crop (pad 4) + horizontal flip" if args.teacher_augment else "none",
        "seed": args.teacher_seed,
        "pretrained init": bool(pretrained),
        "train images": n_train,
        "processes": world,
        "mixed precision": str(accelerator.mixed_precision),
    }

    accelerator.free_memory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.teacher_seed)
        teacher = TeacherModel.from_backbone(
            backbone, spec, backbone_kwargs=backbone_kwargs, pretrained=bool(pretrained), recipe=recipe
        )
    init_kwargs = teacher.init_kwargs()
    model: nn.Module = teacher
    if world > 1:
        if accelerator.device.type == "cpu":
            model = _convert_cross_process_bn(model)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.teacher_lr, momentum=args.teacher_momentum,
        weight_decay=args.teacher_weight_decay, nesterov=nesterov and args.teacher_momentum > 0,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    state: dict[str, Any] = {
        "step": 0, "train_time_s": 0.0, "history": [], "backbone": backbone, "global_batch": global_batch,
        "n_train": n_train, "total_steps": total_steps, "seed": args.teacher_seed,
    }
    ckpts = _checkpoints(output_dir)
    if ckpts:
        step, path = ckpts[-1]
        saved = json.loads((path / TRAINER_STATE).read_text())
        mismatch = {k: (saved.get(k), state[k]) for k in ("backbone", "global_batch", "n_train", "total_steps", "seed")
                    if saved.get(k) != state[k]}
        if mismatch:
            raise GVBSMError(
                f"Checkpoint {path} was written by a different run: {mismatch} (checkpoint, now). Delete "
                f"{output_dir / CHECKPOINT_DIR} to start afresh or use another output_dir."
            )
        accelerator.load_state(str(path))
        state.update(saved)
        logger.info(f"Resuming {backbone} from {path} (step {state['step']}/{total_steps}).")
    last_ckpt: Path | None = ckpts[-1][1] if ckpts else None
    saved_steps = {state["step"]} if ckpts else set()  # same on every process (no file-system race)

    def save_checkpoint() -> Path:
        path = output_dir / CHECKPOINT_DIR / f"step_{state['step']}"
        if state["step"] in saved_steps:
            return path
        saved_steps.add(state["step"])
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            (path / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            for _, old in _checkpoints(output_dir)[:-keep_checkpoints] if keep_checkpoints > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def lr_now() -> float:
        return _lr_at(state["step"], total_steps, warmup_steps, args.teacher_lr)

    try:
        model.train()
        val_top1 = state["history"][-1]["val_top1"] if state["history"] else None
        stopped = False
        while state["step"] < total_steps and not stopped:
            epoch, first = divmod(state["step"], steps_per_epoch)
            perm = torch.randperm(n_train, generator=seeded_generator(args.teacher_seed, "perm", epoch))
            t0 = time.perf_counter()
            bar = progress_bar(
                range(first, steps_per_epoch), desc=f"squeeze {backbone} epoch {epoch + 1}/{args.teacher_epochs}",
                disable=not accelerator.is_local_main_process, leave=False,
            )
            for b in bar:
                idx = perm[b * global_batch:(b + 1) * global_batch]
                if len(idx) >= world:  # a last global batch smaller than the world size is skipped
                    images = train_images[idx].to(accelerator.device)
                    if args.teacher_augment:
                        gen = seeded_generator(args.teacher_seed, "augment", state["step"])
                        images = _augment(images.float() / 255.0, gen)
                    local = torch.tensor_split(torch.arange(len(idx)), world)[rank]
                    # standard NCHW strides: (N, 1, H, W) views can look channels-last, which picks other conv
                    # kernels whose rounding depends on the batch size (1 vs N processes would then drift apart)
                    x = spec.normalize(images[local.to(images.device)]).clone(memory_format=torch.contiguous_format)
                    y = train_labels[idx][local].to(accelerator.device)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_now()
                    with accelerator.autocast():
                        logits = model(x)
                    loss_sum = F.cross_entropy(
                        logits.float(), y, label_smoothing=args.teacher_label_smoothing, reduction="sum"
                    )
                    global_loss = accelerator.reduce(loss_sum.detach(), reduction="sum") / len(idx)
                    if not torch.isfinite(global_loss):
                        where = last_ckpt if last_ckpt is not None else "none yet (restart from scratch)"
                        raise NonFiniteLossError(
                            f"Teacher {backbone!r}: loss is {float(global_loss)} at step {state['step']} "
                            f"(lr {lr_now():.4g}, peak teacher_lr {args.teacher_lr}). Lower teacher_lr or enable "
                            f"label smoothing / fp32; the last good checkpoint is {where}."
                        )
                    # DDP averages gradients over processes: scale so the result is d(sum loss)/d(theta) / |global batch|
                    accelerator.backward(loss_sum * (world / len(idx)))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    bar.set_postfix(loss=f"{float(global_loss):.4f}", lr=f"{lr_now():.4f}", refresh=False)
                state["step"] += 1
                if checkpoint_every and state["step"] % checkpoint_every == 0:
                    state["train_time_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    last_ckpt = save_checkpoint()
                if max_steps is not None and state["step"] >= max_steps and state["step"] < total_steps:
                    stopped = True
                    break
            bar.close()
            state["train_time_s"] += time.perf_counter() - t0
            if not stopped or state["step"] % steps_per_epoch == 0:
                val_top1 = _evaluate(accelerator.unwrap_model(model), validation, spec, accelerator)
                state["history"].append({"epoch": epoch + 1, "step": state["step"], "val_top1": val_top1})
                logger.info(f"squeeze {backbone} epoch {epoch + 1}/{args.teacher_epochs}: val top-1 {100 * val_top1:.2f} %")
                accelerator.log({f"squeeze/{backbone}/val_top1": val_top1}, step=state["step"])
            last_ckpt = save_checkpoint()

        trained = accelerator.unwrap_model(model)
        if val_top1 is None:
            val_top1 = _evaluate(trained, validation, spec, accelerator)
        # a fresh TeacherModel: plain BatchNorm2d layers, no DDP/SyncBatchNorm wrappers
        final = TeacherModel(**init_kwargs)
        final.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
        final.to(accelerator.device).eval()
        if stopped:
            logger.info(f"squeeze {backbone}: stopped at step {state['step']} (max_steps); checkpoint {last_ckpt}.")
            return final
        final.metrics = {
            "val_top1": val_top1, "epochs": args.teacher_epochs, "train_time_s": round(state["train_time_s"], 2),
            "steps": total_steps,
        }
        if accelerator.is_main_process:
            final.save_pretrained(output_dir)
        accelerator.wait_for_everyone()
        logger.info(f"squeeze {backbone}: val top-1 {100 * val_top1:.2f} %, saved to {output_dir}")
        return final
    finally:
        accelerator.free_memory()
