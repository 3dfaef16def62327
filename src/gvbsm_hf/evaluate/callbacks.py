"""Trainer callbacks of the student: the EMA of EDC, the exact resume of a killed run, and its
output when the output is not a terminal (:func:`quiet_trainer_output`).

Both work through the public ``transformers`` callback API only (``TrainerCallback`` events,
``TrainerControl`` flags, ``TrainerState`` fields and ``ExportableState``, whose state the Trainer
itself writes into every checkpoint's ``trainer_state.json``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather
from torch import nn
from torch.optim.swa_utils import AveragedModel
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_torch_xla_available

from ..errors import GVBSMError
from ..progress import NON_TTY_INTERVAL, bar_mode
from ..utils import load_safetensors, save_safetensors

logger = get_logger(__name__)

__all__ = ["EMA_STATE_FILE", "ExactResumeCallback", "StudentEMACallback", "ThrottledLogCallback", "quiet_trainer_output"]

EMA_STATE_FILE = "gvbsm_student_ema.safetensors"  # in each checkpoint: the student EMA (student_ema_decay)


def _ema_update(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """``multi_avg_fn`` of ``AveragedModel``: ``ema = d * ema + (1 - d) * w`` for float tensors
    (in place, in that order of operations), a copy for integer buffers (``num_batches_tracked``)."""

    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        for e, w in zip(ema, current):
            if e.is_floating_point():
                e.mul_(decay).add_(w.to(e.dtype), alpha=1.0 - decay)
            else:
                e.copy_(w)

    return update


class StudentEMACallback(TrainerCallback):
    """An exponential moving average of the student (EDC; ``student_ema_decay = d``; docs/method.md
    "Beyond G-VBSM", Student EMA).

    The EMA is a ``torch.optim.swa_utils.AveragedModel`` over parameters and buffers. At
    ``on_train_begin`` it starts as a copy of the weights training starts from, or, when
    :attr:`resume_from` names a checkpoint (set by ``GVBSMTrainer.train``), as the EMA saved there
    (``gvbsm_student_ema.safetensors``, written at every ``on_save``). After every optimizer step
    (``on_step_end``) every float entry becomes ``ema = d * ema + (1 - d) * w``; integer buffers are
    copied. ``GVBSMTrainer.evaluate`` evaluates the EMA weights (:meth:`swapped_into`).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise GVBSMError(f"student_ema_decay={decay} must lie in [0, 1).")
        self.decay = float(decay)
        self.averaged: AveragedModel | None = None
        self.resume_from: str | None = None

    @property
    def shadow(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights by ``state_dict`` key (``None`` before training)."""
        return None if self.averaged is None else self.averaged.module.state_dict()

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_update(self.decay), use_buffers=True)
        self.averaged.update_parameters(model)  # the first update copies: the EMA starts at the weights
        if self.resume_from is None:
            return
        path = os.path.join(self.resume_from, EMA_STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(f"{path} is missing: the student EMA restarts from the resumed weights.",
                           main_process_only=True)
            return
        saved = load_safetensors(path, "evaluate")
        with torch.no_grad():
            for k, v in self.shadow.items():
                v.copy_(saved[k].to(v.device))

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.averaged is not None:
            self.averaged.update_parameters(model)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.averaged is not None and args.should_save and os.path.isdir(folder):
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.shadow.items()},
                             os.path.join(folder, EMA_STATE_FILE))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the EMA weights inside, its own weights again after (bit for bit)."""
        live = model.state_dict()
        backup = {k: v.detach().clone() for k, v in live.items()}
        weights = self.shadow
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(weights[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(backup[k])


class ExactResumeCallback(TrainerCallback, ExportableState):
    """Makes a resumed student run end exactly like an uninterrupted one.

    *Running loss.* The Trainer restarts its running loss sums at 0 when it resumes, so its
    ``training_loss`` and logged ``loss`` would cover the resumed steps only. This callback keeps the
    same sums with the same arithmetic (a float32 sum on the device since the last log, drained into
    a float sum at every log): ``GVBSMTrainer.training_step`` feeds it (:meth:`add`) and
    ``GVBSMTrainer.log`` reports from it (:meth:`drain`, :meth:`train_loss`). As an
    ``ExportableState`` its sums are written into each checkpoint's ``trainer_state.json``
    (``stateful_callbacks``) by the Trainer and read back at ``on_train_begin`` of a resumed run.

    *Checkpoint timing.* A step checkpoint that falls on the last step of an epoch is moved after
    that epoch's own log / evaluation (``control.should_save`` off at ``on_step_end``, on again at
    ``on_epoch_end``), so that resuming from it keeps the end-of-epoch evaluation in the history.
    """

    def __init__(self) -> None:
        self.active = False  # between on_train_begin and on_train_end
        self.loss_since_log: torch.Tensor | None = None  # float32, this process: the Trainer's running loss
        self.logged_loss_sum = 0.0  # sum of the drained (process-averaged) running losses
        self.last_logged_step = 0
        self.first_step = 0  # the sums cover the steps after this one (0 unless resumed without them)
        self.deferred_save = False
        self.pending_by_process: list[float] | None = None  # every process's running loss at the next checkpoint

    # ---- ExportableState ---------------------------------------------------------------------
    def state(self) -> dict:
        pending = self.pending_by_process
        if pending is None:  # a checkpoint this callback did not see coming (save_strategy "best"): this process
            pending = [0.0 if self.loss_since_log is None else float(self.loss_since_log.item())]
        return {"args": {}, "attributes": {
            "pending_by_process": pending, "logged_loss_sum": self.logged_loss_sum,
            "last_logged_step": self.last_logged_step, "first_step": self.first_step,
        }}

    def _restore(self, saved: object, args) -> bool:
        attrs = saved.get("attributes") if isinstance(saved, dict) else None
        pending = attrs.get("pending_by_process") if isinstance(attrs, dict) else None
        if not isinstance(pending, list) or len(pending) != args.world_size:
            return False
        self.loss_since_log.fill_(float(pending[args.process_index]))
        self.logged_loss_sum = float(attrs["logged_loss_sum"])
        self.last_logged_step = int(attrs["last_logged_step"])
        self.first_step = int(attrs["first_step"])
        return True

    # ---- events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True
        self.loss_since_log = torch.tensor(0.0, device=args.device)
        self.logged_loss_sum, self.deferred_save, self.pending_by_process = 0.0, False, None
        self.last_logged_step = self.first_step = int(state.global_step)
        name = type(self).__name__
        if state.global_step > 0 and not self._restore(state.stateful_callbacks.get(name), args):
            logger.warning(f"The checkpoint at step {state.global_step} holds no running loss of this run: the "
                           "resumed training_loss averages the resumed steps only.", main_process_only=True)
        state.stateful_callbacks[name] = self.state()  # where the Trainer updates it at each checkpoint

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and float(state.epoch or 0.0).is_integer():  # the epoch's last step
            control.should_save, self.deferred_save = False, True
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.deferred_save:
            control.should_save, self.deferred_save = True, False
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        self.pending_by_process = None

    def _before_save(self, args, state, control) -> None:
        """Every process's running loss as the coming checkpoint will hold it (after the coming log)."""
        if not control.should_save or self.loss_since_log is None:
            return
        pending = self.loss_since_log
        if control.should_log and state.global_step > self.last_logged_step:
            pending = pending - pending  # what the log's reset leaves (0, or nan after a non-finite loss)
        self.pending_by_process = [float(v) for v in gather(pending.reshape(1)).cpu()]

    # ---- the running loss ----------------------------------------------------------------------
    def add(self, loss: torch.Tensor, args, state) -> None:
        """One micro-batch's loss (``Trainer.training_step``'s return), as the Trainer adds it."""
        if self.loss_since_log is None:
            return
        nonfinite = args.logging_nan_inf_filter and not is_torch_xla_available() and (
            torch.isnan(loss) or torch.isinf(loss))
        if nonfinite:
            self.loss_since_log += self.loss_since_log / (1 + state.global_step - self.last_logged_step)
        else:
            self.loss_since_log += loss

    def drain(self, mean_over_processes: Callable[[torch.Tensor], float], global_step: int) -> float:
        """The ``loss`` of a log: the running loss averaged over processes and steps since the last log."""
        scalar = mean_over_processes(self.loss_since_log)
        self.loss_since_log -= self.loss_since_log
        loss = scalar / (global_step - self.last_logged_step)
        self.logged_loss_sum += scalar
        self.last_logged_step = global_step
        return loss

    def train_loss(self, global_step: int) -> float:
        """``training_loss``: every drained sum plus this process's rest, per optimizer step."""
        return (self.logged_loss_sum + self.loss_since_log.item()) / max(global_step - self.first_step, 0.001)


class ThrottledLogCallback(TrainerCallback):
    """transformers' ``PrinterCallback`` (one printed line per ``logging_steps``) throttled: at most
    one line every ``interval`` seconds, none in a run shorter than that."""

    def __init__(self, interval: float = NON_TTY_INTERVAL) -> None:
        self.interval = float(interval)
        self._last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._last = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        now = time.monotonic()
        if not state.is_local_process_zero or not logs or now - self._last < self.interval:
            return
        self._last = now
        values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
        print(f"student {getattr(args, 'student', '?')} seed {args.seed} step {state.global_step}/{state.max_steps}: "
              f"{values}", flush=True)


def quiet_trainer_output(trainer: Trainer) -> None:
    """The student Trainer's output in the mode of :func:`gvbsm_hf.progress.bar_mode`. Unless
    ``"live"``, the caller sets ``disable_tqdm`` (a non-result field: no fingerprint changes), and
    the ``PrinterCallback`` the Trainer then adds is replaced by :class:`ThrottledLogCallback`
    (``"throttled"``) or by nothing (``"off"``)."""
    mode = bar_mode()
    if mode == "live":
        return
    trainer.remove_callback(PrinterCallback)
    if mode == "throttled":
        trainer.add_callback(ThrottledLogCallback(NON_TTY_INTERVAL))
