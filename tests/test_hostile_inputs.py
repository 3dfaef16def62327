"""Issue 34: what a hostile new user still broke. The bad-input table of docs/reliability.md is
re-run here row by row (it is read from the doc, so the two cannot drift apart)."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from transformers import Trainer

from gvbsm_hf import hub_utils
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.export import push as push_module
from gvbsm_hf.export.engine import export_distilled_dataset
from gvbsm_hf.export.loading import load_distilled_dataset
from gvbsm_hf.pipeline import (
    check_ipc,
    check_push_access,
    open_stage_cache,
    output_dir_lock,
    run_pipeline,
)
from gvbsm_hf.recipe import parse_recipe, recipe_to_dict
from gvbsm_hf.relabel.store import StoredSoftLabels
from gvbsm_hf.replay import StoredViews

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "digits" / "smoke.yaml"
DISTILL = REPO / "recipes" / "distill.py"
DOC = REPO / "docs" / "reliability.md"
TINY = ["--teacher_epochs", "1", "--max_train_samples", "300", "--stats_max_samples", "200", "--syn_iterations", "5",
        "--num_train_epochs", "2", "--eval_seeds", "0", "--baselines", "none", "--accept_unhealthy_synthesis", "true"]


def _distill_module():
    spec = importlib.util.spec_from_file_location("distill_cli", DISTILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(argv: list[str]) -> int:
    """``recipes/distill.py`` in this process; its exit code (argparse's SystemExit included)."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        return _distill_module().cli(argv)
    except SystemExit as stop:
        return int(stop.code)
    finally:
        signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------------------ the bad-input table


def bad_input_rows() -> list[tuple[str, str, int, list[str]]]:
    """(input, in, exit, message pieces) of the table under "## Bad inputs" in docs/reliability.md."""
    text = DOC.read_text()
    section = text[text.index("## Bad inputs"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        given, where, code, says = cells
        rows.append((given.strip("`"), where, int(code), re.findall(r"`([^`]+)`", says)))
    return rows


ROWS = bad_input_rows()


def test_the_bad_input_table_is_complete():
    """Every case of issue 34 that is refused before compute is a row of the table."""
    inputs = " ".join(r[0] for r in ROWS)
    for flag in ("--learning_rate -1", "--per_device_train_batch_size 0", "--num_train_epochs 0", '--output_dir ""',
                 "--eval_seeds none", "--ipcc", "learning_rate: fast", "--push_dataset true --dataset_repo_id",
                 "--teacher_repo_prefix", "--max_train_samples 50 --ipc 10", "syn_init"):
        assert flag in inputs, flag
    assert len(ROWS) >= 25 and all(r[3] for r in ROWS)


def _recipe_with(tmp_path: Path, line: str, append: bool) -> Path:
    key = line.split(":", 1)[0]
    lines = SMOKE.read_text().splitlines()
    if not append:
        lines = [x for x in lines if not x.startswith(f"{key}:")]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines + [line]) + "\n")
    return path


@pytest.mark.parametrize("given, where, code, says", ROWS, ids=[r[0][:60] for r in ROWS])
def test_bad_input_table(tmp_path, monkeypatch, capsys, given, where, code, says):
    cwd, out = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config, flags = SMOKE, []
    if where == "command line":
        flags = shlex.split(given)
    else:
        assert where in ("recipe", "recipe, appended"), where
        config = _recipe_with(tmp_path, given, append=where == "recipe, appended")
    t0 = time.perf_counter()
    got = _cli(["--config", str(config), "--output_dir", str(out), *flags])
    elapsed = time.perf_counter() - t0
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped at 100 columns
    assert got == code, err[-3000:]
    for piece in says:
        assert piece in err, (piece, err[-3000:])
    assert list(cwd.iterdir()) == []  # nothing written where the command ran
    assert not (out / "stages.json").exists() and not (out / "teachers").exists()  # no stage started
    assert elapsed < 60


# ------------------------------------------------------------------------------ recipes


def test_baselines_can_be_emptied_from_the_command_line_and_the_recipe(tmp_path):
    base = ["--config", str(SMOKE)]
    assert parse_recipe(base).pipeline.baselines == ["random_real"]
    for flags in (["--baselines", "none"], ["--baselines", "[]"], ["--baselines=none"], ["--baselines", "--ipc", "2"]):
        assert parse_recipe(base + flags).pipeline.baselines == [], flags
    assert parse_recipe(base + ["--redo", "none"]).pipeline.redo == []
    for value in ("[]", "none"):
        path = _recipe_with(tmp_path, f"baselines: {value}", append=False)
        assert parse_recipe(["--config", str(path)]).pipeline.baselines == []
    with pytest.raises(GVBSMError, match="eval_seeds is empty"):
        parse_recipe(base + ["--eval_seeds"])
    with pytest.raises(GVBSMError, match="eval_seeds is empty"):
        parse_recipe(["--config", str(_recipe_with(tmp_path, "eval_seeds: []", append=False))])


def test_a_number_written_1e_3_in_the_recipe_is_a_number(tmp_path):
    r = parse_recipe(["--config", str(_recipe_with(tmp_path, "learning_rate: 1e-3", append=False))])
    assert r.training.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize("flags, field", [
    (["--learning_rate", "-1"], "learning_rate"), (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--num_train_epochs", "0"], "num_train_epochs"), (["--num_train_epochs", "-2"], "num_train_epochs"),
])
def test_student_training_arguments_are_checked_at_parse_time(tmp_path, flags, field):
    t0 = time.perf_counter()
    with pytest.raises(GVBSMError, match=rf"\b{field}="):
        parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"), *flags])
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run").exists()
    parse_recipe(["--config", str(SMOKE), "--num_train_epochs", "0", "--max_steps", "5"])  # steps instead: fine


def test_the_exported_recipe_leaves_out_where_and_which_stages_it_ran(tmp_path):
    out = tmp_path / "abs" / "run"
    r = parse_recipe(["--config", str(SMOKE), "--output_dir", str(out), "--redo", "recover", "--stages", "recover",
                      "evaluate"])
    exported = recipe_to_dict(r)
    assert not {"output_dir", "redo", "stages", "run_name"} & set(exported)
    assert str(out) not in json.dumps(exported)
    assert recipe_to_dict(r, deny=())["redo"] == ["recover"]  # recipe.json (deny=SECRET_FIELDS) keeps them
    spec = DatasetSpec(name="digits", num_classes=2, image_size=8, channels=1, mean=(0.5,), std=(0.25,),
                       class_names=("a", "b"))
    folder = export_distilled_dataset(tmp_path / "ex", images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                                      labels=torch.tensor([0, 0, 1, 1]), spec=spec, method=exported)
    config = json.loads((folder / "gvbsm_config.json").read_text())
    card = (folder / "README.md").read_text()
    assert "redo" not in config and "output_dir" not in config and "stages" not in config
    assert str(out) not in card and "redo" not in card and str(tmp_path) not in card
    assert "--config gvbsm_config.json --output_dir <folder>" in card
    assert parse_recipe(["--config", str(folder / "gvbsm_config.json")]).pipeline.stages == list(
        parse_recipe(["--config", str(SMOKE)]).pipeline.stages)


# ------------------------------------------------------------------------------ ipc and class sizes


def test_ipc_above_the_class_sizes_only_warns_for_a_method_that_starts_from_noise(caplog):
    train = datasets.Dataset.from_dict({"label": [0, 0, 0, 1, 1]},
                                       features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])}))
    log = logging.getLogger("test-ipc")
    noise = parse_recipe(["--config", str(SMOKE), "--ipc", "3", "--baselines", "none"])
    with caplog.at_level(logging.WARNING, logger="test-ipc"):
        check_ipc(noise, train, ["a", "b"], log)
    assert "ipc=3" in caplog.text and "class 'b' has 2" in caplog.text and "'a'" not in caplog.text
    for flags in (["--baselines", "random_real"], ["--baselines", "rded"], ["--syn_method", "random_real"],
                  ["--method_args", '{"gvbsm": {"syn_init": "real"}}']):
        recipe = parse_recipe(["--config", str(SMOKE), "--ipc", "3", "--baselines", "none", *flags])
        with pytest.raises(GVBSMError, match=r"ipc=3.*class 'b' has 2.* needs 3 real images"):
            check_ipc(recipe, train, ["a", "b"], log)
    check_ipc(parse_recipe(["--config", str(SMOKE), "--ipc", "2"]), train, ["a", "b"], log)  # enough images


# ------------------------------------------------------------------------------ output folder


def test_an_empty_output_dir_is_refused_by_run_pipeline_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe(["--config", str(SMOKE)])
    recipe.training.output_dir = ""
    with pytest.raises(GVBSMError, match="output_dir is empty"):
        run_pipeline(recipe)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_second_run_writes_nothing_into_the_first_runs_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with output_dir_lock(out, True):  # the first run
        before = sorted(p.name for p in out.iterdir())
        assert _cli(["--config", str(SMOKE), "--output_dir", str(out)]) == 3
        assert sorted(p.name for p in out.iterdir()) == before
    assert "in use by another gvbsm-hf run" in capsys.readouterr().err and not (out / "error.log").exists()


# ------------------------------------------------------------------------------ Ctrl-C and SIGTERM

_STOPPED_IN = textwrap.dedent("""
    import importlib.util, signal, sys, time
    # as in a terminal: a shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler (the test hung when pytest itself ran in the background)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = importlib.util.spec_from_file_location("distill_cli", {distill!r})
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    from gvbsm_hf.pipeline import STAGE_REGISTRY

    def slow(ctx):
        print("running", flush=True)
        time.sleep(120)

    for name, stage in STAGE_REGISTRY.items():  # every stage instant, except the one stopped in
        stage.load = lambda ctx: None
        stage.run = slow if name == {stage!r} else (lambda ctx: {{}})
    sys.exit(distill.cli({argv!r}))
""")


@pytest.mark.parametrize("stage, sig, code", [("recover", signal.SIGINT, 130), ("evaluate", signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_print_one_line_naming_the_stage(tmp_path, stage, sig, code):
    out = tmp_path / "run"
    script = _STOPPED_IN.format(distill=str(DISTILL), stage=stage,
                                argv=["--config", str(SMOKE), "--output_dir", str(out), "--baselines", "none"])
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and f"in the {stage} stage" in said[0] and "run the same command to resume" in said[0]
    assert ("SIGTERM" if sig == signal.SIGTERM else "Ctrl-C") in said[0]
    assert "Traceback" in (out / "error.log").read_text()  # the traceback only in the log
    with output_dir_lock(out, True):  # released
        pass


# ------------------------------------------------------------------------------ pushes


def test_a_push_checks_the_token_can_write_before_compute(monkeypatch):
    monkeypatch.setattr(hub_utils, "offline_reason", lambda **kw: None)
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda *a, **kw: True)
    publish = parse_recipe(["--config", str(SMOKE), "--push_dataset", "true", "--dataset_repo_id", "me/x"]).publish
    role = {"value": "read"}

    class FakeApi:
        def whoami(self):
            if role["value"] is None:
                raise LocalTokenNotFoundError("Token is required")
            return {"name": "me", "auth": {"accessToken": {"role": role["value"]}}}

    monkeypatch.setattr("gvbsm_hf.pipeline.HfApi", FakeApi)
    with pytest.raises(GVBSMError, match="token of 'me' is read-only.*hf auth login"):
        check_push_access(publish)
    role["value"] = None
    with pytest.raises(GVBSMError, match="no valid Hugging Face token.*hf auth login"):
        check_push_access(publish)
    role["value"] = "write"
    check_push_access(publish)
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda *a, **kw: False)
    with pytest.raises(GVBSMError, match="is not reachable"):
        check_push_access(publish)


def test_a_teacher_push_uploads_only_the_model_files(tmp_path, monkeypatch):
    folder = tmp_path / "teachers" / "convnet32"
    model_files = ["README.md", "config.json", "model.safetensors", "gvbsm_squeeze.json"]
    training_files = ["checkpoints/step_10/optimizer.pt", "checkpoints/step_10/rng_state.pkl",
                      "checkpoints/step_10/trainer_state.json", "checkpoints/step_10/model.safetensors"]
    for name in model_files + training_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.update(kw)

    monkeypatch.setattr(push_module.hub_utils, "offline_reason", lambda **kw: None)
    monkeypatch.setattr(push_module.hub_utils, "hub_reachable", lambda *a, **kw: True)
    monkeypatch.setattr(push_module, "HfApi", FakeApi)
    push_module.push_teacher(folder, "me/digits-convnet32")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    uploaded = list(filter_repo_objects(files, allow_patterns=calls.get("allow_patterns"),
                                        ignore_patterns=calls.get("ignore_patterns")))
    assert sorted(uploaded) == sorted(model_files)


# ------------------------------------------------------------------------------ the export's card


def test_the_card_of_a_selection_method_describes_real_images(tmp_path):
    spec = DatasetSpec(name="digits", num_classes=2, image_size=8, channels=1, mean=(0.5,), std=(0.25,),
                       class_names=("a", "b"))
    cards = {}
    for method in ("random_real", "rded", "gvbsm"):
        folder = export_distilled_dataset(tmp_path / method, images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                                          labels=torch.tensor([0, 0, 1, 1]), spec=spec,
                                          method={"syn_method": method, "ipc": 2})
        cards[method] = (folder / "README.md").read_text()
    for method in ("random_real", "rded"):
        body = re.sub(r"```.*?```", "", cards[method].split("---", 2)[2], flags=re.S).lower()  # prose, not code
        assert "synthetic" not in body and "synthesised" not in body and "optimised so that" not in body, method
        assert "real training" in body and f"selected by {method}" in body and "selected rather than" in body
        assert "- data-selection" in cards[method] and "- synthetic" not in cards[method]
    assert "synthetic images" in cards["gvbsm"] and "- synthetic" in cards["gvbsm"]


# ------------------------------------------------------------------------------ damaged files


def test_a_truncated_export_parquet_names_the_file(tmp_path):
    spec = DatasetSpec(name="digits", num_classes=2, image_size=8, channels=1, mean=(0.5,), std=(0.25,),
                       class_names=("a", "b"))
    g = torch.Generator().manual_seed(0)
    n = 4
    xy = torch.rand(n, 2, 2, generator=g) * 2
    views = StoredSoftLabels(boxes=torch.cat([xy, xy + 6], dim=-1), flip=torch.rand(n, 2, generator=g) > 0.5,
                             num_classes=2, image_size=(8, 8), out_size=8, logits=torch.randn(n, 2, 2, generator=g).half())
    folder = export_distilled_dataset(tmp_path / "ex", images=torch.zeros(n, 1, 8, 8, dtype=torch.uint8),
                                      labels=torch.tensor([0, 0, 1, 1]), spec=spec, method={"syn_method": "gvbsm"},
                                      soft_logits=torch.randn(n, 2, generator=g), stored_views=views)
    parquet = next((folder / "data").glob("train-*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])
    for load in (lambda: load_distilled_dataset(folder), lambda: StoredViews(folder)):
        with pytest.raises(GVBSMError, match=rf"{re.escape(str(parquet))} is damaged or incomplete.*--redo export"):
            load()


def test_a_damaged_stages_json_names_the_file_and_the_fix(tmp_path):
    recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path)])
    (tmp_path / "stages.json").write_text('{"squeeze": {"done": tr')

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    with pytest.raises(GVBSMError, match=r"stages.json \(the index of finished stages\) is damaged.*delete it.*"
                                         r"--redo squeeze"):
        run_pipeline(recipe)
    assert not (tmp_path / "data_spec.json").exists()  # before the data is loaded
    cache = open_stage_cache(tmp_path, ["squeeze"], recipe, Acc())  # --redo squeeze: set aside, everything redone
    assert (tmp_path / "stages.json.damaged").exists() and not cache.state


def _fail_save_metrics_once(monkeypatch):
    """Trainer.save_metrics as on a full disk: all_results.json left empty, then ENOSPC."""
    def full(self, split, metrics, combined=True):
        (Path(self.args.output_dir) / "all_results.json").write_text("")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "save_metrics", full)


def test_a_damaged_per_seed_file_is_named_and_recomputed_on_rerun(tmp_path, monkeypatch, caplog):
    argv = ["--config", str(SMOKE), "--output_dir", str(tmp_path), *TINY,
            "--stages", "squeeze", "record", "recover", "relabel", "evaluate"]
    with monkeypatch.context() as m:
        _fail_save_metrics_once(m)
        with pytest.raises(GVBSMError, match="disk filled up during the evaluate stage"):
            run_pipeline(parse_recipe(argv))
    damaged = list((tmp_path / "evaluate").glob("**/seed0/all_results.json"))
    assert damaged and damaged[0].read_text() == ""
    with caplog.at_level(logging.WARNING):
        summary = run_pipeline(parse_recipe(argv))  # the same command: no JSONDecodeError, the seed is recomputed
    assert str(damaged[0]) in caplog.text and "damaged" in caplog.text
    assert [row["seeds"] for row in summary["results"]] == [[0]] * len(summary["results"]) and summary["results"]
    assert json.loads(damaged[0].read_text())
    damaged[0].write_text("")  # --redo evaluate too
    assert run_pipeline(parse_recipe(argv + ["--redo", "evaluate"]))["results"]
    # a truncated results.json: named, with its --redo
    results = tmp_path / "evaluate" / "results.json"
    results.write_text(results.read_text()[:10])
    with pytest.raises(GVBSMError, match=r"results.json \(the evaluation results\) is damaged.*--redo evaluate"):
        run_pipeline(parse_recipe(argv))
    assert run_pipeline(parse_recipe(argv + ["--redo", "evaluate"]))["results"] == summary["results"]


def test_every_test_named_in_the_reliability_doc_exists():
    """docs/reliability.md names the test of every case: each of them exists."""
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", DOC.read_text()))
    assert len(named) > 20
    missing = sorted(n for n in named if not re.search(rf"^def {n}\(", sources, re.M))
    assert not missing, missing
