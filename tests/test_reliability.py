"""Fail before compute, never silently, never torn (issue 18; docs/reliability.md has the table)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, make_teachers  # noqa: E402

from gvbsm_hf.errors import GVBSMError  # noqa: E402
from gvbsm_hf.pipeline import check_output_dir, check_process_count, output_dir_lock, run_pipeline  # noqa: E402
from gvbsm_hf.recipe import parse_recipe  # noqa: E402
from gvbsm_hf.utils import atomic_path, save_safetensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "digits" / "smoke.yaml"
DISTILL = REPO / "recipes" / "distill.py"


# ------------------------------------------------------------------------------ readable errors

def test_distill_prints_one_block_exits_3_and_keeps_the_traceback(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(DISTILL), "--config", str(SMOKE), "--output_dir", str(out),
                           "--syn_method", "random_real", "--method_args", '{"random_real": {"syn_alpha": 0.5}}'], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "gvbsm-hf stopped" in proc.stderr and "'syn_alpha' is not an option" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (out / "error.log").read_text()
    debug = subprocess.run([sys.executable, str(DISTILL), "--config", str(SMOKE), "--output_dir", str(out),
                            "--syn_method", "random_real", "--syn_alpha", "0.5", "--traceback"], capture_output=True,
                           text=True, timeout=120)
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def test_an_output_dir_that_is_a_file_is_refused_before_anything(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(GVBSMError, match="is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(GVBSMError, match="cannot be written"):
        check_output_dir(f / "below")  # a folder under a file cannot be created


def test_a_full_disk_names_the_stage_and_loses_nothing(tmp_path, monkeypatch):
    import gvbsm_hf.record.stage as record_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_mod.RecordStage, "run", full)
    recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--teacher_epochs", "1",
                           "--max_train_samples", "200", "--stages", "squeeze", "record"])
    with pytest.raises(GVBSMError, match="disk filled up during the record stage.*Nothing computed so far is lost"):
        run_pipeline(recipe)
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["squeeze"]["done"] and (tmp_path / "teachers" / "convnet32" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ atomic files

@pytest.mark.parametrize("cut", [0, 1, 7, 100, 10_000])
def test_a_write_killed_at_any_byte_leaves_the_previous_file_whole(tmp_path, cut):
    path = tmp_path / "synthetic.safetensors"
    save_safetensors({"x": torch.arange(4096.0)}, path)
    before = path.read_bytes()

    class Killed(BaseException):
        pass

    with pytest.raises(Killed):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"\0" * cut)
            raise Killed  # the writer dies after `cut` bytes
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("stage, make", [("recover", "synthetic"), ("record", "statistics"), ("squeeze", "teacher")])
def test_a_torn_artefact_names_the_file_and_the_redo(tmp_path, stage, make):
    if make == "synthetic":
        from gvbsm_hf.synthetic_set import SyntheticSet

        syn = SyntheticSet(torch.zeros(4, 1, 4, 4), torch.arange(4), torch.zeros(4, dtype=torch.long),
                           torch.zeros(4, dtype=torch.long), "gvbsm")
        path = syn.save(tmp_path)
        load = lambda: SyntheticSet.load(tmp_path)  # noqa: E731
    elif make == "statistics":
        from gvbsm_hf.record.statistics_file import TeacherStatistics, load_statistics, save_statistics

        layer = {k: torch.rand(3) for k in ("channel_mean", "channel_var", "patch_mean", "patch_var")}
        path = save_statistics(TeacherStatistics(layers={"c": layer}, provenance={"patch_size": 4}),
                               tmp_path / "t.safetensors")
        load = lambda: load_statistics(path)  # noqa: E731
    else:
        from gvbsm_hf.teacher import TeacherModel, load_teacher

        TeacherModel.from_backbone("convnet32", SPEC).save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
        load = lambda: load_teacher(tmp_path)  # noqa: E731
    data = path.read_bytes()
    for cut in (3, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(GVBSMError, match=rf"damaged or incomplete.*--redo {stage}"):
            load()


# ------------------------------------------------------------------------------ lock

def test_a_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from gvbsm_hf.pipeline import output_dir_lock
        with output_dir_lock(Path({str(tmp_path)!r}), True):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path)])
        t0 = time.perf_counter()
        with pytest.raises(GVBSMError, match=rf"in use by another gvbsm-hf run \(pid {holder.pid}\)"):
            run_pipeline(recipe)
        assert time.perf_counter() - t0 < 10
        assert not (tmp_path / "teachers").exists()
    finally:
        holder.kill()
        holder.wait()
    with output_dir_lock(tmp_path, True):  # released by the holder's death
        pass


# ------------------------------------------------------------------------------ processes

def test_a_launch_with_another_process_count_is_stopped(monkeypatch, caplog):
    with pytest.raises(GVBSMError, match="num_processes: 2 but the launcher started 1.*--multi_gpu"):
        check_process_count(1, 2, logger=None)
    check_process_count(2, 2, logger=None)

    class Log:
        messages: list[str] = []

        def warning(self, m):
            self.messages.append(m)

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    log = Log()
    check_process_count(1, None, log)
    assert log.messages and "ONE process runs" in log.messages[0]


# ------------------------------------------------------------------------------ health check

def test_the_health_check_trips_on_a_diverged_set_and_accepts_on_request(tmp_path):
    from gvbsm_hf.stage import StageContext
    from gvbsm_hf.recover.stage import RecoverStage, synthesis_health
    from gvbsm_hf.synthetic_set import SyntheticSet

    torch.manual_seed(0)
    teachers = make_teachers(1, epochs=2)
    labels = torch.arange(10).repeat_interleave(3)
    diverged = SyntheticSet(torch.full((30, 1, 16, 16), 50.0), labels, labels * 0, labels * 0, "gvbsm")
    health = synthesis_health(diverged, teachers, SPEC, torch.device("cpu"))
    assert not health["healthy"] and health["ensemble_ce"] >= health["chance_ce"]
    from synthesis_setup import digits_uint8

    images, real_labels = digits_uint8()
    real = SyntheticSet(SPEC.normalize(images[:200]), real_labels[:200], real_labels[:200] * 0, real_labels[:200] * 0,
                        "gvbsm")
    assert synthesis_health(real, teachers, SPEC, torch.device("cpu"))["healthy"]

    class Acc:
        device = torch.device("cpu")
        is_main_process = True

    class Log:
        def warning(self, m):
            self.last = m

    for accept in (False, True):
        recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path / str(accept)),
                               "--accept_unhealthy_synthesis", str(accept).lower()])
        ctx = StageContext(recipe=recipe, accelerator=Acc(), output_dir=tmp_path / str(accept), cache=None,
                           dataset=None, spec=SPEC, logger=Log(), synthetic={"gvbsm": diverged})
        if accept:
            RecoverStage().check_health(ctx, "gvbsm", teachers)
            assert "accept_unhealthy_synthesis: true" in ctx.logger.last
        else:
            with pytest.raises(GVBSMError, match="looks diverged.*accept_unhealthy_synthesis"):
                RecoverStage().check_health(ctx, "gvbsm", teachers)
        assert json.loads((tmp_path / str(accept) / "recover" / "gvbsm" / "health.json").read_text())["healthy"] is False


def test_dropping_a_teacher_keeps_the_others(tmp_path):
    fast = ["--config", str(SMOKE), "--output_dir", str(tmp_path), "--teacher_epochs", "1", "--max_train_samples",
            "300", "--stats_max_samples", "200", "--stages", "squeeze", "record"]
    run_pipeline(parse_recipe(fast + ["--teachers", "convnet32", "convnet32_d2"]))
    kept = [tmp_path / "teachers" / "convnet32" / "model.safetensors", tmp_path / "statistics" / "convnet32.safetensors"]
    before = {p: p.stat().st_mtime_ns for p in kept}
    run_pipeline(parse_recipe(fast + ["--teachers", "convnet32"]))
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # neither retrained nor re-recorded
    # an explicit --redo still recomputes
    run_pipeline(parse_recipe(fast + ["--teachers", "convnet32", "--redo", "squeeze"]))
    assert kept[0].stat().st_mtime_ns != before[kept[0]]


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(tmp_path):
    fast = ["--config", str(SMOKE), "--output_dir", str(tmp_path), "--teacher_epochs", "1", "--max_train_samples",
            "300", "--stats_max_samples", "200", "--ipc", "1", "--syn_iterations", "4", "--num_train_epochs", "1",
            "--eval_seeds", "0", "--baselines", "gvbsm", "--accept_unhealthy_synthesis", "true"]
    summary = run_pipeline(parse_recipe(fast))
    folder = Path(summary["dataset_folder"])
    stale = folder.parent / f".{folder.name}.tmp-999-deadbeef"  # what a kill during export leaves
    stale.mkdir()
    (stale / "README.md").write_text("half")
    run_pipeline(parse_recipe(fast + ["--redo", "export"]))
    assert not stale.exists() and (folder / "README.md").exists()
