"""feature_regression (docs/method.md Eq. 12): the ridge-regression loss against a float64 reference written
from the equation (values and gradients), the pool's Adam step against torch.optim.Adam, the engine's real
batches, resume-equals-uninterrupted with the pool in the checkpoint, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, STATS_ARGS, digits_uint8, make_teachers, small_args  # noqa: E402

from gvbsm_hf.validation import RecipeError  # noqa: E402
from gvbsm_hf.errors import GVBSMError  # noqa: E402
from gvbsm_hf.methods import get_method, method_config  # noqa: E402
from gvbsm_hf.methods.feature_regression import (  # noqa: E402
    ADAM_BETAS,
    ADAM_EPS,
    _adam_update,
    feature_regression_loss,
    feature_regression_step,
    kernel_ridge_predictions,
    pool_lifetime,
    regression_targets,
)
from gvbsm_hf.methods.registry import SynthesisStep  # noqa: E402
from gvbsm_hf.recover.job_runner import JobRunner  # noqa: E402
from gvbsm_hf.recover.jobs import plan_jobs
from gvbsm_hf.recover.engine import recover


def _reference_loss(phi_s: np.ndarray, phi_r: np.ndarray, t_s: np.ndarray, t_r: np.ndarray, rho: float) -> float:
    """Eq. 12 in float64 numpy, written from the equation (explicit inverse)."""
    k_ss = phi_s @ phi_s.T
    lam = rho * np.trace(k_ss) / phi_s.shape[0]
    pred = (phi_r @ phi_s.T) @ np.linalg.inv(k_ss + lam * np.eye(phi_s.shape[0])) @ t_s
    return float(((pred - t_r) ** 2).sum() / t_r.size)


@pytest.mark.parametrize("seed", range(5))
def test_loss_and_gradients_match_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, b, d, k = 7, 11, 5 + seed, 4
    phi_s = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    phi_r = torch.randn(b, d, generator=g, dtype=torch.float64)
    t_s = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    t_r = torch.randn(b, k, generator=g, dtype=torch.float64)
    rho = 0.05 * (seed + 1)
    loss = feature_regression_loss(phi_s, phi_r, t_s, t_r, rho)
    ref = _reference_loss(*(v.detach().numpy() for v in (phi_s, phi_r, t_s, t_r)), rho)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    loss.backward()
    # gradients against central finite differences of the numpy reference
    eps = 1e-6
    for tensor, grad in ((phi_s, phi_s.grad), (t_s, t_s.grad)):
        base = [v.detach().numpy().copy() for v in (phi_s, phi_r, t_s, t_r)]
        which = 0 if tensor is phi_s else 2
        num = np.zeros_like(base[which])
        for idx in np.ndindex(*num.shape):
            plus = [a.copy() for a in base]
            minus = [a.copy() for a in base]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            num[idx] = (_reference_loss(*plus, rho) - _reference_loss(*minus, rho)) / (2 * eps)
        np.testing.assert_allclose(grad.numpy(), num, rtol=1e-5, atol=1e-8)


def test_predictions_reproduce_targets_when_real_batch_is_the_support():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(6, 20, generator=g, dtype=torch.float64)  # N < D: K_SS invertible, interpolation as ridge -> 0
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    pred = kernel_ridge_predictions(phi, phi, t, ridge=1e-12)
    torch.testing.assert_close(pred, t, rtol=1e-6, atol=1e-6)
    # a large ridge shrinks the predictions towards 0
    assert kernel_ridge_predictions(phi, phi, t, ridge=1e6).abs().max() < 1e-4 * t.abs().max()


def test_pool_adam_step_equals_torch_adam():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.01, betas=ADAM_BETAS, eps=ADAM_EPS)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, grad in enumerate(grads, start=1):
        ref.grad = grad.clone()
        opt.step()
        p, m, v = _adam_update(p, grad, m, v, step, 0.01)
        torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return make_teachers(2, epochs=1)


def _fr_args(**kw):
    base = dict(syn_method="feature_regression", syn_fr_backbone="convnet32", syn_fr_real_batch=20,
                syn_fr_online_steps=3, syn_fr_pool_size=2, syn_lr=0.01, syn_iterations=8, syn_checkpoint_every=4)
    base.update(kw)
    return small_args(**base)


def test_real_batch_is_class_balanced_over_the_job_classes(teachers):
    real = digits_uint8()
    config = method_config("feature_regression", _fr_args())
    job = plan_jobs(10, config.ipc, config.syn_classes_per_batch, config.syn_slots_per_batch)[1]
    runner = JobRunner(job, [], SPEC, config, torch.device("cpu"), Path("/nonexistent"), None, real)
    x, labels = runner.real_batch(runner.draw_real_rows())
    per_class = config.syn_fr_real_batch // len(job.classes)
    assert labels.tolist() == [c for c in job.classes for _ in range(per_class)]
    # every drawn image is a real image of its class: find it among the class's images
    images, all_labels = real
    normed = SPEC.normalize(images)
    for img, c in zip(x, labels):
        same = normed[all_labels == c]
        assert bool(((same - img).abs().flatten(1).amax(1) < 1e-6).any())


@pytest.mark.parametrize("options", [{}, {"syn_fr_stagger": True, "syn_fr_targets": "ensemble"}])
def test_resume_gives_the_same_images_as_uninterrupted(tmp_path, teachers, options):
    real = digits_uint8()
    full = recover(teachers, [None, None], SPEC, _fr_args(**options), stats_args=STATS_ARGS,
                   output_dir=tmp_path / "full", real_train=real)
    assert recover(teachers, [None, None], SPEC, _fr_args(**options), stats_args=STATS_ARGS, output_dir=tmp_path / "cut",
                   real_train=real, stop_after_iterations=5) is None  # checkpoint mid-way (5 % 4 != 0)
    resumed = recover(teachers, [None, None], SPEC, _fr_args(**options), stats_args=STATS_ARGS,
                      output_dir=tmp_path / "cut", real_train=real)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=1e-6)
    # the optimisation moved the real images it started from, and a different pool changes them
    other = recover(teachers, [None, None], SPEC, _fr_args(**options, syn_fr_pool_size=1), stats_args=STATS_ARGS,
                    output_dir=tmp_path / "other", real_train=real)
    assert (other.images - full.images).abs().max() > 1e-3


def test_the_loss_falls_on_digits(tmp_path, teachers):
    import json

    real = digits_uint8()
    recover(teachers, [None, None], SPEC, _fr_args(syn_iterations=60, syn_checkpoint_every=20, syn_lr=0.05,
                                                   syn_fr_online_steps=60, syn_fr_pool_size=1, syn_fr_real_batch=100,
                                                   syn_classes_per_batch=10, syn_slots_per_batch=4),
            stats_args=STATS_ARGS, output_dir=tmp_path / "fall", real_train=real)
    log = [json.loads(line) for line in (tmp_path / "fall" / "jobs" / "job_00000.log.jsonl").read_text().splitlines()]
    assert log[-1]["feature_regression"] < 0.8 * log[0]["feature_regression"], log


def test_needs_real_train_and_validates_its_fields(teachers):
    with pytest.raises(GVBSMError, match="real train split"):
        recover(teachers, [None, None], SPEC, _fr_args(syn_init="noise"), stats_args=STATS_ARGS,
                output_dir="/tmp/never-written")
    assert get_method("feature_regression").needs_real(method_config("feature_regression", _fr_args(syn_init="noise")))
    with pytest.raises(RecipeError, match="syn_fr_backbone"):
        _fr_args(syn_fr_backbone="no_such_net")
    with pytest.raises(RecipeError, match="syn_fr_pool_size"):
        _fr_args(syn_fr_pool_size=0)
    with pytest.raises(RecipeError, match="syn_fr_ridge"):
        _fr_args(syn_fr_ridge=0.0)
    with pytest.raises(RecipeError, match="syn_fr_targets"):
        _fr_args(syn_fr_targets="teachers")
    with pytest.raises(GVBSMError, match="'syn_fr_pool_size' is not an option of synthesis method 'gvbsm'"):
        method_config("gvbsm", small_args(syn_fr_pool_size=2))


def test_ensemble_targets_are_the_teachers_mean_logits_with_gradients():
    """T_S / T_R of syn_fr_targets=ensemble against a float64 mean of linear teachers (Eq. 8 without LN), and the
    pixel gradient of T_S through every teacher, not only the iteration's."""
    torch.manual_seed(0)
    heads = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(3)]
    x = torch.randn(5, 1, 2, 6, requires_grad=True)
    real = torch.randn(7, 1, 2, 6)
    k = 1
    step = SynthesisStep(config=None, x=x, logits=heads[k](x), labels=torch.zeros(5, dtype=torch.long),
                         teacher=SimpleNamespace(model=heads[k]), state={}, generator=torch.Generator(), iteration=0,
                         real_x=real, teachers=tuple(heads), teacher_index=k)
    weights = [(h[1].weight.detach().double().numpy(), h[1].bias.detach().double().numpy()) for h in heads]
    xs, rs = x.detach().double().flatten(1).numpy(), real.double().flatten(1).numpy()
    ref_s = np.mean([xs @ w.T + b for w, b in weights], axis=0)
    ref_r = np.mean([rs @ w.T + b for w, b in weights], axis=0)
    t_s, t_r = regression_targets(step, ensemble=True)
    np.testing.assert_allclose(t_s.detach().double().numpy(), ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_r.double().numpy(), ref_r, rtol=1e-5, atol=1e-5)
    assert not t_r.requires_grad
    v = np.arange(15, dtype=np.float64).reshape(5, 3)  # d<v, T_S>/dx = v @ mean_f W_f
    (t_s * torch.as_tensor(v, dtype=torch.float32)).sum().backward()
    ref_grad = v @ np.mean([w for w, _ in weights], axis=0)
    np.testing.assert_allclose(x.grad.double().flatten(1).numpy(), ref_grad, rtol=1e-5, atol=1e-5)
    # the iteration's teacher alone with the default
    t_s, t_r = regression_targets(step, ensemble=False)
    np.testing.assert_allclose(t_r.double().numpy(), rs @ weights[k][0].T + weights[k][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(t_s, step.logits.float())


def test_pool_lifetimes_and_staggered_redraws(teachers):
    assert [pool_lifetime(m, 4, 100, first=True) for m in range(4)] == [25, 50, 75, 100]
    assert [pool_lifetime(m, 3, 10, first=True) for m in range(3)] == [4, 7, 10]
    assert pool_lifetime(0, 4, 100, first=False) == 100

    def ages(stagger: bool, drop_life_at: int = -1) -> list[tuple[int, int]]:
        config = method_config("feature_regression", _fr_args(syn_fr_stagger=stagger, syn_fr_online_steps=4,
                                                              syn_fr_pool_size=2))
        torch.manual_seed(0)
        x = torch.randn(4, SPEC.channels, SPEC.image_size, SPEC.image_size, requires_grad=True)
        real_x = torch.randn(6, SPEC.channels, SPEC.image_size, SPEC.image_size)
        job_state, seen = {}, []
        for it in range(12):
            if it == drop_life_at:  # as in a checkpoint written before lifetimes were stored
                for entry in job_state["pool"].values():
                    del entry["life"]
            step = SynthesisStep(config=config, x=x, logits=teachers[0](x), labels=torch.zeros(4, dtype=torch.long),
                                 teacher=SimpleNamespace(model=teachers[0]), state={}, generator=torch.Generator().manual_seed(it),
                                 iteration=it, job_state=job_state, real_x=real_x, teachers=tuple(teachers))
            feature_regression_step(step)
            seen.append((it % 2, int(job_state["pool"][str(it % 2)]["age"])))
        return seen

    # synchronised: both networks live 4 steps; staggered: network 0's first life is 2 steps, then 4
    assert [a for _, a in ages(False)] == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 2, 2]
    assert [a for _, a in ages(True)] == [1, 1, 2, 2, 1, 3, 2, 4, 3, 1, 4, 2]
    # an older checkpoint's entries (no lifetime) live syn_fr_online_steps steps
    assert [a for _, a in ages(True, drop_life_at=6)] == [1, 1, 2, 2, 1, 3, 2, 4, 3, 1, 4, 2]
    assert [a for _, a in ages(True, drop_life_at=4)] == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 2, 2]
