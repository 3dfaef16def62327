"""Progress bars and the one summary line per stage (docs/reliability.md "Progress bars and logs").

:func:`progress_bar` is the package's only tqdm factory. Its mode (:func:`bar_mode`):

* ``"live"``: the output is a terminal (or a notebook): an ordinary tqdm bar;
* ``"throttled"``: the output is not a terminal (a log file, CI): at most one update every
  :data:`NON_TTY_INTERVAL` seconds per bar, and a bar that ends sooner prints nothing;
* ``"off"``: ``GVBSM_HF_DISABLE_PROGRESS_BARS=1`` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``, the
  Hub's switch, when ours is unset). ``GVBSM_HF_DISABLE_PROGRESS_BARS=0`` forces live bars.

The same mode quiets the bars of ``datasets`` / ``huggingface_hub`` during a run
(:func:`library_bars`) and the student Trainer's (``evaluate.callbacks.quiet_trainer_output``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Literal

import datasets
import huggingface_hub.constants
import huggingface_hub.utils
import tqdm.auto
import tqdm.autonotebook
import tqdm.std
from accelerate.logging import get_logger

DISABLE_ENV = "GVBSM_HF_DISABLE_PROGRESS_BARS"
"""Our switch: ``1`` turns every progress bar of a run off, ``0`` keeps them live in a log file too."""
HF_HUB_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
"""huggingface_hub's switch, honoured when ours is unset."""
NON_TTY_INTERVAL = 30.0
"""Seconds between two updates of one bar when the output is not a terminal."""
SUMMARY_LOGGER = "gvbsm_hf.progress"
"""The logger of the per-stage summary lines (INFO, shown by default: :func:`log_stage_done`)."""
_TRUE, _FALSE = {"1", "ON", "YES", "TRUE"}, {"0", "OFF", "NO", "FALSE"}

BarMode = Literal["live", "throttled", "off"]


def _env_flag(name: str) -> bool | None:
    """``True`` / ``False`` for a set boolean variable (HF's spellings), ``None`` when unset or unclear."""
    value = os.environ.get(name, "").strip().upper()
    return True if value in _TRUE else False if value in _FALSE else None


def is_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm writes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def bar_mode(stream: IO | None = None) -> BarMode:
    """``"off"``, ``"live"`` or ``"throttled"`` for bars written to ``stream`` (see the module doc)."""
    ours = _env_flag(DISABLE_ENV)
    if ours is True or (ours is None and _env_flag(HF_HUB_ENV) is True):
        return "off"
    notebook = tqdm.autonotebook.tqdm is not tqdm.std.tqdm  # tqdm.auto's widget in a notebook redraws in place
    return "live" if ours is False or notebook or is_terminal(stream) else "throttled"


class _ThrottledBar(tqdm.auto.tqdm):
    """A bar whose explicit refreshes (``set_postfix``, ``set_description``) obey ``delay`` and
    ``mininterval`` too, as its updates do."""

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> None:
        if self.disable:  # a disabled tqdm has no clock (start_t); its refresh draws nothing anyway
            return
        now = time.time()  # the clock of tqdm's start_t and last_print_t
        if now < self.start_t + self.delay or now - self.last_print_t < self.mininterval:
            return
        super().refresh(nolock=nolock, lock_args=lock_args)
        self.last_print_t = now


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm.std.tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` in the mode of :func:`bar_mode`: throttled to one
    update every :data:`NON_TTY_INTERVAL` s (``mininterval``, ``maxinterval`` and ``delay``, unless
    given) when the output is not a terminal, disabled when the switch is set."""
    mode = bar_mode(kwargs.get("file"))
    if mode == "throttled":
        for key in ("mininterval", "maxinterval", "delay"):
            kwargs.setdefault(key, NON_TTY_INTERVAL)
        return _ThrottledBar(iterable, disable=disable, **kwargs)
    return tqdm.auto.tqdm(iterable, disable=disable or mode == "off", **kwargs)


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """Within the block, the bars of ``datasets`` and ``huggingface_hub`` are off unless the mode
    is ``"live"`` (they cannot be throttled); restored afterwards. Their own environment switches
    (``HF_DATASETS_DISABLE_PROGRESS_BARS``, ``HF_HUB_DISABLE_PROGRESS_BARS``) keep priority."""
    turned_off = []
    if bar_mode() != "live":
        if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            turned_off.append(datasets.enable_progress_bars)
        if (huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS is None
                and not huggingface_hub.utils.are_progress_bars_disabled()):
            huggingface_hub.utils.disable_progress_bars()
            turned_off.append(huggingface_hub.utils.enable_progress_bars)
    try:
        yield
    finally:
        for enable in turned_off:
            enable()


class _DefaultHandler(logging.StreamHandler):
    """stderr, for the summary lines while the application has configured no logging (the root
    logger has no handler); silent once it has, so that a line is never printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _summary_logger():
    """accelerate's logger of the summary lines, at INFO with :class:`_DefaultHandler` (once)."""
    base = logging.getLogger(SUMMARY_LOGGER)
    if not any(isinstance(h, _DefaultHandler) for h in base.handlers):
        base.addHandler(_DefaultHandler())
        if base.level == logging.NOTSET:
            base.setLevel(logging.INFO)
    return get_logger(SUMMARY_LOGGER)


def format_seconds(seconds: float) -> str:
    """``"3 min 12 s"``, ``"1 h 02 min"``, ``"4 s"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _describe(info: Mapping[str, Any]) -> str:
    """A few words on what a stage returned (``stages.json`` info): counts of files, names of methods."""
    parts = []
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            if value and all(isinstance(v, str) and ("/" in v or os.sep in v) for v in value):
                parts.append(f"{len(value)} {key}")
            else:
                parts.append(", ".join(str(v) for v in value) or f"no {key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{value} {key}")
        elif isinstance(value, str):
            parts.append(f"{key} {os.path.basename(value.rstrip('/' + os.sep)) or value}")
    return "; ".join(parts)


def stage_done_line(stage: str, seconds: float, info: Mapping[str, Any] | None = None) -> str:
    """``"recover: done in 3 min 12 s (gvbsm, random_real)"``."""
    details = _describe(info or {})
    return f"{stage}: done in {format_seconds(seconds)}" + (f" ({details})" if details else "")


def log_stage_done(stage: str, seconds: float, info: Mapping[str, Any] | None = None) -> None:
    """Log :func:`stage_done_line` at INFO on the main process, shown by default (stderr) while the
    application configures no logging of its own."""
    _summary_logger().info(stage_done_line(stage, seconds, info))
