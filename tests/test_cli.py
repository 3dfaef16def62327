"""The ``gvbsm-hf`` command (``gvbsm_hf.cli``): installed with the package, shipped recipes as
package data, and ``distill --dry_run``.

- ``gvbsm-hf --help``, ``gvbsm-hf distill --help``, ``gvbsm-hf recipes`` and ``python -m
  gvbsm_hf.cli --help`` exit 0 from a folder outside the repository (the installed package);
- ``--config`` takes a path or a shipped recipe's name; a built wheel holds every recipe;
- ``--dry_run`` on every shipped recipe exits 0 in seconds, loads no data and writes nothing; on a
  finished run it says ``cached`` per stage, and ``will run`` with the reason after an override.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from gvbsm_hf import cli
from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.pipeline_config import STAGES

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate_configs"
RECIPE_NAMES = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.glob("*/*.yaml")
                      if p.parent != ACCELERATE_CONFIGS)
ACCELERATE_NAMES = sorted(p.relative_to(RECIPES).as_posix() for p in ACCELERATE_CONFIGS.glob("*.yaml"))
SCRIPT = Path(sys.executable).parent / "gvbsm-hf"
# the smoke recipe shrunk to a ~15 s run on 2 CPU cores (a finished run folder for the plan)
TINY = ["--teacher_epochs", "1", "--max_train_samples", "300", "--stats_max_samples", "200", "--syn_iterations", "5",
        "--num_train_epochs", "2", "--eval_seeds", "0", "--baselines", "none", "--accept_unhealthy_synthesis", "true"]
PLAN_LINE = re.compile(r"^  (\w+)\s+(cached|will run|not run)\s+(.*)$")


def _outside_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into the repository."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


def _distill(argv: list[str]) -> int:
    """``gvbsm-hf distill ARGV`` in this process; its exit code."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main(["distill", *argv])
    finally:
        signal.signal(signal.SIGTERM, before)


def _plan(text: str) -> dict[str, tuple[str, str]]:
    """Stage -> (action, why) from a dry run's printout."""
    return {m.group(1): (m.group(2), m.group(3)) for m in map(PLAN_LINE.match, text.splitlines()) if m}


def _bf16_fix(name: str) -> list[str]:
    """``--bf16 false`` for a bf16 recipe where TrainingArguments refuses bf16 at parse time (no bf16 GPU)."""
    bf16 = yaml.safe_load((RECIPES / name).read_text()).get("bf16")
    return ["--bf16", "false"] if bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else []


@pytest.fixture
def no_data(monkeypatch):
    """Every way the package loads a dataset (or runs the pipeline) fails the test."""
    import gvbsm_hf.data
    import gvbsm_hf.data.loading
    import gvbsm_hf.pipeline

    def boom(*args, **kwargs):
        raise AssertionError("a dry run loaded data")

    for module, name in ((gvbsm_hf.pipeline, "load_image_dataset"), (gvbsm_hf.pipeline, "run_pipeline"),
                         (gvbsm_hf.data, "load_image_dataset"), (gvbsm_hf.data.loading, "load_image_dataset"),
                         (gvbsm_hf.data.loading, "_load_digits"), (datasets, "load_dataset"),
                         (datasets, "load_from_disk"), (datasets, "load_dataset_builder")):
        monkeypatch.setattr(module, name, boom)


# ============================================================================ the installed command


@pytest.mark.parametrize("command, expect", [
    ([str(SCRIPT), "--help"], ["distill", "recipes", "accelerate launch -m gvbsm_hf.cli"]),
    ([str(SCRIPT), "distill", "--help"], ["--config", "--dry_run", "--ipc", "--output_dir", "--redo", "method_args"]),
    ([str(SCRIPT), "recipes"], ["digits/smoke.yaml", "fashion_mnist/gvbsm_ipc10_cpu.yaml", "accelerate_configs/cpu.yaml"]),
    ([sys.executable, "-m", "gvbsm_hf.cli", "--help"], ["distill", "recipes"]),
    ([str(SCRIPT), "--version"], ["gvbsm-hf 0."]),
], ids=["gvbsm-hf --help", "gvbsm-hf distill --help", "gvbsm-hf recipes", "python -m gvbsm_hf.cli --help",
        "gvbsm-hf --version"])
def test_the_command_works_outside_the_repository(tmp_path, command, expect):
    assert SCRIPT.exists(), "the console script is missing: pip install -e . (pyproject [project.scripts])"
    proc = subprocess.run(command, cwd=tmp_path, env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expect:
        assert text in proc.stdout, f"{' '.join(command)} does not mention {text!r}"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_command_is_a_usage_error(tmp_path):
    proc = subprocess.run([str(SCRIPT), "distil"], cwd=tmp_path, env=_outside_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_dry_run_of_a_shipped_recipe_from_outside_the_repository(tmp_path):
    """The installed command with a shipped recipe's name: the plan, exit 0, and nothing written (the
    recipe's relative output_dir is not created)."""
    proc = subprocess.run([str(SCRIPT), "distill", "--config", "digits/smoke.yaml", "--dry_run"], cwd=tmp_path,
                          env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_plan(proc.stdout)) == set(STAGES)
    assert list(tmp_path.iterdir()) == []


# ============================================================================ shipped recipes


def test_shipped_recipes_are_the_repository_recipes():
    folder = cli.recipes_folder()
    assert cli.shipped_recipes() == RECIPE_NAMES and cli.shipped_recipes(accelerate=True) == ACCELERATE_NAMES
    for name in RECIPE_NAMES + ACCELERATE_NAMES:
        assert (folder / name).read_bytes() == (RECIPES / name).read_bytes()


def test_recipes_lists_each_recipe_with_its_first_comment_line(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPE_NAMES + ACCELERATE_NAMES:
        first = next(line for line in (RECIPES / name).read_text().splitlines() if line.startswith("#"))
        text = first.lstrip("#").strip()
        shown = text[: text.index(". ") + 1] if ". " in text else text
        assert re.search(rf"^  {re.escape(name)} +{re.escape(shown)}$", out, re.M), name
    assert cli.main(["recipes", "--path", "accelerate_configs/cpu.yaml"]) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == (ACCELERATE_CONFIGS / "cpu.yaml").read_bytes()


def test_config_takes_a_path_or_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = Path(cli.resolve_config("fashion_mnist/gvbsm_ipc10_cpu.yaml"))
    assert shipped.read_bytes() == (RECIPES / "fashion_mnist" / "gvbsm_ipc10_cpu.yaml").read_bytes()
    assert cli.resolve_config("recipes/digits/smoke.yaml") == cli.resolve_config("digits/smoke.yaml")
    mine = tmp_path / "digits" / "smoke.yaml"  # a file of that name wins over the shipped one
    mine.parent.mkdir()
    mine.write_text("ipc: 3\n")
    assert cli.resolve_config("digits/smoke.yaml") == "digits/smoke.yaml"
    with pytest.raises(GVBSMError, match="did you mean 'fashion_mnist/gvbsm_ipc10_cpu.yaml'.*gvbsm-hf recipes"):
        cli.resolve_config("fashion_mnist/gvbsm_ipc10_cpuu.yaml")


def test_recipes_distill_py_is_the_distill_command():
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_wrapper", RECIPES / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cli is cli.distill and module.main is cli.distill_main
    assert len((RECIPES / "distill.py").read_text().splitlines()) < 40


def test_a_built_wheel_holds_the_recipes_and_the_command(tmp_path):
    """``pip wheel`` of a copy of the project (the repository is not written): the recipes and the
    accelerate configs are package data, the clone's script is not a module, the command is declared."""
    src = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("src", "recipes"):
        shutil.copytree(REPO / part, src / part, symlinks=True, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, src / part)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                           "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("gvbsm_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in RECIPE_NAMES + ACCELERATE_NAMES:
        assert f"gvbsm_hf/recipes/{name}" in names, f"the wheel lacks the recipe {name}"
    assert "gvbsm_hf/cli.py" in names and "gvbsm_hf/templates/dataset_card.md" in names
    assert not any(n.startswith("gvbsm_hf/recipes/") and not n.endswith(".yaml") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gvbsm-hf = gvbsm_hf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # installed from the wheel (not editable), the command finds the recipes inside the installed package
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "gvbsm_hf.cli", "recipes"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=_outside_env() | {"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"They are in {site / 'gvbsm_hf' / 'recipes'}" in proc.stdout and "digits/smoke.yaml" in proc.stdout


# ============================================================================ --dry_run


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_dry_run_of_every_shipped_recipe(name, tmp_path, monkeypatch, capsys, no_data):
    """Exit 0 in seconds, the plan names every stage and the method, no data loaded (``no_data``),
    nothing written: the recipe's own (relative) ``output_dir`` is not created."""
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert _distill(["--config", name, "--dry_run", *_bf16_fix(name)]) == 0, capsys.readouterr().err
    assert time.perf_counter() - t0 < 20
    out = capsys.readouterr().out
    plan = _plan(out)
    assert list(plan) == list(STAGES)
    assert all(action in ("will run", "not run") for action, _ in plan.values())
    method = yaml.safe_load((RECIPES / name).read_text()).get("syn_method", "gvbsm")
    assert f"method: {method}:" in out and "protocol (every method):" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_a_bad_recipe_like_the_run(tmp_path, capsys, no_data):
    out = tmp_path / "run"
    assert _distill(["--config", "digits/smoke.yaml", "--output_dir", str(out), "--ipc", "0", "--dry_run"]) == 3
    assert "ipc" in capsys.readouterr().err and not out.exists()
    out.write_text("a file")
    assert _distill(["--config", "digits/smoke.yaml", "--output_dir", str(out), "--dry_run"]) == 3
    assert "is a file, not a folder" in " ".join(capsys.readouterr().err.split())  # unwrapped


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The smoke recipe, shrunk, run to the end through the command (about 15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert _distill(["--config", "digits/smoke.yaml", "--output_dir", str(out), *TINY]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _dry(out: Path, capsys, *extra: str) -> dict[str, tuple[str, str]]:
    capsys.readouterr()
    before = _snapshot(out)
    assert _distill(["--config", "digits/smoke.yaml", "--output_dir", str(out), *TINY, *extra, "--dry_run"]) == 0
    assert _snapshot(out) == before, "the dry run wrote into output_dir"
    return _plan(capsys.readouterr().out)


def test_dry_run_on_a_finished_run(finished_run, capsys, no_data):
    plan = _dry(finished_run, capsys)
    assert {stage: action for stage, (action, _) in plan.items()} == {s: "cached" for s in STAGES}
    assert "recipe unchanged" in plan["evaluate"][1]


def test_dry_run_after_an_override_names_the_changed_field(finished_run, capsys, no_data):
    plan = _dry(finished_run, capsys, "--syn_lr", "0.1")
    assert plan["squeeze"][0] == plan["record"][0] == "cached"
    assert plan["recover"] == ("will run", "recipe changed: syn_lr")
    for stage in ("relabel", "evaluate", "export"):
        assert plan[stage] == ("will run", "the recipe change in recover recomputes every later stage")
    plan = _dry(finished_run, capsys, "--redo", "evaluate", "--stages", "evaluate", "export")
    assert plan["evaluate"] == ("will run", "--redo evaluate") and plan["export"][0] == "will run"
    assert all(plan[s][0] == "not run" and "loaded" in plan[s][1] for s in STAGES[:4])


def test_dry_run_names_a_missing_output(finished_run, tmp_path, capsys, no_data):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "evaluate" / "results.json").unlink()
    plan = _dry(out, capsys)
    assert plan["evaluate"][0] == "will run" and "evaluate/results.json is missing" in plan["evaluate"][1]
    assert plan["recover"][0] == "cached"
    (out / "stages.json").write_text("{")
    assert _distill(["--config", "digits/smoke.yaml", "--output_dir", str(out), *TINY, "--dry_run"]) == 3
    assert "damaged" in capsys.readouterr().err and not (out / "error.log").exists()
    plan = _dry(out, capsys, "--redo", "squeeze")
    assert all(action == "will run" for action, _ in plan.values()) and "damaged" in plan["squeeze"][1]
    assert json.loads((finished_run / "stages.json").read_text())["export"]["done"]


# ============================================================================ README


def _readme_commands() -> list[list[str]]:
    """The ``gvbsm-hf`` / ``-m gvbsm_hf.cli`` commands of the README (shell blocks, ``$ `` lines of printouts)."""
    import shlex

    text = (REPO / "README.md").read_text()
    out = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)\n```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if lang not in ("sh", "bash") and not line.startswith("$ "):
                continue  # a printout
            line = line.removeprefix("$ ").split(" #", 1)[0].strip()
            if "gvbsm-hf" in line or "gvbsm_hf.cli" in line:
                out.append(shlex.split(line))
                out += [shlex.split(inner) for inner in re.findall(r"\$\((gvbsm-hf [^)]*)\)", line)]
    return out


def test_readme_shows_both_forms_and_its_commands_resolve(no_data):
    """Every ``--config NAME`` / ``--path NAME`` of the README's installed-command examples is a
    shipped file, and the recipe with the command's overrides parses."""
    from gvbsm_hf.pipeline import parse_recipe

    commands = _readme_commands()
    joined = [" ".join(c) for c in commands]
    assert any(c.startswith("gvbsm-hf distill --config fashion_mnist/gvbsm_ipc10_cpu.yaml") for c in joined)
    assert any("-m gvbsm_hf.cli distill" in c and c.startswith("accelerate launch") for c in joined)
    assert "gvbsm-hf recipes" in joined and any("--dry_run" in c for c in joined)
    for cmd in commands:
        for flag in ("--path", "--config"):
            for i in [i for i, tok in enumerate(cmd) if tok == flag]:
                assert cmd[i + 1].startswith("$(") or (cli.recipes_folder() / cmd[i + 1]).is_file(), cmd
        if "distill" in cmd and "--config" in cmd:
            args = cmd[cmd.index("distill") + 1:]
            i = args.index("--config")
            rest = [a for a in args[:i] + args[i + 2:] if a != "--dry_run"]
            parse_recipe(["--config", cli.resolve_config(args[i + 1]), *rest, *_bf16_fix(args[i + 1])])
