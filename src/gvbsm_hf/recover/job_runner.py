"""One synthesis job from its checkpoint to the end (docs/method.md "Recover"): per iteration one
teacher (GBM, Eq. 7), the augmented batch, the method's loss, an Adam step on the pixels; every
``syn_checkpoint_every`` iterations the pixels, Adam moments, method state and RNG are saved."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..augment_families import apply_synthesis_augment, sample_synthesis_augment
from ..data import DatasetSpec
from ..errors import GVBSMError, NonFiniteLossError
from ..methods import SynthesisConfig, SynthesisStep, get_method
from ..utils import load_safetensors, seeded_generator, to_device_async
from .draws import IntervalDraws, IterationDraws, upload_batched
from .jobs import SynthesisJob, cosine_lr
from .teacher_slot import TeacherSlot


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
        # integer scalars are counters read by Python (e.g. a pool network's age): they stay on the CPU
        node[parts[-1]] = t if t.ndim == 0 and not t.is_floating_point() else t.to(device)

    def fix(node):
        if not isinstance(node, dict):
            return node
        node = {k: fix(v) for k, v in node.items()}
        if node and all(k.startswith("#") for k in node):
            return tuple(node[f"#{i}"] for i in range(len(node)))
        return node

    return fix(root)


def pixel_adam(x: torch.Tensor, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam on the pixels (docs/method.md "Recover"): fused (one kernel for the update), ``capturable`` where the
    device supports it, with a tensor learning rate beside the pixels, so no step reads a value back to Python."""
    fused = x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and x.device.type in ("cpu", "cuda")
    capturable = x.device.type == "cuda"
    lr_t = torch.tensor(float(lr), dtype=torch.float32, device=x.device if capturable else "cpu")
    if fused:
        return torch.optim.Adam([x], lr=lr_t, betas=betas, fused=True, capturable=capturable)
    return torch.optim.Adam([x], lr=lr_t, betas=betas, foreach=True)


class JobRunner:
    """Runs one job from its checkpoint (if any) to the end."""

    def __init__(
        self,
        job: SynthesisJob,
        slots: list[TeacherSlot],
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
        self.optimizer = pixel_adam(self.x, args.syn_lr, tuple(args.syn_adam_betas))
        if args.uses_class_stats():
            for slot in slots:
                slot.set_job_classes(job.classes, len(job.slots))
        self.states: list[dict] = [{} for _ in slots]  # per teacher, owned by the method's loss
        self.job_state: dict = {}  # the whole job's, owned by the method's loss
        self.real_images, self.real_rows, self.real_labels = None, [], None
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
        self.draw_fn = getattr(self.loss_fn, "draw", None)
        if args.syn_compile:
            not_compilable = getattr(self.loss_fn, "not_compilable", None)
            why = ("does not declare its random draws (loss.draw, gvbsm_hf.methods.SynthesisStep)" if self.draw_fn is None
                   else not_compilable(args) if not_compilable is not None else None)
            if why:
                raise GVBSMError(f"syn_compile: the loss of method {args.syn_method!r} {why}, so it cannot be "
                                 "compiled; set syn_compile: false.")
        self.compiled: dict[int, object] = {}
        self.plan: IntervalDraws | None = None

    # -- checkpointing -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = self.optimizer.state[self.x]
        tensors = {"x": self.x.detach().contiguous(), "rng": self.rng_state()}
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
        self.plan = None
        if "exp_avg" in t:
            fused = bool(self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable"))
            self.optimizer.state[self.x] = {  # fused / capturable Adam keeps its step count beside the pixels
                "step": t["adam_step"].reshape(()).float().to(self.device if fused else "cpu"),
                "exp_avg": t["exp_avg"].to(self.device),
                "exp_avg_sq": t["exp_avg_sq"].to(self.device),
            }
        self.states = [_unflatten_state(t, f"state|{i}", self.device) for i in range(len(self.slots))]
        self.job_state = _unflatten_state(t, "job_state", self.device)
        self.iteration = int(meta["iteration"])
        return True

    # -- the draws ---------------------------------------------------------------------------------
    @property
    def predraws(self) -> bool:
        """Whether a whole checkpoint interval is drawn ahead: the method's loss declares its draws (``loss.draw``)."""
        return self.draw_fn is not None

    def rng_state(self) -> torch.Tensor:
        """The job generator's state before this iteration's draws (what a checkpoint stores)."""
        if self.plan is not None and self.plan.covers(self.iteration):  # drawn ahead: the state kept before it
            return self.plan.rng_state(self.iteration)
        return self.generator.get_state()

    def choose_backbone(self, iteration: int) -> int:
        k = len(self.slots)
        if k == 1:
            return 0
        if self.args.syn_backbone_choice == "round_robin":
            return iteration % k
        return int(torch.randint(k, (1,), generator=self.generator))

    def draw_real_rows(self) -> torch.Tensor | None:
        """``real_batch_size() // C`` (at least 1) random rows of each of the job's ``C`` classes of the real
        train split (with replacement, the job's generator), class-major; ``None`` if the method asks for none."""
        if self.real_images is None:
            return None
        per_class = max(1, self.args.real_batch_size() // len(self.real_rows))
        return torch.cat([r[torch.randint(len(r), (per_class,), generator=self.generator)] for r in self.real_rows])

    def draw_loss(self, k: int, iteration: int, scratch: dict) -> dict | None:
        """The method's draws of step ``iteration`` with teacher ``k`` (``loss.draw``); ``None`` while they need
        the teacher's statistics layout, which its first step makes. A compiled step needs them at once: a
        probe forward without graph (no draw) gives the layout."""
        slot = self.slots[k]
        draw = lambda: self.draw_fn(self.args, slot, self.generator, iteration=iteration,  # noqa: E731
                                    job_state=self.job_state, scratch=scratch)
        draws = draw()
        if draws is None and self.args.syn_compile:
            for other in self.slots:
                other.hooks.enabled = other is slot
            with torch.no_grad(), self.autocast():
                slot.model(self.x.detach())
            draws = draw()
            slot.hooks.clear()
            if draws is None:
                raise GVBSMError(f"The loss of method {self.args.syn_method!r} could not make its draws after a probe "
                                 f"forward of teacher {k}.")
        return draws

    def draw_interval(self) -> IntervalDraws:
        """The draws from this iteration to the next checkpoint (:mod:`gvbsm_hf.recover.draws`), tensors uploaded
        at once; this iteration's alone when the loss draws inside (:attr:`predraws` false), and up to the first
        step of a teacher whose loss draws need its own forward (that step draws inside, then intervals go on)."""
        args, start = self.args, self.iteration
        every = args.syn_checkpoint_every
        stop = min(args.syn_iterations, (start // every + 1) * every)
        n, _, h, w = self.x.shape
        states, backbones, rows, uploads, scratch = [], [], [], [], {}
        for iteration in range(start, stop):
            state = self.generator.get_state()
            k = self.choose_backbone(iteration)
            augment = sample_synthesis_augment(args.syn_augment, n, h, w, crop_scale=args.syn_crop_scale,
                                               generator=self.generator)
            real_rows = self.draw_real_rows()
            loss = self.draw_loss(k, iteration, scratch) if self.predraws else None
            if loss is None and iteration > start:  # its loss draws inside: it comes first in the next interval
                self.generator.set_state(state)
                break
            states.append(state)
            backbones.append(k)
            rows.append(real_rows)
            uploads.append({f"augment/{key}": v for key, v in augment.items()}
                           | ({f"loss/{key}": v for key, v in loss.items()} if loss is not None else {"loss": None}))
            if loss is None:  # the step draws inside its loss, after these: nothing may be drawn before it runs
                break
        items = []
        for k, r, placed in zip(backbones, rows, upload_batched(uploads, self.device)):
            augment = {key.split("/", 1)[1]: v for key, v in placed.items() if key.startswith("augment/")}
            loss = None if "loss" in placed else {key.split("/", 1)[1]: v for key, v in placed.items()
                                                   if key.startswith("loss/")}
            items.append(IterationDraws(backbone=k, augment=augment, real_rows=r, loss=loss))
        return IntervalDraws(start=start, items=items, rng_states=states)

    # -- one iteration -------------------------------------------------------------------------
    def real_batch(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The real train images of ``rows`` (:meth:`draw_real_rows`), normalised, on the device (pinned,
        non-blocking), with their labels; ``(None, None)`` without rows."""
        if rows is None:
            return None, None
        if self.real_labels is None:  # the same every iteration: uploaded once
            per_class = len(rows) // len(self.real_rows)
            labels = torch.tensor(self.job.classes, dtype=torch.long).repeat_interleave(per_class)
            self.real_labels = labels.to(self.device)
        return to_device_async(self.spec.normalize(self.real_images[rows]), self.device), self.real_labels

    def step(self) -> None:
        args = self.args
        if self.plan is None or not self.plan.covers(self.iteration):
            self.plan = self.draw_interval()
        draws = self.plan.at(self.iteration)
        for group in self.optimizer.param_groups:  # a tensor: filled in place, no new graph constant
            group["lr"].fill_(cosine_lr(args.syn_lr, self.iteration, args.syn_iterations))
        k = draws.backbone
        self.teachers_used.add(k)
        slot = self.slots[k]
        x = apply_synthesis_augment(self.x, args.syn_augment, draws.augment)
        if args.syn_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for other in self.slots:
            other.hooks.enabled = other is slot
        real_x, real_labels = self.real_batch(draws.real_rows)
        try:
            if args.syn_compile:  # forward, statistics and loss as one graph, its draws made ahead
                loss, components = self.compiled_step(k)(x, draws.loss, real_x, real_labels)
            else:
                loss, components = self.forward_loss(k, x, draws.loss, real_x, real_labels)
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

    def autocast(self):
        args = self.args
        if args.syn_mixed_precision not in ("bf16", "fp16"):
            return nullcontext()
        return torch.autocast(self.device.type,
                              dtype=torch.bfloat16 if args.syn_mixed_precision == "bf16" else torch.float16)

    def forward_loss(self, k: int, x: torch.Tensor, draws: dict | None, real_x: torch.Tensor | None = None,
                     real_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher ``k``'s forward of the augmented batch ``x`` (its hooks record the statistics) and the
        method's loss: the per-teacher step that ``syn_compile`` compiles. With ``draws`` (made ahead) the loss
        gets no generator; compiled, it gets iteration 0 (the number is no input, so the graph never
        recompiles)."""
        slot = self.slots[k]
        with self.autocast():
            logits = slot.model(x)
        step = SynthesisStep(config=self.args, x=x, logits=logits, labels=self.labels, teacher=slot,
                             state=self.states[k], generator=self.generator if draws is None else None,
                             iteration=0 if self.args.syn_compile else self.iteration, job_state=self.job_state,
                             real_x=real_x,
                             real_labels=real_labels, teachers=tuple(s.model for s in self.slots), teacher_index=k,
                             group_size=len(self.job.slots), draws=draws)
        return self.loss_fn(step)

    compile_backend = "inductor"
    """``torch.compile`` backend of ``syn_compile`` (tests use ``"aot_eager"``: no C compiler, fullgraph alike)."""

    def compiled_step(self, k: int):
        """:meth:`forward_loss` of teacher ``k`` compiled with ``fullgraph=True`` (one per teacher, built once)."""
        if k not in self.compiled:
            self.compiled[k] = torch.compile(
                lambda x, draws, real_x, real_labels: self.forward_loss(k, x, draws, real_x, real_labels),
                fullgraph=True, backend=self.compile_backend)
        return self.compiled[k]

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
