"""``GVBSMTrainingArguments`` checks, at parse time, every TrainingArguments value the student uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.trainer_utils import SchedulerType

from gvbsm_hf.evaluate.config import GVBSMTrainingArguments
from gvbsm_hf.recipe import parse_recipe
from gvbsm_hf.validation import RecipeError

SMOKE = Path(__file__).parents[1] / "recipes/digits/smoke.yaml"


def targs(**kw) -> GVBSMTrainingArguments:
    base = dict(output_dir="unused", use_cpu=True, report_to="none", eval_seeds=[0])
    return GVBSMTrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("field, bad", [
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", float("nan")),
    ("per_device_train_batch_size", 0), ("per_device_eval_batch_size", 0),
    ("gradient_accumulation_steps", 0), ("num_train_epochs", 0), ("num_train_epochs", -2.0),
])
def test_a_bad_training_value_names_the_field_and_the_fix(field, bad):
    with pytest.raises(RecipeError) as err:
        targs(**{field: bad})
    msg = str(err.value)
    assert f"{field}=" in msg and f"`{field}:`" in msg and f"--{field}" in msg  # the field, where to fix it


def test_num_train_epochs_may_be_zero_when_max_steps_counts():
    with pytest.raises(RecipeError, match="max_steps"):  # the other way out is named too
        targs(num_train_epochs=0)
    assert targs(num_train_epochs=0, max_steps=5).max_steps == 5


def test_good_values_pass():
    a = targs(learning_rate=1e-3, per_device_train_batch_size=1, per_device_eval_batch_size=1,
              gradient_accumulation_steps=1, num_train_epochs=0.5)
    assert a.num_train_epochs == 0.5


@pytest.mark.parametrize("flag", ["--learning_rate=0", "--per_device_train_batch_size=0",
                                  "--gradient_accumulation_steps=0", "--num_train_epochs=0"])
def test_the_recipe_is_refused_at_parse_time(tmp_path, flag):
    with pytest.raises(RecipeError, match=flag.split("=")[0].lstrip("-")):
        parse_recipe(["--config", str(SMOKE), "--output_dir", str(tmp_path), flag])


@pytest.mark.parametrize("zeta", [1.0, 2.5])
def test_lr_smoothing_is_the_cosine_schedule_with_a_longer_period(zeta):
    a = targs(student_lr_smoothing=zeta, lr_scheduler_type="linear", lr_scheduler_kwargs={"power": 2})
    assert a.lr_scheduler_type == SchedulerType.COSINE and a.lr_scheduler_kwargs == {"num_cycles": 0.5 / zeta}
    assert targs().lr_scheduler_type == SchedulerType.LINEAR  # untouched when off
