"""Progress bars and logs (gvbsm_hf.progress): live in a terminal, throttled in a log file, off with
GVBSM_HF_DISABLE_PROGRESS_BARS=1; a whole run written to a file has a few lines per stage."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub.utils
import pytest
from huggingface_hub import DatasetCard

from gvbsm_hf import progress
from gvbsm_hf.pipeline_config import STAGES

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "digits" / "smoke.yaml"
DISTILL = REPO / "recipes" / "distill.py"
SWITCHES = (progress.DISABLE_ENV, progress.HF_HUB_ENV)
BAR_LINE = re.compile(r"it/s\]|s/it\]|\d+%\|")
TRAINER_LOG_LINE = re.compile(r"^\{'(loss|eval_|train_)")


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def no_switch(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_not_a_terminal_throttles_the_bar(no_switch):
    out = _Stream(tty=False)
    bar = progress.progress_bar(range(1000), file=out, desc="work")
    assert bar.mininterval == progress.NON_TTY_INTERVAL and bar.delay == progress.NON_TTY_INTERVAL
    assert bar.maxinterval >= bar.mininterval and not bar.disable
    for i in bar:
        if i % 100 == 0:
            bar.set_postfix(loss=i)  # an explicit refresh obeys the interval too
    assert out.getvalue() == ""  # a bar shorter than the interval prints nothing at all

    no_switch.setattr(progress, "NON_TTY_INTERVAL", 0.05)
    out = _Stream(tty=False)
    with progress.progress_bar(total=40, file=out, desc="slow") as bar:
        for _ in range(40):
            time.sleep(0.005)
            bar.update(1)
    updates = [s for s in re.split(r"[\r\n]", out.getvalue()) if "slow" in s]
    assert 1 <= len(updates) <= 8, updates  # ~0.2 s of work: a handful, not 40


def test_a_disabled_bar_takes_every_call(no_switch):
    """What a process other than the main one gets (``disable=True``): postfix, update and close do nothing."""
    out = _Stream(tty=False)
    bar = progress.progress_bar(total=5, file=out, desc="rank 1", disable=True)
    bar.set_postfix({"loss": "0.1"})
    bar.update(1)
    bar.set_description("still rank 1")
    bar.close()
    assert out.getvalue() == ""


def test_terminal_bar_is_live_and_the_switches_turn_it_off(no_switch):
    tty = _Stream(tty=True)
    bar = progress.progress_bar(range(3), file=tty)
    assert progress.bar_mode(tty) == "live" and not bar.disable
    assert bar.mininterval == 0.1 and bar.delay == 0  # tqdm's own defaults
    bar.close()

    no_switch.setenv(progress.DISABLE_ENV, "1")
    assert progress.bar_mode(tty) == "off" and progress.progress_bar(range(3), file=tty).disable
    no_switch.setenv(progress.DISABLE_ENV, "0")  # forced live, even in a file
    assert progress.bar_mode(_Stream(tty=False)) == "live"
    no_switch.delenv(progress.DISABLE_ENV)
    no_switch.setenv(progress.HF_HUB_ENV, "1")  # the Hub's switch, when ours is unset
    assert progress.bar_mode(tty) == "off"
    no_switch.setenv(progress.DISABLE_ENV, "0")
    assert progress.bar_mode(tty) == "live"  # ours wins


def test_library_bars_are_off_in_a_file_and_restored(no_switch):
    no_switch.setattr(progress, "is_terminal", lambda stream=None: False)
    before = (datasets.is_progress_bar_enabled(), huggingface_hub.utils.are_progress_bars_disabled())
    with progress.library_bars():
        if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None:
            assert not datasets.is_progress_bar_enabled()
    assert (datasets.is_progress_bar_enabled(), huggingface_hub.utils.are_progress_bars_disabled()) == before


def test_stage_done_line():
    assert progress.stage_done_line("recover", 192.4, {"methods": ["gvbsm", "random_real"]}) == \
        "recover: done in 3 min 12 s (gvbsm, random_real)"
    assert progress.stage_done_line("squeeze", 4, {"teachers": ["out/teachers/a", "out/teachers/b"]}) == \
        "squeeze: done in 4 s (2 teachers)"
    assert progress.stage_done_line("export", 3700, {"folder": "out/export/x"}) == "export: done in 1 h 01 min (folder x)"


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
    """The digits smoke recipe (tiny budget) through recipes/distill.py, stdout and stderr in a file."""
    tmp = tmp_path_factory.mktemp("file_run")
    out, log = tmp / "run", tmp / "run.log"
    cmd = [sys.executable, str(DISTILL), "--config", str(SMOKE), "--output_dir", str(out), "--teacher_epochs", "1",
           "--max_train_samples", "300", "--syn_iterations", "20", "--syn_checkpoint_every", "10",
           "--num_train_epochs", "2", "--eval_seeds", "0", "--logging_steps", "1", "--baselines", "none",
           "--accept_unhealthy_synthesis", "true"]  # 20 iterations: the health check may fail
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return out, text


def test_a_run_written_to_a_file_has_a_few_lines_per_stage(file_run):
    """No progress-bar line (the bars end within the interval), no dict per logging step, one
    summary line per stage."""
    _, text = file_run
    lines = [s for s in re.split(r"[\r\n]", text) if s.strip()]
    bars = [s for s in lines if BAR_LINE.search(s)]
    assert len(bars) <= 2 * len(STAGES), "\n".join(bars[:20])
    assert not [s for s in lines if TRAINER_LOG_LINE.match(s)], "the Trainer printed its logs"
    for stage in STAGES:
        done = re.compile(rf"^(\[RANK 0\] )?{stage}: done in ")  # accelerate's logger names the process
        assert sum(bool(done.match(s)) for s in lines) == 1, f"no summary line for {stage}:\n{text}"
    assert len(lines) < 40, text


def test_the_runs_card_header_holds_the_non_default_values_only(file_run):
    """The export stage passes the recipe defaults: the card's header lists what the run changed."""
    out, _ = file_run
    (card_path,) = (out / "export").glob("*/README.md")
    header = DatasetCard.load(card_path).data.to_dict()
    settings = header["settings"]
    assert header["method"] == "gvbsm" and header["ipc"] == 1
    assert settings["dataset_name"] == "digits" and settings["syn_iterations"] == 20
    assert settings["num_train_epochs"] == 2 and settings["eval_seeds"] == [0]
    assert not {"use_liger_kernel", "neftune_noise_alpha", "torch_compile_backend", "fsdp", "deepspeed",
                "hub_strategy", "logging_steps", "output_dir", "adam_beta1", "ipc"} & set(settings)
    assert len(settings) < 40
