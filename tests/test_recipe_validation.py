"""The whole recipe is validated when it is parsed, before any data is loaded or stage runs
(issue 13, defect 3), and the stage cache / recipe.json come from one serializer (defect 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gvbsm_hf.validation import RecipeError
from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.fingerprint import NON_RESULT_FIELDS
from gvbsm_hf.fingerprint import config_to_dict
from gvbsm_hf.methods import get_method, method_config
from gvbsm_hf.recipe import parse_recipe, recipe_to_dict
from gvbsm_hf.stages import stage_fingerprints

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "digits" / "smoke.yaml"
DEFAULT = REPO / "recipes" / "fashion_mnist" / "gvbsm_ipc10_cpu.yaml"
DISTILL = REPO / "recipes" / "distill.py"


def _parse(*extra: str):
    return parse_recipe(["--config", str(SMOKE), *extra])


@pytest.mark.parametrize("flags, field", [
    (["--relabel_mode", "stord"], "relabel_mode"),
    (["--syn_method", "gvbms"], "syn_method"),
    (["--baselines", "sre2l_dd"], "baselines"),
    (["--loss_type", "mse"], "loss_type"),
    (["--stats_conv_target", "out"], "stats_conv_target"),
    (["--method_args", '{"gvbsm": {"syn_backbone_choice": "roundrobin"}}'], "syn_backbone_choice"),
    (["--stages", "squeeze", "recovr"], "stages"),
])
def test_bad_choices_fail_at_parse_time(flags, field):
    with pytest.raises((GVBSMError, SystemExit)) as info:
        _parse(*flags)
    if isinstance(info.value, GVBSMError):
        assert field in str(info.value)


@pytest.mark.parametrize("field, value", [("relabel_mode", "stord"), ("syn_method", "gvbms"), ("baselines", ["sre2l_dd"]),
                                          ("loss_type", "mse"), ("stats_conv_target", "out")])
def test_bad_choices_in_the_yaml_fail_at_parse_time(tmp_path, field, value):
    """argparse never checks a YAML value against `choices`: __post_init__ does."""
    import yaml

    data = yaml.safe_load(SMOKE.read_text()) | {field: value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GVBSMError, match=field):
        parse_recipe(["--config", str(path)])


@pytest.mark.parametrize("flags, match", [
    (["--ipc", "0"], "ipc"),
    (["--syn_lr", "nan"], "syn_lr"),
    (["--syn_adam_betas", "0.5", "1.5"], "syn_adam_betas"),
    (["--method_args", '{"gvbsm": {"syn_alpha": 1.0}}'], r"syn_alpha=1.0 is out of range"),
    (["--syn_crop_scale", "0.9", "0.1"], "syn_crop_scale"),
    (["--cutmix_prob", "2"], "cutmix_prob"),
    (["--push_dataset", "true"], "dataset_repo_id"),
    (["--push_to_hub", "true"], "push_dataset"),
    (["--teachers", "convnet32", "convnte32_d2"], "convnet32_d2"),
    (["--student", "convnet_128"], "student"),
])
def test_bad_values_fail_at_parse_time(flags, match):
    with pytest.raises(GVBSMError, match=match):
        _parse(*flags)


def test_wrong_type_in_the_yaml_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(SMOKE.read_text().replace("ipc: 1\n", 'ipc: "ten"\n'))
    with pytest.raises(RecipeError, match=r"typo\.yaml.*ipc='ten' must be an integer"):
        parse_recipe(["--config", str(path)])


def test_a_method_field_the_method_does_not_have_is_refused():
    with pytest.raises(RecipeError, match=r"'syn_alpha' is not an option of synthesis method 'random_real'.*"
                                          r"it is an option of \['gvbsm'"):
        _parse("--syn_method", "random_real", "--method_args", '{"random_real": {"syn_alpha": 0.5}}')


def test_a_flat_method_flag_on_the_command_line_names_method_args():
    with pytest.raises(GVBSMError, match=r"syn_alpha is an option of .*--method_args '\{\"gvbsm\": \{\"syn_alpha\""):
        _parse("--syn_alpha", "0.5")


@pytest.mark.parametrize("method", ["random_real", "sre2l", "rded"])
def test_default_recipe_runs_any_method_from_the_command_line(method):
    """The README default recipe groups gvbsm's options under method_args.gvbsm: another method just works,
    built from its own defaults, and gvbsm's group is kept (unused)."""
    r = parse_recipe(["--config", str(DEFAULT), "--syn_method", method])
    config = method_config(method, r.synthesis)
    assert config.syn_method == method and "gvbsm" in r.synthesis.method_args
    defaults = get_method(method).config_class()
    assert all(getattr(config, o) == getattr(defaults, o) for o in config.options())


def test_method_args_from_the_command_line_merge_into_the_recipe():
    r = parse_recipe(["--config", str(DEFAULT), "--method_args", '{"gvbsm": {"syn_alpha": 0.5}, "rded": {"syn_rded_factor": 1}}'])
    assert r.synthesis.method_args["gvbsm"]["syn_alpha"] == 0.5
    assert r.synthesis.method_args["gvbsm"]["syn_r_bn"] == 0.01  # the recipe's other options are kept
    assert method_config("gvbsm", r.synthesis).syn_alpha == 0.5
    assert method_config("rded", r.synthesis, baseline=True).syn_rded_factor == 2  # baselines: own defaults


@pytest.mark.parametrize("method_args, match", [
    ('{"rded": {"syn_rded_factor": 0}}', r"syn_rded_factor=0 is out of range"),
    ('{"gvbsm": {"syn_alpha": 1.5}}', r"syn_alpha=1.5 is out of range"),
    ('{"gvbms": {}}', r"method_args.gvbms='gvbms' is not one of .*did you mean 'gvbsm'"),
    ('[1, 2]', r"must map method names to their options"),
    ('{"gvbsm": ', r"not valid JSON"),
])
def test_every_method_group_is_checked_at_parse_time(method_args, match):
    with pytest.raises(RecipeError, match=match):
        _parse("--method_args", method_args)


def test_an_old_flat_recipe_still_works_and_says_how_to_convert(tmp_path, caplog):
    flat = tmp_path / "flat.yaml"
    flat.write_text(SMOKE.read_text().replace("method_args:\n  gvbsm:\n    syn_dd_pool_size: 32\n", "syn_dd_pool_size: 16\n"))
    assert "method_args" not in flat.read_text()
    with caplog.at_level("WARNING"):
        r = parse_recipe(["--config", str(flat)])
    assert r.synthesis.method_args == {"gvbsm": {"syn_dd_pool_size": 16}}
    assert "method_args: {gvbsm: {...}}" in caplog.text
    other = tmp_path / "other.yaml"
    other.write_text(flat.read_text() + "syn_fr_ridge: 0.1\n")
    with pytest.raises(RecipeError, match=r"\['syn_fr_ridge'\] are not options of syn_method 'gvbsm'.*"
                                          r"method_args: \{feature_regression: \{syn_fr_ridge: ...\}\}"):
        parse_recipe(["--config", str(other)])


@pytest.mark.parametrize("flags", [["--relabel_mode", "stord"], ["--syn_method", "gvbms"]])
def test_distill_exits_within_seconds_and_trains_nothing(tmp_path, flags):
    out = tmp_path / "X"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(DISTILL), "--config", str(SMOKE), *flags, "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - t0 < 60  # parse-time: no data loaded, no teacher trained
    assert not (out / "teachers").exists()
    assert flags[0].lstrip("-") in proc.stderr


# ----------------------------------------------------------------------------- serializer

@pytest.mark.parametrize("flag, value", [
    ("--gradient_accumulation_steps", "2"), ("--adam_beta2", "0.99"), ("--max_grad_norm", "0.5"),
    ("--lr_scheduler_kwargs", '{"num_cycles": 0.4}'), ("--student_channels_last", "true"),
])
def test_every_training_field_invalidates_the_evaluate_stage(flag, value):
    base, changed = stage_fingerprints(_parse()), stage_fingerprints(_parse(flag, value))
    assert changed["evaluate"] != base["evaluate"] and changed["export"] != base["export"]
    assert changed["recover"] == base["recover"]  # earlier stages are kept


def test_fields_that_change_nothing_keep_the_cache():
    base = stage_fingerprints(_parse())
    assert stage_fingerprints(_parse("--output_dir", "elsewhere", "--logging_steps", "7", "--save_strategy", "epoch",
                                     "--dataloader_workers", "1")) == base
    assert stage_fingerprints(_parse("--method_args", '{"gvbsm": {"syn_alpha": 0.5}}'))["recover"] != base["recover"]
    assert stage_fingerprints(_parse("--teacher_epochs", "3"))["squeeze"] != base["squeeze"]


def test_recipe_json_holds_every_field_and_no_secret():
    r = _parse("--bf16", "false", "--seed", "7", "--hub_token", "hf_secret")
    d = recipe_to_dict(r)
    for name in ("bf16", "seed", "use_cpu", "gradient_accumulation_steps", "adam_beta2", "ipc", "teachers",
                 "stats_patch_size", "relabel_mode", "dataset_name", "baselines"):
        assert name in d, name
    assert d["seed"] == 7 and "hf_secret" not in json.dumps(d) and "hub_token" not in d
    assert set(config_to_dict(r.training, NON_RESULT_FIELDS)).isdisjoint({"output_dir", "logging_dir", "report_to"})


def test_an_option_added_since_a_run_keeps_its_stages_while_at_its_default(tmp_path):
    """Upgrading gvbsm-hf adds fields; a finished stage whose stored config lacks a field that is at
    its default is not recomputed, and one set away from its default is."""
    from gvbsm_hf.pipeline_config import STAGES
    from gvbsm_hf.stage_cache import StageCache

    recipe = _parse("--output_dir", str(tmp_path))
    cache = StageCache(tmp_path, [], recipe)
    for stage in STAGES:
        cache.mark(stage)
    state = json.loads((tmp_path / "stages.json").read_text())
    for stage in ("record", "recover"):  # as written by an older version: no such fields, another fingerprint
        state[stage]["config"].pop("stats_max_samples" if stage == "record" else "syn_classes_per_batch")
        state[stage]["fingerprint"] = "older"
    (tmp_path / "stages.json").write_text(json.dumps(state))
    assert not StageCache(tmp_path, [], recipe).redo  # the defaults: nothing recomputed
    changed = StageCache(tmp_path, [], _parse("--output_dir", str(tmp_path), "--syn_classes_per_batch", "5"))
    assert changed.changed == {"recover": ["syn_classes_per_batch"]} and "recover" in changed.redo
