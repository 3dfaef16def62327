"""Randomness drawn a checkpoint interval at a time (issue 32, build step 1; docs/method.md "Recover"): the same
numbers from the same generator in the same order as the per-iteration draws, uploaded in one copy per dtype,
and a run killed mid-interval resumes to the same images."""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, STATS_ARGS, digits_uint8, make_statistics, make_teachers, small_args  # noqa: E402

from gvbsm_hf.methods import get_method, method_config  # noqa: E402
from gvbsm_hf.recover.draws import upload_batched  # noqa: E402
from gvbsm_hf.recover.engine import recover  # noqa: E402
from gvbsm_hf.recover.job_runner import JobRunner  # noqa: E402
from gvbsm_hf.recover.jobs import plan_jobs  # noqa: E402
from gvbsm_hf.recover.teacher_slot import TeacherSlot  # noqa: E402


@pytest.fixture(scope="module")
def teachers_and_stats():
    torch.manual_seed(0)
    teachers = make_teachers(2, epochs=1)
    return teachers, make_statistics(teachers)


@pytest.fixture(scope="module")
def class_stats(teachers_and_stats):
    """The same teachers' statistics with the per-class ones (syn_class_weight < 1)."""
    from gvbsm_hf.record.config import StatisticsArguments
    from gvbsm_hf.record.engine import record_statistics

    teachers, _ = teachers_and_stats
    images, labels = digits_uint8()
    batches = list(zip(images[:400].split(100), labels[:400].split(100)))
    return [record_statistics(t, batches, SPEC, StatisticsArguments(
        stats_patch_size=4, stats_conv_target="input", stats_augment="authors", stats_patch_mode="resize",
        stats_per_class=True)) for t in teachers]


def _runner(teachers, stats, stack, folder: Path, method: str, real, **options) -> JobRunner:
    config = method_config(method, small_args(syn_method=method, **options))
    stats_args = dataclasses.replace(STATS_ARGS, stats_augment="authors")  # the statistics' family, any syn_augment
    slots = [TeacherSlot(t, s, config, stats_args, torch.device("cpu"), stack) for t, s in zip(teachers, stats)]
    job = plan_jobs(SPEC.num_classes, config.ipc, config.syn_classes_per_batch, config.syn_slots_per_batch)[0]
    folder.mkdir(parents=True, exist_ok=True)
    return JobRunner(job, slots, SPEC, config, torch.device("cpu"), folder, None, real)


FR = dict(syn_fr_backbone="convnet32", syn_fr_real_batch=10, syn_fr_online_steps=3, syn_fr_pool_size=2, syn_lr=0.01)
CASES = [
    ("gvbsm", {}),
    ("gvbsm", {"syn_beta_dr_unit": "statistic", "syn_augment": "per_image_rrc", "syn_backbone_choice": "uniform"}),
    ("gvbsm", {"syn_beta_dr": 1.0, "syn_augment": "none"}),
    ("gvbsm", {"syn_mixed_precision": "bf16", "syn_channels_last": True}),  # the GPU recipe's precision and layout
    ("sre2l", {}), ("sre2l+dd", {}), ("sre2l+gbm", {"syn_backbone_choice": "uniform"}),
    ("feature_regression", FR), ("feature_regression", FR | {"syn_fr_stagger": True}),
    ("gvbsm", {"syn_class_weight": 0.5}), ("gvbsm", {"syn_class_weight": 0.3, "syn_beta_dr_unit": "statistic"}),
]
"""Every registered optimised method (random_real and rded select, they draw nothing per iteration)."""


def test_every_optimised_method_is_covered():
    from gvbsm_hf.methods import list_methods  # the registry's names

    optimised = {name for name in list_methods() if get_method(name).optimised}
    assert optimised == {method for method, _ in CASES}


@pytest.mark.parametrize("method,options", CASES)
def test_interval_draws_match_the_per_iteration_draws(teachers_and_stats, class_stats, tmp_path, method, options):
    teachers, stats = teachers_and_stats
    if "syn_class_weight" in options:  # soft category-aware matching: per-class drops after the global ones
        stats = class_stats
    real = digits_uint8() if method == "feature_regression" else None
    options = {"syn_iterations": 10, "syn_checkpoint_every": 4} | options
    with ExitStack() as stack:
        ahead = _runner(teachers, stats, stack, tmp_path / "ahead", method, real, **options)
        each = _runner(teachers, stats, stack, tmp_path / "each", method, real, **options)
        each.draw_fn = None  # the loss draws from the generator itself: one iteration's draws at a time
        assert ahead.predraws and not each.predraws
        for i in range(10):
            assert ahead.rng_state().equal(each.rng_state())  # the same state before every iteration
            ahead.step()
            each.step()
            checkpoint = min(10, i - i % 4 + 4)
            assert ahead.plan.stop <= checkpoint  # a teacher's first step may draw inside (its layout unknown)
            if i >= 4:  # every teacher has stepped: whole intervals, from checkpoint to checkpoint
                assert (ahead.plan.start, ahead.plan.stop) == (i - i % 4, checkpoint)
            assert (each.plan.start, each.plan.stop) == (i, i + 1)
            assert torch.equal(ahead.x, each.x), (method, i)
        assert ahead.generator.get_state().equal(each.generator.get_state())  # the run's draws, no more
        a, b = ahead.flush_components(), each.flush_components()
        assert a == b


def test_upload_batched_makes_one_buffer_per_dtype():
    items = [{"boxes": torch.rand(3, 4), "flip": torch.tensor([True, False, True]), "shift": torch.tensor([1, 2]),
              "seed": 7}, {"boxes": torch.rand(1, 4), "flip": torch.tensor([False]), "shift": torch.tensor([3, 4])}]
    placed = upload_batched(items, torch.device("cpu"))
    for before, after in zip(items, placed):
        assert after.keys() == before.keys()
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after[key], value) and after[key].shape == value.shape
            else:
                assert after[key] == value
    for key in ("boxes", "flip", "shift"):  # both items' tensors of a dtype are views of one buffer
        assert placed[0][key].untyped_storage().data_ptr() == placed[1][key].untyped_storage().data_ptr()
    assert placed[0]["boxes"].untyped_storage().data_ptr() != placed[0]["shift"].untyped_storage().data_ptr()


def test_kill_mid_interval_resumes_to_the_same_images(teachers_and_stats, tmp_path):
    teachers, stats = teachers_and_stats
    args = small_args(syn_iterations=10, syn_checkpoint_every=4, syn_backbone_choice="uniform",
                      syn_beta_dr_unit="statistic")
    full = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "full")
    for stop in (2, 5):  # killed inside the first interval, then inside the second (6 = 1 + 5: mid-interval)
        assert recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut",
                       stop_after_iterations=stop) is None
    resumed = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut")
    assert torch.equal(full.images, resumed.images)


def test_not_compilable_names_the_configs_syn_compile_refuses():
    loss = get_method("gvbsm").loss
    assert "syn_class_weight" in loss.not_compilable(method_config("gvbsm", small_args(syn_method="gvbsm",
                                                                                     syn_class_weight=0.5)))
    assert loss.not_compilable(method_config("gvbsm", small_args(syn_method="gvbsm"))) is None
    assert get_method("feature_regression").loss.not_compilable(None)
