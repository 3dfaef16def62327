"""The recover step a GPU can run at full speed (issue 32): ``syn_compile`` compiles each teacher's step
with ``torch.compile(fullgraph=True)`` (no graph break, hence no host sync inside it) and gives the eager
step's images; the fused Adam with a tensor learning rate resumes bit-identically."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, STATS_ARGS, make_statistics, make_teachers, small_args  # noqa: E402

from gvbsm_hf.errors import GVBSMError  # noqa: E402
from gvbsm_hf.methods import method_config  # noqa: E402
from gvbsm_hf.recover.engine import recover  # noqa: E402
from gvbsm_hf.recover.job_runner import JobRunner  # noqa: E402
from gvbsm_hf.recover.jobs import plan_jobs  # noqa: E402
from gvbsm_hf.recover.teacher_slot import TeacherSlot  # noqa: E402


@pytest.fixture(scope="module")
def teachers_and_stats():
    teachers = make_teachers(2, epochs=1)
    return teachers, make_statistics(teachers)


def _runner(teachers, stats, stack, folder: Path, method: str = "gvbsm", **options) -> JobRunner:
    config = method_config(method, small_args(syn_method=method, syn_iterations=100), **options)
    slots = [TeacherSlot(t, s, config, STATS_ARGS, torch.device("cpu"), stack) for t, s in zip(teachers, stats)]
    job = plan_jobs(SPEC.num_classes, config.ipc, config.syn_classes_per_batch, config.syn_slots_per_batch)[0]
    folder.mkdir(parents=True, exist_ok=True)
    return JobRunner(job, slots, SPEC, config, torch.device("cpu"), folder, None)


@pytest.mark.parametrize("method,options", [("gvbsm", {}), ("gvbsm", {"syn_beta_dr_unit": "statistic"}),
                                            ("sre2l", {})])
def test_compiled_step_has_no_graph_break_and_matches_eager(teachers_and_stats, monkeypatch, tmp_path, method,
                                                           options):
    from contextlib import ExitStack  # only this test opens hooks by hand

    torch._dynamo.reset()
    monkeypatch.setattr(JobRunner, "compile_backend", "aot_eager")  # fullgraph alike; no C compiler needed
    teachers, stats = teachers_and_stats
    with ExitStack() as stack:
        eager = _runner(teachers, stats, stack, tmp_path / "eager", method, **options)
        compiled = _runner(teachers, stats, stack, tmp_path / "compiled", method, syn_compile=True, **options)
        for _ in range(4):
            eager.step()
            compiled.step()
        assert compiled.compiled  # iterations after the first ran through torch.compile(fullgraph=True)
        assert torch.allclose(compiled.x, eager.x, rtol=1e-4, atol=1e-5)
        a, b = eager.flush_components(), compiled.flush_components()
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in a)
        assert eager.generator.get_state().equal(compiled.generator.get_state())  # the same draws


def test_syn_compile_refuses_a_method_without_declared_draws(teachers_and_stats, tmp_path):
    teachers, stats = teachers_and_stats
    real = (torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8), torch.arange(10).repeat(4))
    with pytest.raises(GVBSMError, match="syn_compile"):
        recover(teachers, stats, SPEC, small_args(syn_method="feature_regression", syn_compile=True,
                                                  syn_fr_backbone="convnet"),
                stats_args=STATS_ARGS, output_dir=tmp_path, real_train=real)


def test_fused_adam_tensor_lr_and_bit_identical_resume(teachers_and_stats, tmp_path):
    teachers, stats = teachers_and_stats
    args = small_args(syn_iterations=8, syn_checkpoint_every=4)
    full = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "full")
    assert recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut",
                   stop_after_iterations=5) is None  # killed after a checkpoint at 4 (and one at 5)
    resumed = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut")
    assert torch.equal(full.images, resumed.images)
    from gvbsm_hf.recover.job_runner import pixel_adam  # the optimiser the runner builds

    opt = pixel_adam(torch.zeros(2, requires_grad=True), 0.1, (0.5, 0.9))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.defaults["fused"]
