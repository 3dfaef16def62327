"""Recipes, the ``recipes/distill.py`` entry point and the README commands.

- every shipped recipe parses into the config dataclasses, names known backbones and valid
  choices; every accelerate config is one ``accelerate launch`` accepts;
- unknown keys fail with a clear message, command-line flags override the YAML;
- the smoke recipe runs end to end in-process (stages.json, results.json, the exported dataset
  folder, its card and the grid), a run killed (SIGKILL) in recover resumes there without
  recomputing earlier stages and ends with the same images, ``--redo <stage>`` recomputes it;
- the README's commands refer to files that exist and parse, ``--help`` works, and ``.ci/run``
  runs exactly the README's test-command block.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from gvbsm_hf.methods import method_config
from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.pipeline import STAGES, Recipe, parse_recipe, run_pipeline

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate_configs"
DISTILL = RECIPES / "distill.py"
SMOKE = RECIPES / "digits" / "smoke.yaml"
README = REPO / "README.md"

RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml") if ACCELERATE_CONFIGS not in p.parents)
ACCELERATE_FILES = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))

# The smoke recipe, shrunk (and pinned where the assertions depend on it) so that a whole run takes
# well under a minute on 2 CPU cores.
IPC = 2
FAST = [
    "--teacher_epochs", "1", "--max_train_samples", "400", "--ipc", str(IPC), "--syn_iterations", "24",
    "--syn_checkpoint_every", "8", "--num_train_epochs", "4", "--eval_seeds", "0",
    "--per_device_eval_batch_size", "256", "--cutmix_prob", "0.5",
]
RECOVER_ONLY = ["--stages", "squeeze", "record", "recover"]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _bf16_refused() -> bool:
    """TrainingArguments refuses ``bf16: true`` at parse time on a machine without a bf16 GPU."""
    return not (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _parse(path: Path, *extra: str) -> Recipe:
    """parse_recipe on a shipped recipe (GPU recipes with ``--bf16 false`` where bf16 is refused)."""
    data = yaml.safe_load(path.read_text())
    if data.get("bf16") and _bf16_refused() and "--bf16" not in extra:
        extra = ("--bf16", "false", *extra)
    return parse_recipe(["--config", str(path), *extra])


def _parts(recipe: Recipe) -> list:
    return [recipe.data, recipe.squeeze, recipe.stats, recipe.synthesis, recipe.relabel, recipe.training,
            recipe.publish, recipe.pipeline]


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


# ============================================================================ recipes


def test_recipes_are_found():
    names = {_rel(p) for p in RECIPE_FILES}
    assert "recipes/digits/smoke.yaml" in names
    assert {"recipes/imagenet1k/gvbsm_ipc10.yaml", "recipes/fashion_mnist/gvbsm_ipc10.yaml"} <= names
    assert len(ACCELERATE_FILES) >= 6


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_rel)
def test_recipe_parses_into_the_config_dataclasses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is not a mapping"
    recipe = _parse(path)
    assert isinstance(recipe, Recipe)
    parts = _parts(recipe)
    for key, value in data.items():
        owners = [p for p in parts if key in {f.name for f in fields(p)}]
        assert len(owners) == 1, f"{key!r} belongs to {len(owners)} dataclasses"
        got = _plain(getattr(owners[0], key))
        if key == "report_to" and value == "none":
            assert got in ([], ["none"], "none", None)
        elif key == "bf16" and got != value:
            assert value is True and _bf16_refused()  # parsed with --bf16 false, see _parse
        else:
            assert got == value, f"{path}: {key}: YAML {value!r}, parsed {got!r}"


def test_recipes_write_to_distinct_output_dirs():
    dirs = {}
    for path in RECIPE_FILES:
        out = _parse(path).training.output_dir
        assert out not in dirs, f"{_rel(path)} and {dirs.get(out)} share output_dir {out}: their caches would mix"
        dirs[out] = _rel(path)


def _assert_known_backbone(name: str, where: str) -> None:
    import timm
    import torchvision

    from gvbsm_hf.backbones import is_backbone_name, list_backbones

    if name.startswith("tv:"):
        assert name[3:] in torchvision.models.list_models(), f"{where}: {name} is not a torchvision model"
    elif name.startswith("timm:"):
        assert name[5:] in timm.list_models(), f"{where}: {name} is not a timm model"
    else:
        assert name in list_backbones(), f"{where}: {name} is not a zoo backbone ({list_backbones()})"
    assert is_backbone_name(name), f"{where}: the registry does not resolve {name}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_rel)
def test_recipe_backbones_are_known(path):
    r = _parse(path)
    names = {"teachers": r.squeeze.teachers, "student": [r.training.student],
             "eval_students": r.training.eval_students or []}
    assert r.squeeze.teachers, f"{path} lists no teachers"
    for field_name, values in names.items():
        for name in values:
            _assert_known_backbone(name, f"{_rel(path)} {field_name}")


def test_backbone_check_rejects_unknown_names():
    for bad in ("convnet_does_not_exist", "tv:resnet_does_not_exist", "timm:resnet_does_not_exist"):
        with pytest.raises(AssertionError):
            _assert_known_backbone(bad, "test")


def test_pretrained_teachers_keep_their_imagenet_head():
    """Recipes with ``teacher_epochs: 0`` use the pretrained torchvision heads as they are: the
    classifier is replaced only when the number of classes differs (else it would be random)."""
    import torchvision

    from gvbsm_hf.backbones import registry

    recipes = [yaml.safe_load(p.read_text()) for p in RECIPE_FILES]
    names = {t[3:] for r in recipes if r.get("teacher_epochs") == 0 for t in r["teachers"] if t.startswith("tv:")}
    assert names
    for name in sorted(names):
        model = torchvision.models.get_model(name, weights=None)  # the pretrained architecture: 1000 classes
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        registry._replace_classifier(model, 1000)
        assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1] is head, name
        registry._replace_classifier(model, 10)
        assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features == 10, name


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=_rel)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "mixed_precision"):
        assert key in data, f"{path.name} lacks {key}"
    assert data["compute_environment"] == "LOCAL_MACHINE"
    assert data["distributed_type"] in {t.value for t in DistributedType}
    assert data["mixed_precision"] in ("no", "fp16", "bf16", "fp8")
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1
    assert data["num_processes"] % data["num_machines"] == 0
    if data["num_machines"] > 1:
        assert data["distributed_type"] != "NO"
        assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(data)
    if data["num_processes"] > 1:
        assert data["distributed_type"] != "NO", f"{path.name}: several processes need a distributed_type"
    if data.get("use_cpu"):
        assert data["distributed_type"] in ("NO", "MULTI_CPU")
    # what `accelerate launch --config_file` does with it: unknown keys raise
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == data["num_processes"]


# ============================================================================ parsing


def test_unknown_recipe_key_gives_a_clear_error(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(SMOKE.read_text() + "syn_iteratons: 5\n")
    with pytest.raises(GVBSMError) as err:
        parse_recipe(["--config", str(bad)])
    msg = str(err.value)
    assert "syn_iteratons" in msg and "'syn_iterations'" in msg and str(bad) in msg


def test_unknown_command_line_flag_and_stage_are_rejected():
    with pytest.raises(GVBSMError, match="--no_such_flag"):
        parse_recipe(["--config", str(SMOKE), "--no_such_flag", "1"])
    with pytest.raises(GVBSMError, match="recovr"):
        parse_recipe(["--config", str(SMOKE), "--redo", "recovr"])
    with pytest.raises(GVBSMError, match="does not exist"):
        parse_recipe(["--config", str(SMOKE.with_name("missing.yaml"))])


def test_teacher_subsets_must_name_teachers():
    with pytest.raises(GVBSMError, match="syn_teachers"):
        parse_recipe(["--config", str(SMOKE), "--teachers", "convnet32", "--syn_teachers", "convnet32_d2"])
    with pytest.raises(GVBSMError, match="relabel_teachers"):
        parse_recipe(["--config", str(SMOKE), "--teachers", "convnet32", "--relabel_teachers", "wrn_16_2"])
    r = parse_recipe(["--config", str(SMOKE), "--teachers", "convnet32", "convnet32_d2",
                      "--syn_teachers", "convnet32_d2"])
    assert r.synthesis.syn_teachers == ["convnet32_d2"]


def test_command_line_overrides_yaml():
    data = yaml.safe_load(SMOKE.read_text())
    base = parse_recipe(["--config", str(SMOKE)])
    assert base.synthesis.ipc == data["ipc"] and base.synthesis.syn_iterations == data["syn_iterations"]
    assert base.training.output_dir == data["output_dir"]
    # a method option the recipe leaves unset is the method's own default in its config
    assert "syn_alpha" not in data["method_args"]["gvbsm"] and not hasattr(base.synthesis, "syn_alpha")
    assert method_config("gvbsm", base.synthesis).syn_alpha == 0.8
    r = parse_recipe(["--config", str(SMOKE), "--ipc", str(data["ipc"] + 3), "--teachers", "convnet", "wrn_16_2",
                      "--syn_crop_scale", "0.3", "0.9", "--method_args", '{"gvbsm": {"syn_alpha": 0.123}}',
                      "--output_dir", "elsewhere", "--redo", "recover", "evaluate"])
    assert r.synthesis.ipc == data["ipc"] + 3
    assert r.squeeze.teachers == ["convnet", "wrn_16_2"]
    assert r.synthesis.syn_crop_scale == [0.3, 0.9]
    assert method_config("gvbsm", r.synthesis).syn_alpha == 0.123
    assert r.synthesis.method_args["gvbsm"]["syn_dd_pool_size"] == data["method_args"]["gvbsm"]["syn_dd_pool_size"]
    assert r.training.output_dir == "elsewhere"
    assert r.pipeline.redo == ["recover", "evaluate"]
    # everything not overridden keeps its YAML value
    assert r.synthesis.syn_iterations == data["syn_iterations"] and r.training.student == data["student"]
    assert r.data.dataset_name == data["dataset_name"] and r.synthesis.syn_lr == data["syn_lr"]


# ============================================================================ end to end


def _run(out: Path, *extra: str) -> dict:
    recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(out), *FAST, *extra])
    return run_pipeline(recipe)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The (shrunk) smoke recipe, all stages, in-process."""
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    summary = _run(out)
    return {"out": out, "summary": summary, "seconds": time.perf_counter() - t0}


def _stages(out: Path) -> dict:
    return json.loads((out / "stages.json").read_text())


def _mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def _images(out: Path, method: str = "gvbsm") -> dict[str, torch.Tensor]:
    return load_file(str(out / "recover" / method / "synthetic.safetensors"))


@pytest.mark.slow
def test_exported_folder_replays_the_evaluated_views_bitwise(smoke_run):
    """The `views` config of the export, replayed by the public loader alone, gives exactly the crops
    (CutMix partners pasted in) and logits the evaluate stage trained its `stored_views` row on (issue 17)."""
    from gvbsm_hf import StoredViews
    from gvbsm_hf.augment import apply_crop_flip, paste_boxes
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.relabel.store import StoredSoftLabels
    from gvbsm_hf.synthetic_set import SyntheticSet

    out, summary = smoke_run["out"], smoke_run["summary"]
    spec = DatasetSpec.from_dict(json.loads((out / "data_spec.json").read_text()))
    used = StoredSoftLabels.load(out / "relabel" / "gvbsm")  # what the evaluate stage was given
    images = SyntheticSet.load(out / "recover" / "gvbsm").shipped_images(spec)
    replay = StoredViews(summary["dataset_folder"])
    assert replay.num_views == used.num_views == int(FAST[FAST.index("--num_train_epochs") + 1])  # one per epoch
    # the smoke run trains with cutmix_prob 0.5: some views are mixed, some not
    assert used.has_mix and used.cutmix_prob == 0.5
    assert (used.mix_partner >= 0).any() and (used.mix_partner < 0).any()
    index = torch.arange(len(images))
    for v in range(used.num_views):
        view = torch.full((len(images),), v)
        own = apply_crop_flip(images, used.view_params(view, index), used.out_size)
        partner = used.mix_partner[:, v].long().clamp(min=0)
        other = apply_crop_flip(images[partner], used.view_params(view, partner), used.out_size)
        expected = paste_boxes(own, other, used.mix_boxes[:, v])
        assert torch.equal(expected, used.replay(images, view, index, partner_images=images[partner]))  # the Trainer's
        got, logits = replay.view(index, view)
        assert torch.equal(got, expected) and torch.equal(logits, used.dense_logits(view, index))
    replay.set_epoch(5)
    item = replay[3]
    assert torch.equal(item["pixel_values"], replay.view(torch.tensor([3]), torch.tensor([5 % used.num_views]))[0][0])
    p3 = int(used.mix_partner[3, 5 % used.num_views])
    assert int(item["partner_labels"]) == int(replay.labels[p3 if p3 >= 0 else 3])
    assert float(item["lam"]) == float(used.mix_params(5 % used.num_views, torch.tensor([3]))[2][0])
    card = Path(summary["card"]).read_text()
    assert "trained from this folder alone (stored views)" in card and "StoredViews(" in card
    assert "CutMix partner and box" in card and 'batch["lam"]' in card  # the card says how mixed views replay


def test_smoke_recipe_runs_end_to_end(smoke_run):
    import datasets
    from PIL import Image

    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.synthetic_set import SyntheticSet

    out, summary = smoke_run["out"], smoke_run["summary"]
    smoke = yaml.safe_load(SMOKE.read_text())
    stages = _stages(out)
    for stage in STAGES:
        assert stages.get(stage, {}).get("done") is True, f"stage {stage} not done: {stages.get(stage)}"
    assert (out / "recipe.json").is_file() and (out / "data_spec.json").is_file()

    rows = json.loads((out / "evaluate" / "results.json").read_text())
    assert rows == summary["results"]
    assert {(row["method"], row["labels"]) for row in rows} == {("gvbsm", "soft"), ("gvbsm", "stored_views"),
                                                                ("random_real", "soft")}
    for row in rows:
        assert row["evaluator"] == smoke["student"] and row["ipc"] == IPC and row["n"] == 1 and row["seeds"] == [0]

    spec = DatasetSpec.from_dict(json.loads((out / "data_spec.json").read_text()))
    folder = Path(summary["dataset_folder"])
    assert folder.parent == out / "export"
    loaded = datasets.load_dataset(str(folder))
    assert list(loaded) == ["train"]
    train = loaded["train"]
    assert train.num_rows == IPC * spec.num_classes
    assert train.features["label"].names == list(spec.class_names)
    assert sorted(train["label"]) == sorted(list(range(spec.num_classes)) * IPC)
    # the published pixels are the synthetic images of recover, quantised
    syn = SyntheticSet.load(out / "recover" / "gvbsm")
    pixels = torch.stack([torch.from_numpy(np.array(im)) for im in train["image"]]).unsqueeze(1)
    assert torch.equal(pixels, syn.uint8_images(spec))
    assert train["label"] == syn.labels.tolist()
    on_disk = datasets.load_from_disk(str(out / "recover" / "gvbsm" / "dataset"))  # recover's own Dataset
    assert on_disk["label"] == syn.labels.tolist() and on_disk["slot"] == syn.slots.tolist()
    assert np.array_equal(np.stack([np.array(im) for im in on_disk["image"]]), syn.uint8_images(spec)[:, 0].numpy())

    card = Path(summary["card"])
    assert card == folder / "README.md"
    text = card.read_text()
    assert text.startswith("---\n") and "gvbsm" in text and "random_real" in text  # metadata, results table

    for grid in (Path(summary["grid"]), folder / "grid.png"):
        with Image.open(grid) as im:
            assert im.format == "PNG"
            # a row per class
            assert im.width >= IPC * spec.image_size and im.height >= spec.num_classes * spec.image_size

    # the card's "Reproduce" command: the exported recipe parses back to the same settings
    reproduced = parse_recipe(["--config", str(folder / "gvbsm_config.json")])
    assert reproduced.synthesis.ipc == IPC and reproduced.synthesis.syn_iterations == 24
    assert reproduced.squeeze.teachers == smoke["teachers"] and reproduced.data.dataset_name == smoke["dataset_name"]


@pytest.mark.slow
def test_killed_run_resumes_in_the_stage_it_was_in(smoke_run, tmp_path):
    """SIGKILL while recover is running (its first job checkpoint exists), then the same command
    again: squeeze and record are not recomputed, recover continues from the checkpoint, and the
    images equal those of the uninterrupted run."""
    out = tmp_path / "killed"
    jobs = out / "recover" / "gvbsm" / "jobs"
    log = tmp_path / "killed.log"
    cmd = [sys.executable, str(DISTILL), "--config", str(SMOKE), "--output_dir", str(out), *FAST, *RECOVER_ONLY]
    # same thread count as this process, so that the teachers are bitwise those of smoke_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not list(jobs.glob("*.ckpt.safetensors")):
                assert proc.poll() is None, f"the run ended before recover checkpointed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no recover checkpoint after 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    stages = _stages(out)
    assert stages["squeeze"]["done"] and stages["record"]["done"]
    assert not stages.get("recover", {}).get("done", False)
    assert not (out / "recover" / "gvbsm" / "synthetic.safetensors").exists()
    (ckpt,) = jobs.glob("*.ckpt.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        killed_at = int(f.metadata()["iteration"])
    assert 8 <= killed_at < 24
    earlier = sorted((out / "teachers").rglob("model.safetensors")) + sorted((out / "statistics").glob("*.safetensors"))
    assert len(earlier) >= 4
    before = _mtimes(earlier)

    _run(out, *RECOVER_ONLY)

    after = _stages(out)
    assert after["recover"]["done"]
    assert after["squeeze"] == stages["squeeze"] and after["record"] == stages["record"]  # not redone
    assert _mtimes(earlier) == before
    assert not list(jobs.glob("*.ckpt.safetensors"))
    # the job's loss log goes on from the checkpoint: no iteration is logged twice
    logged = [json.loads(line)["iteration"] for p in jobs.glob("*.log.jsonl") for line in p.read_text().splitlines()]
    assert killed_at in logged and logged == sorted(set(logged)) and logged[-1] == 24
    # the same teachers and the same images as the uninterrupted run
    ref = smoke_run["out"]
    for mine in sorted((out / "teachers").glob("*/model.safetensors")):
        theirs = load_file(str(ref / "teachers" / mine.parent.name / "model.safetensors"))
        assert all(torch.equal(t, theirs[k]) for k, t in load_file(str(mine)).items()), mine.parent.name
    resumed, reference = _images(out), _images(ref)
    assert torch.equal(resumed["labels"], reference["labels"])
    assert torch.equal(resumed["images"], reference["images"])


@pytest.mark.slow
def test_redo_recomputes_that_stage(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "redo"
    shutil.copytree(smoke_run["out"], out)
    teachers = sorted((out / "teachers").glob("*/model.safetensors"))
    stats = sorted((out / "statistics").glob("*.safetensors"))
    synthetic = [out / "recover" / m / "synthetic.safetensors" for m in ("gvbsm", "random_real")]
    images = _images(out)
    t0, s0, y0 = _mtimes(teachers), _mtimes(stats), _mtimes(synthetic)

    _run(out, *RECOVER_ONLY)  # everything cached: nothing is rewritten
    assert (_mtimes(teachers), _mtimes(stats), _mtimes(synthetic)) == (t0, s0, y0)

    _run(out, *RECOVER_ONLY, "--redo", "recover")
    y1 = _mtimes(synthetic)
    assert all(y1[k] != y0[k] for k in y0), "recover was not recomputed"
    assert _mtimes(teachers) == t0 and _mtimes(stats) == s0
    assert torch.equal(_images(out)["images"], images["images"])  # recomputed, deterministically

    old_stats = {p.name: load_file(str(p)) for p in stats}
    _run(out, "--stages", "squeeze", "record", "--redo", "record")
    s2 = _mtimes(stats)
    assert all(s2[k] != s0[k] for k in s0), "record was not recomputed"
    assert _mtimes(teachers) == t0 and _mtimes(synthetic) == y1
    for p in stats:
        new = load_file(str(p))
        assert new.keys() == old_stats[p.name].keys()
        assert all(torch.equal(new[k], old_stats[p.name][k]) for k in new)


@pytest.mark.slow
def test_two_processes_recompute_the_same_recover_stage(smoke_run, tmp_path):
    """The command line on 2 CPU processes (torchrun, as on N GPUs, ``--num_processes 2``): the recover
    stage of a finished run, redone, splits its jobs between the processes and writes the same images."""
    import shutil

    from gvbsm_hf.recover.jobs import plan_jobs

    split = ["--syn_classes_per_batch", "5"]  # two jobs of five classes
    one = tmp_path / "run_1proc"
    shutil.copytree(smoke_run["out"], one)
    _run(one, *RECOVER_ONLY, *split)  # this process: the recipe change recomputes recover
    two = tmp_path / "run_2proc"
    shutil.copytree(one, two)
    used = json.loads((two / "recipe.json").read_text())
    assert len(plan_jobs(10, IPC, int(used["syn_classes_per_batch"]), used["syn_slots_per_batch"])) == 2
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DISTILL),
           "--config", str(SMOKE), "--output_dir", str(two), *FAST, *RECOVER_ONLY, *split, "--redo", "recover",
           "--num_processes", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((two / "recipe.json").read_text())["runtime"]["processes"] == 2
    one_set, two_set = _images(one), _images(two)
    assert torch.equal(one_set["labels"], two_set["labels"])
    assert torch.allclose(one_set["images"], two_set["images"], atol=1e-4, rtol=0), (
        (one_set["images"] - two_set["images"]).abs().max())


def _copy_of(run: dict, dst: Path) -> Path:
    import shutil

    shutil.copytree(run["out"], dst)
    return dst


@pytest.mark.slow
def test_evaluate_rerun_with_every_seed_cached_and_hard_label_seeds(smoke_run, tmp_path):
    """An evaluate stage whose options changed but whose seeds are all cached trains nothing, and the
    stages after it still run (a TrainingArguments built without a Trainer resets accelerate's state);
    hard_label_seeds picks the seeds of the hard-label rows only."""
    out = _copy_of(smoke_run, tmp_path / "hard_seeds")
    before = json.loads((out / "evaluate" / "results.json").read_text())
    summary = _run(out, "--hard_label_seeds", "0")  # a new option, no new row: every run is reused
    assert summary["results"] == before
    assert _stages(out)["export"]["done"] and Path(summary["dataset_folder"]).is_dir()

    summary = _run(out, "--eval_seeds", "0", "1", "--evaluate_hard_labels", "true", "--hard_label_seeds", "1")
    rows = {(r["method"], r["labels"]): r for r in summary["results"]}
    assert rows[("gvbsm", "hard")]["seeds"] == [1] and rows[("gvbsm", "hard")]["n"] == 1
    assert rows[("gvbsm", "soft")]["seeds"] == [0, 1] and rows[("random_real", "soft")]["seeds"] == [0, 1]
    first = {(r["method"], r["labels"]): r for r in before}
    assert rows[("gvbsm", "soft")]["per_seed"][0] == first[("gvbsm", "soft")]["per_seed"][0]  # reused
    from gvbsm_hf.pipeline_config import PipelineArguments
    from gvbsm_hf.validation import RecipeError

    with pytest.raises(RecipeError, match="hard_label_seeds is empty"):
        PipelineArguments(hard_label_seeds=[])


@pytest.mark.slow
def test_syn_teachers_restricts_the_synthesis_backbones(smoke_run, tmp_path):
    out = _copy_of(smoke_run, tmp_path / "subset")
    teachers = yaml.safe_load(SMOKE.read_text())["teachers"]
    assert len(teachers) >= 2
    _run(out, *RECOVER_ONLY, "--redo", "recover", "--syn_teachers", teachers[-1])
    logs = list((out / "recover" / "gvbsm" / "jobs").glob("*.log.jsonl"))
    used = {i for p in logs for line in p.read_text().splitlines() for i in json.loads(line)["teachers_used"]}
    assert used == {0}  # one candidate backbone (GBM sampled among all of them before)
    full = smoke_run["out"] / "recover" / "gvbsm" / "jobs"
    assert {i for p in full.glob("*.log.jsonl") for line in p.read_text().splitlines()
            for i in json.loads(line)["teachers_used"]} == set(range(len(teachers)))
    assert not torch.equal(_images(out)["images"], _images(smoke_run["out"])["images"])


@pytest.mark.slow
def test_stored_relabel_resumes_and_feeds_later_stages(smoke_run, tmp_path):
    from gvbsm_hf.relabel.store import STORED_LABELS_FILE, StoredSoftLabels

    out = _copy_of(smoke_run, tmp_path / "stored")
    stored = ["--relabel_mode", "stored", "--relabel_num_views", "2"]
    relabel_only = ["--stages", "squeeze", "record", "recover", "relabel"]
    _run(out, *stored, *relabel_only)
    folder = out / "relabel" / "gvbsm"
    table = folder / STORED_LABELS_FILE
    assert table.is_file()
    assert _stages(out)["relabel"]["done"] and _stages(out)["relabel"]["mode"] == "stored"
    first = StoredSoftLabels.load(folder)
    assert first.logits is not None and first.logits.shape[:2] == (IPC * 10, 2)

    table.unlink()  # as if killed before the (atomic) write: recomputed
    _run(out, *stored, *relabel_only)
    again = StoredSoftLabels.load(folder)
    assert torch.equal(again.logits, first.logits) and torch.equal(again.boxes, first.boxes)

    # a later stage alone uses the stored labels: the export carries them as the "views" config
    summary = _run(out, *stored, "--stages", "export")
    assert (Path(summary["dataset_folder"]) / "views").is_dir()


# ============================================================================ README and CLI


def _fenced_blocks(text: str, lang: str = "bash") -> list[tuple[str, str]]:
    """(marker comment before the fence or "", body) of every ```lang block, also indented ones
    (a block inside a list item), whose body is dedented."""
    out = []
    pattern = rf"(?:(<!--[^>]*-->)\s*\n)?^([ \t]*)```{lang}\n(.*?)\n\2```"
    for m in re.finditer(pattern, text, flags=re.S | re.M):
        out.append((m.group(1) or "", textwrap.dedent(m.group(3))))
    return out


def _commands(block: str) -> list[list[str]]:
    """Shell commands of a block (comments dropped, ``&&`` / ``;`` / ``\\``-continuations handled)."""
    cmds = []
    for line in block.replace("\\\n", " ").splitlines():
        line = "" if line.lstrip().startswith("#") else line.split(" #", 1)[0].strip()
        for part in re.split(r"&&|;|\|", line):
            if part.strip():
                cmds.append(shlex.split(part))
    return cmds


def _distill_args(cmd: list[str]) -> list[str] | None:
    for i, tok in enumerate(cmd):
        if tok.endswith("recipes/distill.py"):
            return cmd[i + 1 :]
    return None


@pytest.mark.parametrize("doc", ["README.md", "docs/stages.md", "docs/scaling.md", "docs/results.md"])
def test_doc_commands_refer_to_existing_files(doc):
    path = REPO / doc
    if not path.exists():
        pytest.skip(f"{doc} not written yet")
    blocks = _fenced_blocks(path.read_text())
    assert blocks, f"{doc} has no bash blocks"
    distill_calls = 0
    for _, block in blocks:
        for cmd in _commands(block):
            for i, tok in enumerate(cmd):
                if re.search(r"\.(ya?ml|py|json|sh)$", tok) and ("/" in tok or tok.endswith(".py")):
                    if tok.startswith("/") or "<" in tok or tok in ("gvbsm_config.json",):
                        continue  # absolute / placeholder / a file of an exported folder
                    assert (REPO / tok).exists(), f"{doc}: `{' '.join(cmd)}` refers to missing {tok}"
                if tok == "--config_file":
                    cfg = REPO / cmd[i + 1]
                    assert cfg.parent == ACCELERATE_CONFIGS and cfg.exists(), f"{doc}: bad --config_file {cmd[i + 1]}"
            if cmd[:3] == ["pip", "install", "-e"]:
                extras = re.findall(r"\[([^\]]*)\]", cmd[3])
                pyproject = (REPO / "pyproject.toml").read_text()
                declared = re.search(r"\[project\.optional-dependencies\]\n(.*?)\n\n", pyproject, re.S)
                for extra in (extras[0].split(",") if extras else []):
                    assert re.search(rf"^{extra.strip()}\s*=", declared.group(1), re.M), f"unknown extra {extra}"
            args = _distill_args(cmd)
            if args is None or "--help" in args or "-h" in args:
                continue
            distill_calls += 1
            assert "--config" in args, f"{doc}: `{' '.join(cmd)}` has no --config"
            i = args.index("--config")
            config, rest = args[i + 1], args[:i] + args[i + 2 :]
            if (REPO / config).exists():  # every flag of the command is a recipe field
                _parse(REPO / config, *rest)
    if doc == "README.md":
        assert distill_calls >= 2


def test_readme_recipe_paths_exist():
    """Backticked ``recipes/...`` paths in the README text (``{a,b}`` expanded)."""
    text = README.read_text()
    paths = re.findall(r"`(recipes/[^`\s]*)`", text)
    assert paths
    for p in paths:
        m = re.search(r"\{([^}]*)\}", p)
        for expanded in ([p[: m.start()] + alt + p[m.end():] for alt in m.group(1).split(",")] if m else [p]):
            assert (REPO / expanded).exists(), f"README mentions missing {expanded}"


def test_distill_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(DISTILL), "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--config", "--output_dir", "--teachers", "--ipc", "--syn_iterations", "--stages", "--redo",
                   "--relabel_mode", "--push_dataset"):
        assert option in proc.stdout, f"--help does not mention {option}"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    m = re.search(r"awk '([^']*)' README\.md", ci)
    assert m, ".ci/run no longer extracts its command with awk"
    extracted = subprocess.run(["awk", m.group(1), str(README)], capture_output=True, text=True, check=True).stdout
    blocks = [body for marker, body in _fenced_blocks(README.read_text()) if marker == "<!-- test-command -->"]
    assert len(blocks) == 1, "README needs exactly one block after <!-- test-command -->"
    assert extracted.rstrip("\n") == blocks[0]
    assert "pytest" in blocks[0] and "pip install -e" in blocks[0]
    assert 'bash -euo pipefail -c "$cmd"' in ci
    # the main command is the documented default recipe on the CPU accelerate config
    (main,) = [body for marker, body in _fenced_blocks(README.read_text()) if marker == "<!-- main-command -->"]
    assert "recipes/accelerate_configs/cpu.yaml" in main and "recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml" in main


def test_stage_cache_redo_and_recipe_changes_invalidate_later_stages(tmp_path):
    """``--redo recover`` and a changed recover field both recompute recover and every later
    stage, never an earlier one; an unchanged recipe recomputes nothing."""
    from gvbsm_hf.pipeline import STAGES, StageCache

    recipe = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path)])
    cache = StageCache(tmp_path, [], recipe)
    for stage in STAGES:
        cache.mark(stage)
    assert not any(StageCache(tmp_path, [], recipe).redo_requested(s) for s in STAGES)
    redo = StageCache(tmp_path, ["recover"], recipe)
    assert [s for s in STAGES if redo.redo_requested(s)] == ["recover", "relabel", "evaluate", "export"]
    changed = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--syn_lr", "0.123"])
    cache = StageCache(tmp_path, [], changed)
    assert [s for s in STAGES if cache.redo_requested(s)] == ["recover", "relabel", "evaluate", "export"]
    assert cache.changed["recover"] == ["syn_lr"]
    assert "syn_lr" in cache.describe_changes()
    student = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--gamma", "0.2"])
    assert [s for s in STAGES if StageCache(tmp_path, [], student).redo_requested(s)] == ["evaluate", "export"]
    # the stored views are one per student epoch: more epochs relabel too
    epochs = parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--num_train_epochs", "7"])
    assert [s for s in STAGES if StageCache(tmp_path, [], epochs).redo_requested(s)] == ["relabel", "evaluate", "export"]


_WORLD = """
import sys
from pathlib import Path
from accelerate import PartialState
s = PartialState(cpu=True)  # what the pipeline's Accelerator gets from the recipe's use_cpu: true
# one file per process: two processes printing to one pipe interleave their lines
Path(sys.argv[1], f"rank{s.process_index}.txt").write_text(
    f"process {s.process_index} of {s.num_processes} on {s.device.type}")
"""


def test_cpu_2proc_config_starts_two_processes(tmp_path):
    """``accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml`` (the file the
    process-count error names) starts two CPU processes that see each other."""
    script = tmp_path / "world.py"
    script.write_text(_WORLD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"),
                           "--main_process_port", "0", str(script), str(tmp_path)], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(f.read_text() for f in tmp_path.glob("rank*.txt")) == [
        "process 0 of 2 on cpu", "process 1 of 2 on cpu"], proc.stdout + proc.stderr[-2000:]
