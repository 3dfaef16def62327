"""Per-seed reuse of finished student runs follows the package's one rule for "this field changes the
result" (``gvbsm_hf.fingerprint``: every field but ``NON_RESULT_FIELDS``), like the stage cache."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import SPEC, STUDENT_KW, Record, digits_uint8, make_args

from gvbsm_hf.evaluate.callbacks import EMA_STATE_FILE
from gvbsm_hf.evaluate.reuse import (
    RUN_RESULT_FILE,
    changed_fields,
    data_fingerprints,
    last_complete_checkpoint,
    run_settings,
)
from gvbsm_hf.evaluate.runs import evaluate_students
from gvbsm_hf.fingerprint import NON_RESULT_FIELDS

BASE = dict(student="convnet", loss_type="ce", num_train_epochs=1)

RESULT_CHANGES = {
    "dataloader_drop_last": True, "learning_rate": 1e-2, "weight_decay": 0.1, "data_seed": 5,
    "gradient_accumulation_steps": 2, "max_steps": 2, "num_train_epochs": 2, "per_device_train_batch_size": 8,
    "adam_beta1": 0.8, "adam_epsilon": 1e-6, "max_grad_norm": 0.5, "optim": "sgd", "lr_scheduler_type": "linear",
    "warmup_steps": 1, "label_smoothing_factor": 0.1, "gamma": 0.3, "kd_temperature": 2.0, "cutmix_prob": 0.5,
    "cutmix_ce_label": "mixed", "student_augment": False, "student_crop_scale": [0.5, 1.0],
    "student_channels_last": True, "student_ema_decay": 0.9, "student_lr_smoothing": 2.0, "eval_strategy": "epoch",
}
"""Fields that change the trained student (or its reported row)."""

SAME_RESULT_CHANGES = {
    "logging_steps": 7, "logging_strategy": "epoch", "report_to": "tensorboard", "save_strategy": "steps",
    "save_steps": 3, "save_total_limit": 1, "disable_tqdm": False, "logging_first_step": True,
    "eval_seeds": [0, 1, 2], "eval_students": ["convnet", "resnet18"],
}
"""Fields that do not: where and how a run reports and saves, and which runs exist."""


@pytest.fixture(scope="module")
def data():
    x, y = digits_uint8()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"distilled": (x[1000:1060], y[1000:1060]), "val": (x[1400:1600], y[1400:1600])}


def _settings(tmp_path, data, **changes):
    args = make_args(tmp_path, **{**BASE, **changes})
    fps = data_fingerprints(*data["distilled"], data["val"], None, None)
    return run_settings(args, "hard", "epoch", STUDENT_KW, fps)


@pytest.mark.parametrize("field", sorted(RESULT_CHANGES))
def test_a_result_field_changes_the_run_fingerprint(tmp_path, data, field):
    base, changed = _settings(tmp_path, data), _settings(tmp_path, data, **{field: RESULT_CHANGES[field]})
    assert changed["fingerprint"] != base["fingerprint"]
    assert f"training.{field}" in changed_fields(base, changed)


@pytest.mark.parametrize("field", sorted(SAME_RESULT_CHANGES))
def test_a_non_result_field_keeps_the_run_fingerprint(tmp_path, data, field):
    base, changed = _settings(tmp_path, data), _settings(tmp_path, data, **{field: SAME_RESULT_CHANGES[field]})
    assert changed["fingerprint"] == base["fingerprint"]


def test_the_rule_is_the_stage_cache_rule(tmp_path, data):
    """Every TrainingArguments field is in the fingerprint except the stage cache's deny-list (and the
    two fields that only choose which runs exist)."""
    settings = _settings(tmp_path, data)
    args = make_args(tmp_path, **BASE)
    every = set(args.to_dict())
    assert set(settings["training"]) == every - NON_RESULT_FIELDS - {"eval_seeds", "eval_students"}
    assert {"dataloader_drop_last", "learning_rate", "seed", "data_seed"} <= set(settings["training"])
    assert "output_dir" not in str(settings)  # no absolute path: a moved output folder keeps its runs
    assert str(tmp_path) not in str(settings)


def _run(data, tmp_path, out="out", **changes):
    rec = Record()
    xs, ys = data["distilled"]
    args = make_args(tmp_path, **{**BASE, "output_dir": str(tmp_path / out), **changes})
    res = evaluate_students(xs, ys, data["val"], SPEC, args, seeds=[0], backbone_kwargs=STUDENT_KW, callbacks=[rec])
    return rec.trained, res["per_run"][0]


def test_changing_a_training_field_retrains_and_a_non_result_field_reuses(tmp_path, data):
    trained, first = _run(data, tmp_path)
    assert trained == [0]
    for field in ("dataloader_drop_last", "learning_rate", "weight_decay", "data_seed", "gradient_accumulation_steps",
                  "max_steps"):
        trained, row = _run(data, tmp_path, **{field: RESULT_CHANGES[field]})
        assert trained == [0], f"{field} changed but the saved run was reused"
    trained, again = _run(data, tmp_path)  # back to the first settings: trained again (the file holds max_steps')
    assert trained == [0] and again["top1"] == first["top1"] and again["train_loss"] == first["train_loss"]
    for field in ("logging_steps", "report_to", "save_steps"):
        trained, row = _run(data, tmp_path, **{field: SAME_RESULT_CHANGES[field]})
        assert trained == [], f"{field} changed and the run was retrained"
        assert row["top1"] == first["top1"]
    shutil.move(str(tmp_path / "out"), str(tmp_path / "moved"))  # another output_dir location
    trained, row = _run(data, tmp_path, out="moved")
    assert trained == [] and row["top1"] == first["top1"]
    assert row["output_dir"] == str(tmp_path / "moved" / "convnet" / "seed0")
    assert (tmp_path / "moved" / "convnet" / "seed0" / RUN_RESULT_FILE).is_file()


def test_a_checkpoint_without_its_student_ema_is_not_resumed_from(tmp_path):
    """The EMA file is written right after ``trainer_state.json`` (``on_save``): a kill in between
    leaves a checkpoint that an EMA run must not resume from."""
    for step in (4, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (tmp_path / "checkpoint-4" / EMA_STATE_FILE).write_bytes(b"")
    (tmp_path / "checkpoint-12").mkdir()  # no trainer_state.json: cut short
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(str(tmp_path), with_ema=True) == str(tmp_path / "checkpoint-4")
