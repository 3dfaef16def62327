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
        assert eager.rng_state().equal(compiled.rng_state())  # the same draws


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


# ---------------------------------------------------------------- equivalence with the step before issue 32

def _old_matching_loss(step):
    """The gvbsm-family loss as it was before issue 32 (per-layer losses, drop draws inside, eigvalsh DD on
    the labels), for global matching (syn_class_weight 1)."""
    from gvbsm_hf import losses  # the per-layer losses kept in gvbsm_hf.losses are the old computation

    c, t = step.config, step.teacher
    ce = torch.nn.functional.cross_entropy(step.logits.float(), step.labels)
    bn = conv = dd = ce.new_zeros(())
    if c.syn_r_bn > 0:
        bn_multiplier = c.syn_first_layer_multiplier if c.syn_first_layer == "first_bn_and_conv" else 1.0
        bn, step.state["bn"] = losses.bn_matching_loss(
            t.hooks.bn_stats, t.bn_targets, step.state.get("bn"), alpha=c.syn_alpha,
            layer_weights=t.layer_weights("bn", bn_multiplier), ema_init=c.syn_ema_init)
    if c.syn_r_conv > 0:
        conv, step.state["conv"], _ = losses.conv_matching_loss(
            t.hooks.conv_stats, t.conv_targets, step.state.get("conv"), alpha=c.syn_alpha, beta_dr=c.syn_beta_dr,
            generator=step.generator, layer_weights=t.layer_weights("conv", c.syn_first_layer_multiplier),
            drop=c.syn_beta_dr_unit, ema_init=c.syn_ema_init)
    if c.syn_dd:
        dd = losses.data_densification_loss(step.x.float(), step.labels, tau=c.syn_dd_tau,
                                            pool_size=c.syn_dd_pool_size, pool=c.syn_dd_pool)
    loss = c.syn_ce_weight * ce + c.syn_r_bn * bn + c.syn_r_conv * conv + c.syn_dd_weight * dd
    return loss, {"ce": ce, "bn": bn, "conv": conv, "dd": dd}


@pytest.mark.parametrize("method,options", [
    ("gvbsm", {}), ("gvbsm", {"syn_beta_dr_unit": "statistic", "syn_ema_init": "first", "syn_dd_pool": "downsample_only"}),
    ("sre2l", {}), ("sre2l+dd", {}), ("sre2l+gbm", {}),
])
def test_new_step_matches_the_old_step(teachers_and_stats, tmp_path, method, options):
    from contextlib import ExitStack  # only this test opens hooks by hand

    teachers, stats = teachers_and_stats
    with ExitStack() as stack:
        new = _runner(teachers, stats, stack, tmp_path / "new", method, **options)
        old = _runner(teachers, stats, stack, tmp_path / "old", method, **options)
        old.loss_fn = _old_matching_loss
        old.draw_fn = None
        # the old optimiser: torch.optim.Adam's single-tensor loop (the lr a tensor only so that step() can fill it)
        old.optimizer = torch.optim.Adam([old.x], lr=torch.tensor(old.args.syn_lr), betas=tuple(old.args.syn_adam_betas))
        for _ in range(6):
            for runner in (new, old):
                for other in (new, old):  # only the stepping runner's hooks record
                    for slot in other.slots:
                        slot.hooks.enabled = False
                runner.step()
            # the same gradient (float tolerance: float32 eigvalsh and per-term norms before, float64 Jacobi and
            # one segment sum now), then the same pixels and Adam moments again, so Adam's eps cannot amplify
            # round-off on pixels whose gradient is ~0 into visible differences over the iterations
            scale = old.x.grad.abs().max()
            assert torch.allclose(new.x.grad, old.x.grad, rtol=1e-3, atol=1e-4 * float(scale)), \
                (new.x.grad - old.x.grad).abs().max() / scale
            with torch.no_grad():
                old.x.copy_(new.x)
                for key in ("exp_avg", "exp_avg_sq"):
                    old.optimizer.state[old.x][key].copy_(new.optimizer.state[new.x][key])
        assert new.rng_state().equal(old.rng_state())  # the same draws, in the same order
        a, b = new.flush_components(), old.flush_components()
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])) for k in b), (a, b)


def test_feature_regression_cholesky_solve_matches_linalg_solve():
    from gvbsm_hf.methods.feature_regression import kernel_ridge_predictions  # the Eq. 12 solver under test

    g = torch.Generator().manual_seed(0)
    phi_s, phi_r = torch.randn(12, 30, generator=g), torch.randn(7, 30, generator=g)
    targets = torch.randn(12, 5, generator=g, dtype=torch.float64)
    s, r = phi_s.double(), phi_r.double()
    k_ss = s @ s.T
    lam = 0.1 * torch.diagonal(k_ss).sum() / 12
    ref = (r @ s.T) @ torch.linalg.solve(k_ss + lam * torch.eye(12, dtype=torch.float64), targets)
    assert torch.allclose(kernel_ridge_predictions(phi_s, phi_r, targets, 0.1), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_custom_backwards_pass_gradcheck(channels_last):
    from gvbsm_hf.moments import channel_statistics, conv_statistics  # the hooks' statistics, float64 here

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 7, generator=g, dtype=torch.float64) + 2.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: channel_statistics(t), (x,))
    assert torch.autograd.gradcheck(lambda t: tuple(conv_statistics(t, 4, "partial").values()), (x,))


def test_compiled_recover_resumes_bit_identically(teachers_and_stats, tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(JobRunner, "compile_backend", "aot_eager")  # fullgraph alike; no C compiler needed
    teachers, stats = teachers_and_stats
    args = small_args(syn_iterations=6, syn_checkpoint_every=3, syn_compile=True, syn_classes_per_batch=10)
    full = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "full")
    assert recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut",
                   stop_after_iterations=4) is None
    resumed = recover(teachers, stats, SPEC, args, stats_args=STATS_ARGS, output_dir=tmp_path / "cut")
    assert torch.equal(full.images, resumed.images)  # every step compiled, from the first (a probe forward)
