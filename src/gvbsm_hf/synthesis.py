"""Recover: synthesise ``ipc`` images per class with G-VBSM (SPEC "Recover").

Per iteration one backbone is chosen from the candidate teachers (GBM, Eq. 7), the synthetic
batch is augmented (random resized crop + flip) and the pixels minimise

    L = w_ce CE + r_bn L'_BN (Eq. 6) + r_conv L'_Conv (Eq. 10) + w_dd L_DD (Eq. 5)

with Adam and a cosine learning rate; pixels are clipped to the valid normalised range.

Work is split into *jobs*: one job is one synthesis batch holding ``slots_per_batch`` IPC slots of
each of ``classes_per_batch`` classes (the "reorder loop", so DD sees several images per class).
Every job has its own seed and its own SDS EMA state and runs entirely on one process, so 1 and N
processes produce the same images; job ``j`` runs on process ``j % N``. A job checkpoints every
``syn_checkpoint_every`` iterations (safetensors: pixels, Adam moments, EMAs, RNG state) and a
restarted run continues from there to the same result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .augment import apply_crop_flip, sample_crop_flip
from .configs import SYNTHESIS_METHODS, StatisticsArguments, SynthesisArguments
from .data import DatasetSpec, class_balanced_indices
from .errors import GVBSMError, NonFiniteLossError, StatisticsMismatchError
from .hooks import StatisticsHooks
from .losses import bn_matching_loss, conv_matching_loss, data_densification_loss, first_layer_weights
from .statistics import TeacherStatistics

logger = get_logger(__name__)

LOSS_COMPONENTS = ("loss", "ce", "bn", "conv", "dd")

# Flags each preset sets (SPEC "Baselines and ablations"); applied only to fields left at their
# dataclass default, so a value written explicitly in a recipe wins.
_PRESETS: dict[str, dict[str, object]] = {
    "gvbsm": {},
    "sre2l": {"syn_r_conv": 0.0, "syn_alpha": 0.0, "syn_dd": False, "single_teacher": True},
    "sre2l+dd": {"syn_r_conv": 0.0, "syn_alpha": 0.0, "syn_dd": True, "single_teacher": True},
    "sre2l+gbm": {"syn_r_conv": 0.0, "syn_alpha": 0.0, "syn_dd": False},
    "random_real": {},
}


@dataclass(frozen=True)
class SynthesisJob:
    """One synthesis batch: every class in ``classes`` times every slot in ``slots``."""

    index: int
    classes: tuple[int, ...]
    slots: tuple[int, ...]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([c for c in self.classes for _ in self.slots], dtype=torch.long)

    @property
    def slot_ids(self) -> torch.Tensor:
        return torch.tensor([s for _ in self.classes for s in self.slots], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.classes) * len(self.slots)


@dataclass
class SyntheticSet:
    """The result of recover: normalised float images plus their labels and slot metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    slots: torch.Tensor
    jobs: torch.Tensor
    method: str
    config: dict = field(default_factory=dict)

    def uint8_images(self, spec: DatasetSpec) -> torch.Tensor:
        """Images quantised to uint8 pixels (what is published as PNG)."""
        return (spec.denormalize(self.images.float()) * 255.0).round().to(torch.uint8)

    def to_dataset(self, spec: DatasetSpec):
        """``datasets.Dataset`` with ``image`` (Image), ``label`` (ClassLabel), slot and job columns."""
        import datasets
        import numpy as np
        from PIL import Image

        pixels = self.uint8_images(spec).permute(0, 2, 3, 1).numpy()
        mode = "L" if spec.channels == 1 else "RGB"
        pil = [Image.fromarray(p[..., 0] if spec.channels == 1 else p, mode=mode) for p in pixels]
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=list(spec.class_names) or [str(i) for i in range(spec.num_classes)]),
                "slot": datasets.Value("int32"),
                "job": datasets.Value("int32"),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "image": pil,
                "label": self.labels.tolist(),
                "slot": self.slots.tolist(),
                "job": self.jobs.tolist(),
            },
            features=features,
        )

    def save(self, folder: str | Path) -> Path:
        """Float images and metadata as ``synthetic.safetensors`` (exact, for resuming stages)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"images": self.images.contiguous(), "labels": self.labels, "slots": self.slots, "jobs": self.jobs},
            str(folder / "synthetic.safetensors"),
            metadata={"method": self.method, "config": json.dumps(self.config)},
        )
        return folder / "synthetic.safetensors"

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticSet":
        from safetensors import safe_open

        path = Path(folder) / "synthetic.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        return cls(t["images"], t["labels"], t["slots"], t["jobs"], meta.get("method", ""), json.loads(meta.get("config", "{}")))


def resolve_method(args: SynthesisArguments) -> tuple[SynthesisArguments, bool]:
    """Apply the ``syn_method`` preset. Returns the effective arguments and whether only the
    first teacher is used (SRe2L baselines)."""
    if args.syn_method not in SYNTHESIS_METHODS:
        raise GVBSMError(f"Unknown syn_method {args.syn_method!r}; choose one of {SYNTHESIS_METHODS}.")
    preset = dict(_PRESETS[args.syn_method])
    single = bool(preset.pop("single_teacher", False))
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(SynthesisArguments)}
    changes = {k: v for k, v in preset.items() if getattr(args, k) == defaults[k]}
    return dataclasses.replace(args, **changes), single


def plan_jobs(num_classes: int, ipc: int, classes_per_batch: int | None, slots_per_batch: int | None) -> list[SynthesisJob]:
    """The reorder loop: jobs over (class chunk) x (slot chunk)."""
    cpb = classes_per_batch or num_classes
    spb = slots_per_batch or ipc
    if cpb <= 0 or spb <= 0:
        raise GVBSMError("syn_classes_per_batch and syn_slots_per_batch must be positive.")
    jobs = []
    for s0 in range(0, ipc, spb):
        for c0 in range(0, num_classes, cpb):
            jobs.append(
                SynthesisJob(len(jobs), tuple(range(c0, min(c0 + cpb, num_classes))), tuple(range(s0, min(s0 + spb, ipc))))
            )
    return jobs


def _job_seed(seed: int, job_index: int) -> int:
    return (seed * 1_000_003 + job_index * 7919 + 17) % (2**63 - 1)


def cosine_lr(base_lr: float, iteration: int, total: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total`` iterations."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * iteration / max(total, 1)))


class _TeacherSlot:
    """A teacher prepared for synthesis: frozen, hooked, with its matching targets."""

    def __init__(
        self,
        teacher: nn.Module,
        stats: TeacherStatistics | None,
        args: SynthesisArguments,
        stats_args: StatisticsArguments,
        device: torch.device,
        stack: ExitStack,
    ) -> None:
        self.model = teacher.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if args.syn_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        use_conv = args.syn_r_conv > 0
        if use_conv and stats is None:
            raise StatisticsMismatchError(
                "Conv matching (syn_r_conv > 0) needs recorded statistics for every teacher; run the "
                "record stage first or set syn_r_conv: 0."
            )
        self.hooks = stack.enter_context(  # removed when the stack closes, also on errors
            StatisticsHooks(
                self.model,
                bn=args.syn_r_bn > 0,
                conv=use_conv,
                conv_target=stats_args.stats_conv_target,
                patch_size=stats_args.stats_patch_size,
            )
        )
        self.bn_targets = {k: (m.to(device), v.to(device)) for k, (m, v) in self.hooks.bn_targets().items()}
        self.conv_targets: dict[str, dict[str, torch.Tensor]] = {}
        if use_conv:
            assert stats is not None
            missing = [n for n in self._conv_layer_names() if n not in stats.layers]
            if missing:
                raise StatisticsMismatchError(
                    f"The statistics file has no entry for Conv layer(s) {missing[:3]} of this teacher; it was "
                    "recorded for another backbone. Re-run the record stage (`--redo record`)."
                )
            for name in self._conv_layer_names():
                self.conv_targets[name] = {k: v.to(device) for k, v in stats.layers[name].items()}
        self.bn_weights = first_layer_weights(list(self.bn_targets), args.syn_first_layer_multiplier)
        self.conv_weights = first_layer_weights(list(self.conv_targets), args.syn_first_layer_multiplier)

    def _conv_layer_names(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]


def _ema_to_tensors(prefix: str, emas: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, value in emas.items():
        if isinstance(value, dict):
            for stat, t in value.items():
                out[f"{prefix}|{layer}|{stat}"] = t.detach().contiguous()
        else:
            mean, var = value
            out[f"{prefix}|{layer}|mean"] = mean.detach().contiguous()
            out[f"{prefix}|{layer}|var"] = var.detach().contiguous()
    return out


def _ema_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, kind: str) -> dict:
    out: dict = {}
    for key, t in tensors.items():
        if key.count("|") < 2:  # pixels, Adam moments, RNG state
            continue
        p, layer, stat = key.split("|", 2)
        if p != prefix:
            continue
        out.setdefault(layer, {})[stat] = t
    if kind == "bn":
        return {k: (v["mean"], v["var"]) for k, v in out.items()}
    return out


class _JobRunner:
    """Runs one job from its checkpoint (if any) to the end."""

    def __init__(
        self,
        job: SynthesisJob,
        slots: list[_TeacherSlot],
        spec: DatasetSpec,
        args: SynthesisArguments,
        device: torch.device,
        folder: Path,
        init_images: torch.Tensor | None,
    ) -> None:
        self.job, self.slots, self.spec, self.args, self.device = job, slots, spec, args, device
        self.ckpt_path = folder / f"job_{job.index:05d}.ckpt.safetensors"
        self.done_path = folder / f"job_{job.index:05d}.safetensors"
        self.labels = job.labels.to(device)
        self.low, self.high = (b.to(device) for b in spec.pixel_bounds(device))
        self.generator = torch.Generator().manual_seed(_job_seed(args.syn_seed, job.index))
        if init_images is None:
            x = torch.randn(len(job), spec.channels, spec.image_size, spec.image_size, generator=self.generator)
        else:
            x = init_images.clone()
        self.x = x.to(device).clamp_(self.low, self.high).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.x], lr=args.syn_lr, betas=tuple(args.syn_adam_betas))
        self.bn_emas: list[dict | None] = [None] * len(slots)
        self.conv_emas: list[dict | None] = [None] * len(slots)
        self.iteration = 0
        self.sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
        self.sums_count = 0
        self.teachers_used: set[int] = set()
        self.log_path = folder / f"job_{job.index:05d}.log.jsonl"

    # -- checkpointing -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = self.optimizer.state[self.x]
        tensors = {"x": self.x.detach().contiguous(), "rng": self.generator.get_state()}
        if state:
            tensors["exp_avg"] = state["exp_avg"].contiguous()
            tensors["exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            tensors["adam_step"] = torch.as_tensor(state["step"]).reshape(1).float()
        for i in range(len(self.slots)):
            if self.bn_emas[i] is not None:
                tensors.update(_ema_to_tensors(f"bn{i}", self.bn_emas[i]))
            if self.conv_emas[i] is not None:
                tensors.update(_ema_to_tensors(f"conv{i}", self.conv_emas[i]))
        tensors = {k: v.to("cpu") for k, v in tensors.items()}
        tmp = self.ckpt_path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"iteration": str(self.iteration), "job": str(self.job.index)})
        tmp.replace(self.ckpt_path)  # atomic: a kill never leaves a half-written checkpoint

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        from safetensors import safe_open

        with safe_open(str(self.ckpt_path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(self.ckpt_path))
        if t["x"].shape != self.x.shape:
            raise GVBSMError(
                f"Checkpoint {self.ckpt_path} holds images of shape {tuple(t['x'].shape)}, this run expects "
                f"{tuple(self.x.shape)}: the recipe changed. Use another output_dir or `--redo recover`."
            )
        with torch.no_grad():
            self.x.copy_(t["x"].to(self.device))
        self.generator.set_state(t["rng"])
        if "exp_avg" in t:
            self.optimizer.state[self.x] = {
                "step": torch.tensor(float(t["adam_step"].item())),
                "exp_avg": t["exp_avg"].to(self.device),
                "exp_avg_sq": t["exp_avg_sq"].to(self.device),
            }
        for i in range(len(self.slots)):
            bn = _ema_from_tensors(t, f"bn{i}", "bn")
            conv = _ema_from_tensors(t, f"conv{i}", "conv")
            self.bn_emas[i] = {k: (m.to(self.device), v.to(self.device)) for k, (m, v) in bn.items()} or None
            self.conv_emas[i] = {k: {s: v.to(self.device) for s, v in d.items()} for k, d in conv.items()} or None
        self.iteration = int(meta["iteration"])
        return True

    # -- one iteration -------------------------------------------------------------------------
    def choose_backbone(self) -> int:
        k = len(self.slots)
        if k == 1:
            return 0
        if self.args.syn_backbone_choice == "round_robin":
            return self.iteration % k
        return int(torch.randint(k, (1,), generator=self.generator))

    def step(self) -> None:
        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(args.syn_lr, self.iteration, args.syn_iterations)
        k = self.choose_backbone()
        self.teachers_used.add(k)
        slot = self.slots[k]
        x = self.x
        if args.syn_augment:
            params = sample_crop_flip(
                len(self.job), self.spec.image_size, self.spec.image_size,
                scale=tuple(args.syn_crop_scale), generator=self.generator,
            ).to(self.device)
            x = apply_crop_flip(x, params, self.spec.image_size)
        if args.syn_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16 if args.syn_mixed_precision == "bf16" else torch.float16)
            if args.syn_mixed_precision in ("bf16", "fp16")
            else nullcontext()
        )
        for other in self.slots:
            other.hooks.enabled = other is slot
        with autocast:
            logits = slot.model(x)
        ce = F.cross_entropy(logits.float(), self.labels)
        zero = ce.new_zeros(())
        bn = conv = dd = zero
        if args.syn_r_bn > 0:
            bn, self.bn_emas[k] = bn_matching_loss(
                slot.hooks.bn_stats, slot.bn_targets, self.bn_emas[k], alpha=args.syn_alpha, layer_weights=slot.bn_weights
            )
        if args.syn_r_conv > 0:
            conv, self.conv_emas[k], _ = conv_matching_loss(
                slot.hooks.conv_stats, slot.conv_targets, self.conv_emas[k], alpha=args.syn_alpha,
                beta_dr=args.syn_beta_dr, generator=self.generator, layer_weights=slot.conv_weights,
            )
        if args.syn_dd:
            try:
                dd = data_densification_loss(
                    x.float(), self.labels, tau=args.syn_dd_tau, pool_size=args.syn_dd_pool_size
                )
            except torch.linalg.LinAlgError as err:  # eigvalsh on NaN pixels: an earlier step diverged
                if bool(torch.isfinite(x).all()):
                    raise
                raise self.non_finite_error("pixels, seen by the DD eigenvalues") from err
        loss = args.syn_ce_weight * ce + args.syn_r_bn * bn + args.syn_r_conv * conv + args.syn_dd_weight * dd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.x.clamp_(self.low, self.high)
            self.sums += torch.stack([loss.detach(), ce.detach(), bn.detach(), conv.detach(), dd.detach()]).float()
        self.sums_count += 1
        slot.hooks.clear()
        self.iteration += 1

    def non_finite_error(self, what: str) -> NonFiniteLossError:
        where = (
            f"the last good checkpoint {self.ckpt_path} (iteration of its metadata) is kept"
            if self.ckpt_path.exists()
            else "no checkpoint was written yet"
        )
        return NonFiniteLossError(
            f"Synthesis job {self.job.index} hit a non-finite loss ({what}) before iteration {self.iteration}; "
            f"{where}. Lower syn_lr (now {self.args.syn_lr}) or the loss weights, or disable "
            "syn_mixed_precision, then rerun: the run resumes from that checkpoint."
        )

    def flush_components(self) -> dict[str, float]:
        """Mean loss components since the last flush (one host sync). Raises on NaN/inf."""
        values = (self.sums / max(self.sums_count, 1)).tolist()
        self.sums.zero_()
        self.sums_count = 0
        comps = dict(zip(LOSS_COMPONENTS, values))
        bad = [k for k, v in comps.items() if not math.isfinite(v)]
        if bad or not bool(torch.isfinite(self.x).all()):
            raise self.non_finite_error(", ".join(bad) or "pixels")
        record = {"iteration": self.iteration, **comps, "teachers_used": sorted(self.teachers_used)}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.teachers_used = set()
        return comps


def _init_from_real(
    job: SynthesisJob, real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, seed: int
) -> torch.Tensor:
    images, labels = real
    out = []
    for c in job.classes:
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            raise GVBSMError(f"syn_init='real' needs real images of class {c}, found none.")
        g = torch.Generator().manual_seed(_job_seed(seed, 10_000 + c))
        perm = idx[torch.randperm(len(idx), generator=g)]
        picks = [perm[s % len(perm)] for s in job.slots]
        out.append(images[torch.stack(picks)])
    return spec.normalize(torch.cat(out))


def random_real_subset(real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, ipc: int, seed: int) -> SyntheticSet:
    """The "random real subset" baseline: ``ipc`` real images per class, class-balanced, seeded."""
    images, labels = real
    idx = torch.tensor(class_balanced_indices(labels.tolist(), n_per_class=ipc, seed=seed), dtype=torch.long)
    order = torch.argsort(labels[idx] * (len(idx) + 1) + torch.arange(len(idx)))
    idx = idx[order]
    lab = labels[idx]
    slots = torch.zeros_like(lab)
    for c in lab.unique():
        m = lab == c
        slots[m] = torch.arange(int(m.sum()))
    return SyntheticSet(spec.normalize(images[idx]), lab, slots, torch.zeros_like(lab), "random_real", {"ipc": ipc, "seed": seed})


def recover(
    teachers: Sequence[nn.Module],
    statistics: Sequence[TeacherStatistics | None],
    spec: DatasetSpec,
    args: SynthesisArguments,
    *,
    stats_args: StatisticsArguments | None = None,
    accelerator: Accelerator | None = None,
    output_dir: str | Path,
    real_train: tuple[torch.Tensor, torch.Tensor] | None = None,
    stop_after_iterations: int | None = None,
) -> SyntheticSet | None:
    """Synthesise the distilled set (SPEC "Recover"); resumable, sharded over processes.

    Args:
        teachers: candidate backbones (normalised input -> logits), eval mode is enforced.
        statistics: per-teacher recorded Conv statistics (Eq. 9), ``None`` allowed when
            ``syn_r_conv == 0``.
        real_train: uint8 images and labels, needed for ``syn_init='real'`` and ``random_real``.
        stop_after_iterations: stop every job after this many iterations *in this call* (used to
            simulate a killed run in tests); returns ``None`` when stopped early.

    Returns the :class:`SyntheticSet` on every process (all jobs gathered through the files).
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    stats_args = stats_args or StatisticsArguments()
    args, single_teacher = resolve_method(args)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.syn_method == "random_real":
        if real_train is None:
            raise GVBSMError("syn_method='random_real' needs the real train split (real_train).")
        return random_real_subset(real_train, spec, args.ipc, args.syn_seed)
    if len(teachers) == 0:
        raise GVBSMError("recover needs at least one teacher.")
    if len(statistics) != len(teachers):
        raise StatisticsMismatchError(f"Got {len(teachers)} teachers but {len(statistics)} statistics entries.")
    if args.syn_init == "real" and real_train is None:
        raise GVBSMError("syn_init='real' needs the real train split (real_train).")
    if args.syn_backbone_choice not in ("uniform", "round_robin"):
        raise GVBSMError(f"syn_backbone_choice must be 'uniform' or 'round_robin', got {args.syn_backbone_choice!r}.")
    pairs = list(zip(teachers, statistics))
    if single_teacher:
        pairs = pairs[:1]
    device = accelerator.device
    jobs = plan_jobs(spec.num_classes, args.ipc, args.syn_classes_per_batch, args.syn_slots_per_batch)
    my_jobs = [j for j in jobs if j.index % accelerator.num_processes == accelerator.process_index]
    config = dataclasses.asdict(args) | {"num_teachers": len(pairs), "num_jobs": len(jobs)}
    (folder / "jobs").mkdir(exist_ok=True)
    stopped_early = False
    with ExitStack() as stack:
        slots = [_TeacherSlot(t, s, args, stats_args, device, stack) for t, s in pairs]
        for job in my_jobs:
            runner = _JobRunner(
                job, slots, spec, args, device, folder / "jobs",
                _init_from_real(job, real_train, spec, args.syn_seed).to(device) if args.syn_init == "real" else None,
            )
            if runner.done_path.exists():
                continue
            resumed = runner.load_checkpoint()
            if resumed:
                logger.info(f"job {job.index}: resumed at iteration {runner.iteration}", main_process_only=False)
            bar = tqdm(
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
                    comps = runner.flush_components()  # the only host sync: every checkpoint interval
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
            save_file(final, str(runner.done_path), metadata={"seconds": f"{time.perf_counter() - t0:.2f}"})
            runner.ckpt_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if stopped_early:
        return None
    images, labels, slot_ids, job_ids = [], [], [], []
    for job in jobs:
        t = load_file(str(folder / "jobs" / f"job_{job.index:05d}.safetensors"))
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
