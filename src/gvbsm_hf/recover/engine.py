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
import json
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..record.statistics_file import augment_kind
from ..augment import synthesis_augment
from ..record.config import StatisticsArguments
from ..data import DatasetSpec
from ..errors import GVBSMError, NonFiniteLossError, StatisticsMismatchError
from ..hooks import StatisticsHooks
from ..losses import first_layer_weights
from ..methods import PROTOCOLS, SynthesisConfig, SynthesisProtocol, SynthesisStep, get_init, get_method, method_config
from ..record.statistics_file import TeacherStatistics
from ..synthetic_set import SyntheticSet
from ..utils import load_safetensors, save_safetensors, seeded_generator

logger = get_logger(__name__)


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


def as_method_config(args: SynthesisProtocol) -> SynthesisConfig:
    """The registered method's config: ``args`` itself, or built from recipe arguments
    (:func:`gvbsm_hf.methods.method_config` of ``args.syn_method``, as the main method)."""
    if isinstance(args, SynthesisConfig):
        return args
    return method_config(args.syn_method, args)


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


def cosine_lr(base_lr: float, iteration: int, total: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total`` iterations."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * iteration / max(total, 1)))


def stats_patch_mode(stats_args: StatisticsArguments, args: SynthesisConfig) -> str:
    """``stats_patch_mode``, or the synthesis protocol's when unset."""
    return stats_args.stats_patch_mode or PROTOCOLS[args.syn_protocol]["stats_patch_mode"]


def stats_augment_kind(stats_args: StatisticsArguments, syn_augment: str) -> str:
    """``stats_augment``, or the family of the synthesis augmentation when unset."""
    return stats_args.stats_augment or syn_augment


def check_statistics_fit(stats: TeacherStatistics, stats_args: StatisticsArguments, args: SynthesisConfig) -> None:
    """Recorded statistics must come from the recording augmentation family and patch mode this
    synthesis expects (docs/differences.md rows 2 and 6); raise :class:`StatisticsMismatchError`."""
    name = stats.provenance.get("teacher_name") or "a teacher"
    found = augment_kind(stats.provenance.get("augment", False))
    expected = stats_augment_kind(stats_args, args.syn_augment)
    if found != expected:
        raise StatisticsMismatchError(
            f"The statistics of {name} were recorded with augmentation {found!r}, but this synthesis expects "
            f"{expected!r} (syn_augment={args.syn_augment!r}, stats_augment={stats_args.stats_augment!r}). Record "
            "them again (`--redo record`), or set `stats_augment` explicitly to use statistics of another family.")
    mode = stats.provenance.get("patch_mode", "partial")
    if mode != stats_patch_mode(stats_args, args):
        raise StatisticsMismatchError(
            f"The statistics of {name} were recorded with stats_patch_mode {mode!r}, this synthesis uses "
            f"{stats_patch_mode(stats_args, args)!r}: record them again (`--redo record`).")


class _TeacherSlot:
    """A teacher prepared for synthesis: frozen, hooked, with its matching targets."""

    def __init__(
        self,
        teacher: nn.Module,
        stats: TeacherStatistics | None,
        args: SynthesisConfig,
        stats_args: StatisticsArguments,
        device: torch.device,
        stack: ExitStack,
    ) -> None:
        self.model = teacher.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if args.syn_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        use_conv = args.uses_conv()
        if use_conv and stats is None:
            raise StatisticsMismatchError(
                f"Method {args.syn_method!r} matches Conv statistics and needs recorded statistics for every "
                "teacher; run the record stage first (`--stages record recover`) or set syn_r_conv: 0."
            )
        use_class = args.uses_class_stats()
        if use_class and (stats is None or not stats.per_class):
            raise StatisticsMismatchError(
                f"syn_class_weight={getattr(args, 'syn_class_weight', None)} matches per-class statistics, which "
                "every teacher's statistics file must hold: set `stats_per_class: true` and run the record stage "
                "(`--redo record`), or set syn_class_weight: 1.")
        self.hooks = stack.enter_context(  # removed when the stack closes, also on errors
            StatisticsHooks(
                self.model,
                bn=args.uses_bn(),
                conv=use_conv,
                conv_target=stats_args.stats_conv_target,
                patch_size=stats_args.stats_patch_size,
                patch_mode=stats_patch_mode(stats_args, args),
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
            check_statistics_fit(stats, stats_args, args)
            for name in self._conv_layer_names():
                self.conv_targets[name] = {k: v.to(device) for k, v in stats.layers[name].items()}
        self._weights: dict[tuple[str, float], dict[str, float]] = {}
        self._class_all: tuple[dict, dict] | None = None
        self.class_bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_conv_targets: dict[str, dict[str, torch.Tensor]] = {}
        if use_class:
            assert stats is not None
            check_statistics_fit(stats, stats_args, args)
            need_bn = self.hooks.bn_layers if args.uses_bn() else []
            need_conv = self.hooks.conv_layers if use_conv else []
            missing = [n for n in need_bn if n not in (stats.class_bn or {})]
            missing += [n for n in need_conv if n not in (stats.class_conv or {})]
            if missing:
                raise StatisticsMismatchError(
                    f"The per-class statistics have no entry for layer(s) {missing[:3]} of this teacher; they were "
                    "recorded for another backbone. Re-run the record stage (`--redo record`).")
            self._class_all = (
                {n: (stats.class_bn[n]["mean"].to(device), stats.class_bn[n]["var"].to(device)) for n in need_bn},
                {n: {k: v.to(device) for k, v in stats.class_conv[n].items()} for n in need_conv},
            )
            self._class_counts = stats.class_counts

    def set_job_classes(self, classes: Sequence[int], slots_per_class: int) -> None:
        """Per-class matching of a job (class-major batch, ``slots_per_class`` images per class): the hooks
        compute per-class statistics of the batch and the targets are the rows of ``classes``."""
        if self._class_all is None:
            return
        empty = [c for c in classes if float(self._class_counts[c]) <= 0]
        if empty:
            raise StatisticsMismatchError(
                f"The per-class statistics hold no image of class(es) {empty[:5]}: record them on a split with "
                "every class (raise stats_max_samples).")
        local = torch.arange(len(classes)).repeat_interleave(int(slots_per_class))
        self.hooks.set_class_labels(local, len(classes))
        rows = torch.tensor(list(classes), dtype=torch.long)
        bn_all, conv_all = self._class_all
        self.class_bn_targets = {n: (m[rows.to(m.device)], v[rows.to(v.device)]) for n, (m, v) in bn_all.items()}
        self.class_conv_targets = {n: {k: v[rows.to(v.device)] for k, v in st.items()} for n, st in conv_all.items()}

    def layer_weights(self, kind: str, multiplier: float) -> dict[str, float]:
        """Per-layer weights of the ``"bn"`` or ``"conv"`` terms: ``multiplier`` on the first layer."""
        key = (kind, float(multiplier))
        if key not in self._weights:
            names = list(self.bn_targets if kind == "bn" else self.conv_targets)
            self._weights[key] = first_layer_weights(names, multiplier)
        return self._weights[key]

    def _conv_layer_names(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]


def _flatten_state(prefix: str, value: object, out: dict[str, torch.Tensor]) -> None:
    """Nested dicts / tuples of tensors -> ``{"prefix|key|#0": tensor}`` (checkpoint keys)."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().contiguous()
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten_state(f"{prefix}|{k}", v, out)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _flatten_state(f"{prefix}|#{i}", v, out)
    elif value is not None:
        raise GVBSMError(f"Method state {prefix!r} holds a {type(value).__name__}; only tensors, dicts and tuples "
                         "are checkpointed.")


def _unflatten_state(tensors: dict[str, torch.Tensor], prefix: str, device: torch.device) -> dict:
    """Inverse of :func:`_flatten_state` for the keys under ``prefix``."""
    root: dict = {}
    for key, t in tensors.items():
        if not key.startswith(prefix + "|"):
            continue
        parts = key[len(prefix) + 1:].split("|")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = t.to(device)

    def fix(node):
        if not isinstance(node, dict):
            return node
        node = {k: fix(v) for k, v in node.items()}
        if node and all(k.startswith("#") for k in node):
            return tuple(node[f"#{i}"] for i in range(len(node)))
        return node

    return fix(root)


class _JobRunner:
    """Runs one job from its checkpoint (if any) to the end."""

    def __init__(
        self,
        job: SynthesisJob,
        slots: list[_TeacherSlot],
        spec: DatasetSpec,
        args: SynthesisConfig,
        device: torch.device,
        folder: Path,
        init_images: torch.Tensor | None,
        real_train: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.job, self.slots, self.spec, self.args, self.device = job, slots, spec, args, device
        self.loss_fn = get_method(args.syn_method).loss
        self.ckpt_path = folder / f"job_{job.index:05d}.ckpt.safetensors"
        self.done_path = folder / f"job_{job.index:05d}.safetensors"
        self.labels = job.labels.to(device)
        self.low, self.high = (b.to(device) for b in spec.pixel_bounds(device))
        self.generator = seeded_generator(args.syn_seed, "job", job.index)
        if init_images is None:
            x = torch.randn(len(job), spec.channels, spec.image_size, spec.image_size, generator=self.generator)
        else:
            x = init_images.clone()
        self.x = x.to(device).clamp_(self.low, self.high).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.x], lr=args.syn_lr, betas=tuple(args.syn_adam_betas))
        if args.uses_class_stats():
            for slot in slots:
                slot.set_job_classes(job.classes, len(job.slots))
        self.states: list[dict] = [{} for _ in slots]  # per teacher, owned by the method's loss
        self.job_state: dict = {}  # the whole job's, owned by the method's loss
        self.real_images, self.real_rows = None, []
        if args.real_batch_size() > 0:
            if real_train is None:
                raise GVBSMError(f"syn_method={args.syn_method!r} regresses on real images every iteration and needs "
                                 "the real train split (real_train).")
            self.real_images = real_train[0]
            labels = torch.as_tensor(real_train[1])
            for c in job.classes:
                rows = (labels == c).nonzero().flatten()
                if len(rows) == 0:
                    raise GVBSMError(f"syn_method={args.syn_method!r} needs real train images of class {c}, found none.")
                self.real_rows.append(rows)
        self.iteration = 0
        self.sums: dict[str, torch.Tensor] = {}
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
        for i, state in enumerate(self.states):
            _flatten_state(f"state|{i}", state, tensors)
        _flatten_state("job_state", self.job_state, tensors)
        tensors = {k: v.to("cpu") for k, v in tensors.items()}
        tmp = self.ckpt_path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"iteration": str(self.iteration), "job": str(self.job.index)})
        tmp.replace(self.ckpt_path)  # atomic: a kill never leaves a half-written checkpoint

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        t, meta = load_safetensors(self.ckpt_path, "recover", with_metadata=True)
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
        self.states = [_unflatten_state(t, f"state|{i}", self.device) for i in range(len(self.slots))]
        self.job_state = _unflatten_state(t, "job_state", self.device)
        self.iteration = int(meta["iteration"])
        return True

    # -- one iteration -------------------------------------------------------------------------
    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """``real_batch_size() // C`` (at least 1) random real train images of each of the job's ``C``
        classes (with replacement, the job's generator), normalised, class-major; ``(None, None)`` if the
        method asks for none."""
        if self.real_images is None:
            return None, None
        per_class = max(1, self.args.real_batch_size() // len(self.real_rows))
        rows = torch.cat([r[torch.randint(len(r), (per_class,), generator=self.generator)] for r in self.real_rows])
        labels = torch.tensor(self.job.classes, dtype=torch.long).repeat_interleave(per_class)
        return self.spec.normalize(self.real_images[rows]).to(self.device), labels.to(self.device)

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
        x = synthesis_augment(x, args.syn_augment, crop_scale=args.syn_crop_scale, generator=self.generator)
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
        real_x, real_labels = self.real_batch()
        step = SynthesisStep(config=args, x=x, logits=logits, labels=self.labels, teacher=slot,
                             state=self.states[k], generator=self.generator, iteration=self.iteration,
                             job_state=self.job_state, real_x=real_x, real_labels=real_labels,
                             teachers=tuple(s.model for s in self.slots), teacher_index=k)
        try:
            loss, components = self.loss_fn(step)
        except torch.linalg.LinAlgError as err:  # eigvalsh on NaN pixels: an earlier step diverged
            if bool(torch.isfinite(x).all()):
                raise
            raise self.non_finite_error("pixels, seen by the DD eigenvalues") from err
        self.optimizer.zero_grad(set_to_none=True)
        # only the pixels are optimised: a method's own differentiable tensors (e.g. feature_regression's
        # pool parameters) get no .grad from this pass, which skips their weight gradients
        loss.backward(inputs=[self.x])
        self.optimizer.step()
        with torch.no_grad():
            self.x.clamp_(self.low, self.high)
            for name, value in {"loss": loss, **components}.items():
                value = value.detach().float()
                self.sums[name] = self.sums[name] + value if name in self.sums else value
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
            f"{where}. Lower syn_lr (now {self.args.syn_lr}) or the loss weights, or disable syn_mixed_precision, "
            "and rerun the same command: the changed recipe restarts recover from iteration 0 with the new values "
            "(teachers and statistics are kept). Rerunning with the same values resumes from that checkpoint and "
            "will diverge again."
        )

    def flush_components(self) -> dict[str, float]:
        """Mean loss components since the last flush (one host sync). Raises on NaN/inf."""
        names = list(self.sums)
        values = (torch.stack([self.sums[n] for n in names]) / max(self.sums_count, 1)).tolist() if names else []
        self.sums = {}
        self.sums_count = 0
        comps = dict(zip(names, values))
        bad = [k for k, v in comps.items() if not math.isfinite(v)]
        if bad or not bool(torch.isfinite(self.x).all()):
            raise self.non_finite_error(", ".join(bad) or "pixels")
        record = {"iteration": self.iteration, **comps, "teachers_used": sorted(self.teachers_used)}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.teachers_used = set()
        return comps


def _initial_images(method, job: SynthesisJob, real_train, spec: DatasetSpec, args: SynthesisConfig,
                    device: torch.device, slots: Sequence[_TeacherSlot] = (), cache: dict | None = None
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
        slots = [_TeacherSlot(t, s, args, stats_args, device, stack) for t, s in pairs]
        for job in my_jobs:
            runner = _JobRunner(
                job, slots, spec, args, device, folder / "jobs",
                _initial_images(method, job, real_train, spec, args, device, slots, init_cache), real_train,
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
