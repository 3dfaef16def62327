"""Losses against float64 references written from docs/method.md's equations (values and gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gvbsm_hf import losses
from gvbsm_hf.errors import GVBSMError, NonFiniteLossError, StatisticsMismatchError

CONV_KEYS = ("channel_mean", "channel_var", "patch_mean", "patch_var")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- SDS (Eq. 1, 6)


def _sds_reference(cur: np.ndarray, tgt: np.ndarray, ema: np.ndarray | None, alpha: float):
    """Eq. 6 written out: EMA step, value ||t - ema_new||, gradient (ema_new - t)/||ema_new - t||."""
    new = cur.copy() if ema is None else alpha * ema + (1 - alpha) * cur
    diff = tgt - new
    value = math.sqrt(sum(float(d) ** 2 for d in diff.ravel()))
    grad = -diff / value
    return value, grad, new


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.8])
@pytest.mark.parametrize("with_ema", [False, True])
def test_sds_value_and_gradient(seed, shape, alpha, with_ema):
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(shape, generator=g).requires_grad_(True)
    tgt = torch.randn(shape, generator=g)
    ema = torch.randn(shape, generator=g) if with_ema else None
    loss, new_ema = losses.sds_matching_loss(cur, tgt, ema, alpha)
    (grad,) = torch.autograd.grad(loss, cur)
    value, ref_grad, ref_ema = _sds_reference(_np(cur), _np(tgt), None if ema is None else _np(ema), alpha)
    _close(loss, value)
    _close(grad, ref_grad)
    _close(new_ema, ref_ema)
    assert not new_ema.requires_grad and new_ema.dtype == torch.float32


@pytest.mark.parametrize("seed", [3, 4])
def test_sds_alpha0_is_plain_eq1(seed):
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(11, generator=g, dtype=torch.float64).requires_grad_(True)
    tgt = torch.randn(11, generator=g, dtype=torch.float64)
    ema = torch.randn(11, generator=g)  # must not matter with alpha = 0
    ref = torch.sqrt(((cur - tgt) ** 2).sum())  # Eq. 1
    (ref_grad,) = torch.autograd.grad(ref, cur)
    for e in (None, ema):
        c = cur.detach().float().requires_grad_(True)
        loss, _ = losses.sds_matching_loss(c, tgt.float(), e, 0.0)
        (grad,) = torch.autograd.grad(loss, c)
        _close(loss, ref.detach())
        _close(grad, ref_grad)


def test_sds_gradient_does_not_reach_ema_or_target():
    cur = torch.randn(5, requires_grad=True)
    tgt = torch.randn(5, requires_grad=True)
    ema = torch.randn(5, requires_grad=True)
    loss, new_ema = losses.sds_matching_loss(cur, tgt, ema, 0.6)
    loss.backward()
    assert ema.grad is None and tgt.grad is None and cur.grad is not None
    assert not new_ema.requires_grad


def test_sds_ema_recurrence_over_calls():
    g = torch.Generator().manual_seed(7)
    alpha, tgt = 0.8, torch.randn(6, generator=g)
    ema, ref_ema = None, None
    for _ in range(5):
        cur = torch.randn(6, generator=g).requires_grad_(True)
        loss, ema = losses.sds_matching_loss(cur, tgt, ema, alpha)
        (grad,) = torch.autograd.grad(loss, cur)
        value, ref_grad, ref_ema = _sds_reference(_np(cur), _np(tgt), ref_ema, alpha)
        _close(loss, value)
        _close(grad, ref_grad)
        _close(ema, ref_ema)


def test_sds_bf16_input_is_computed_in_float32():
    g = torch.Generator().manual_seed(8)
    cur = torch.randn(64, generator=g).bfloat16().requires_grad_(True)
    tgt = torch.randn(64, generator=g)
    loss, ema = losses.sds_matching_loss(cur, tgt, None, 0.5)
    assert loss.dtype == torch.float32 and ema.dtype == torch.float32
    value, _, _ = _sds_reference(_np(cur), _np(tgt), None, 0.5)
    _close(loss, value)


def test_sds_shape_mismatch_raises():
    with pytest.raises(StatisticsMismatchError, match="record it again"):
        losses.sds_matching_loss(torch.randn(4), torch.randn(5), None, 0.0)


# --------------------------------------------------------------------------- BN matching


def _bn_case(seed: int, channels=(3, 8, 5)):
    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}.bn" for i in range(len(channels))]
    stats = {n: (torch.randn(c, generator=g).requires_grad_(True), torch.rand(c, generator=g).requires_grad_(True))
             for n, c in zip(names, channels)}
    targets = {n: (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5) for n, c in zip(names, channels)}
    emas = {n: (torch.randn(c, generator=g), torch.rand(c, generator=g)) for n, c in zip(names, channels)}
    return names, stats, targets, emas


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("multiplier", [1.0, 10.0])
@pytest.mark.parametrize("use_emas", [False, True])
def test_bn_matching_sum(seed, alpha, multiplier, use_emas):
    names, stats, targets, emas = _bn_case(seed)
    weights = losses.first_layer_weights(names, multiplier)
    loss, new_emas = losses.bn_matching_loss(stats, targets, emas if use_emas else None, alpha=alpha, layer_weights=weights)
    leaves = [t for n in names for t in stats[n]]
    grads = torch.autograd.grad(loss, leaves)
    ref_value, ref_grads = 0.0, []
    for i, n in enumerate(names):
        w = multiplier if i == 0 else 1.0
        for j in range(2):  # mean, var
            old = _np(emas[n][j]) if use_emas else None
            v, gr, e = _sds_reference(_np(stats[n][j]), _np(targets[n][j]), old, alpha)
            ref_value += w * v
            ref_grads.append(w * gr)
            _close(new_emas[n][j], e)
    _close(loss, ref_value)
    for gr, rg in zip(grads, ref_grads):
        _close(gr, rg)


def test_bn_missing_target_names_layer():
    names, stats, targets, _ = _bn_case(0)
    del targets[names[1]]
    with pytest.raises(StatisticsMismatchError, match=names[1].replace(".", r"\.")) as e:
        losses.bn_matching_loss(stats, targets, None, alpha=0.0)
    assert "same teacher" in str(e.value)


def test_bn_shape_mismatch_raises():
    names, stats, targets, _ = _bn_case(0)
    targets[names[0]] = (torch.zeros(99), torch.ones(99))
    with pytest.raises(StatisticsMismatchError, match="another teacher"):
        losses.bn_matching_loss(stats, targets, None, alpha=0.0)


def test_first_layer_weights():
    assert losses.first_layer_weights(["a", "b", "c"], 10.0) == {"a": 10.0, "b": 1.0, "c": 1.0}
    assert losses.first_layer_weights([], 10.0) == {}


# --------------------------------------------------------------------------- Conv matching (Eq. 10)


def _conv_case(seed: int, channels=(3, 6, 4, 5), patches=(16, 4, 4, 1)):
    g = torch.Generator().manual_seed(seed)
    names = [f"block{i}.conv" for i in range(len(channels))]
    shapes = {n: {"channel_mean": (c,), "channel_var": (c,), "patch_mean": (p,), "patch_var": (p,)}
              for n, c, p in zip(names, channels, patches)}
    stats = {n: {k: torch.randn(s, generator=g).requires_grad_(True) for k, s in shapes[n].items()} for n in names}
    targets = {n: {k: torch.randn(s, generator=g) for k, s in shapes[n].items()} for n in names}
    emas = {n: {k: torch.randn(s, generator=g) for k, s in shapes[n].items()} for n in names}
    return names, stats, targets, emas


def _conv_reference(names, stats, targets, emas, keep, alpha, weights):
    """Eq. 10 over the kept (layer, statistic) terms only; returns value, grads (0 if dropped), emas."""
    value, grads, new = 0.0, {}, {}
    for n in names:
        for k in CONV_KEYS:
            if not keep[(n, k)]:
                grads[(n, k)] = np.zeros(stats[n][k].shape)
                continue
            old = None if emas is None else _np(emas[n][k])
            v, gr, e = _sds_reference(_np(stats[n][k]), _np(targets[n][k]), old, alpha)
            value += weights[n] * v
            grads[(n, k)] = weights[n] * gr
            new[(n, k)] = e
    return value, grads, new


def _check_conv(names, stats, targets, emas, alpha, keep, weights, loss, new_emas, kept):
    leaves = [stats[n][k] for n in names for k in CONV_KEYS]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True) if kept else None
    value, ref_grads, ref_new = _conv_reference(names, stats, targets, emas, keep, alpha, weights)
    assert kept == sum(keep.values())
    _close(loss, value)
    if grads is not None:
        for (n, k), gr in zip([(n, k) for n in names for k in CONV_KEYS], grads):
            _close(gr, ref_grads[(n, k)])
    for n in names:
        for k in CONV_KEYS:
            if keep[(n, k)]:
                _close(new_emas[n][k], ref_new[(n, k)])
            elif emas is not None:  # a dropped term keeps its previous EMA
                _close(new_emas[n][k], _np(emas[n][k]))
            else:
                assert k not in new_emas.get(n, {})


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.8])
@pytest.mark.parametrize("use_emas", [False, True])
def test_conv_matching_keeps_everything_at_beta0(seed, alpha, use_emas):
    names, stats, targets, emas = _conv_case(seed)
    emas = emas if use_emas else None
    weights = losses.first_layer_weights(names, 10.0)
    loss, new_emas, kept = losses.conv_matching_loss(
        stats, targets, emas, alpha=alpha, beta_dr=0.0, layer_weights=weights
    )
    keep = {(n, k): True for n in names for k in CONV_KEYS}
    _check_conv(names, stats, targets, emas, alpha, keep, weights, loss, new_emas, kept)
    assert kept == 16


def test_conv_matching_keeps_nothing_at_beta1():
    names, stats, targets, emas = _conv_case(3)
    g = torch.Generator().manual_seed(0)
    loss, new_emas, kept = losses.conv_matching_loss(stats, targets, emas, alpha=0.5, beta_dr=1.0, generator=g)
    assert kept == 0 and float(loss.detach()) == 0.0
    for n in names:
        for k in CONV_KEYS:
            torch.testing.assert_close(new_emas[n][k], emas[n][k])
    # the zero lives on the statistics' device (so that it stacks with the other loss components)
    meta = {n: {k: v.to("meta") for k, v in d.items()} for n, d in stats.items()}
    zero, _, _ = losses.conv_matching_loss(meta, targets, None, alpha=0.5, beta_dr=1.0)
    assert zero.device.type == "meta" and zero.dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 5, 11])
@pytest.mark.parametrize("drop", ["statistic", "layer"])
def test_conv_matching_drops_a_reproducible_subset(seed, drop):
    names, stats, targets, emas = _conv_case(seed)
    weights = losses.first_layer_weights(names, 10.0)
    alpha, beta = 0.4, 0.5
    run = lambda: losses.conv_matching_loss(  # noqa: E731
        stats, targets, emas, alpha=alpha, beta_dr=beta, layer_weights=weights,
        generator=torch.Generator().manual_seed(seed), drop=drop,
    )
    loss, new_emas, kept = run()
    loss2, new_emas2, kept2 = run()
    assert kept == kept2 and float(loss.detach()) == float(loss2.detach())
    # the documented draw: one CPU uniform per term (per layer with drop="layer"), dropped when u < beta_dr
    n_draws = 16 if drop == "statistic" else 4
    u = torch.rand(n_draws, generator=torch.Generator().manual_seed(seed)).tolist()
    keep = {}
    for i, n in enumerate(names):
        for j, k in enumerate(CONV_KEYS):
            keep[(n, k)] = (u[4 * i + j] if drop == "statistic" else u[i]) >= beta
    _check_conv(names, stats, targets, emas, alpha, keep, weights, loss, new_emas, kept)
    if drop == "layer":
        assert kept % 4 == 0


def test_conv_matching_beta_half_keeps_about_half():
    names, stats, targets, _ = _conv_case(0, channels=(2,) * 25, patches=(4,) * 25)
    g = torch.Generator().manual_seed(123)
    kept = [losses.conv_matching_loss(stats, targets, None, alpha=0.0, beta_dr=0.5, generator=g)[2] for _ in range(4)]
    assert all(30 <= k <= 70 for k in kept)  # 100 terms, Binomial(100, 0.5)
    assert len(set(kept)) > 1  # the generator advances between calls


def test_conv_shape_mismatch_says_patch_size():
    names, stats, targets, _ = _conv_case(0)
    targets[names[2]]["patch_mean"] = torch.zeros(64)
    with pytest.raises(StatisticsMismatchError, match="patch size") as e:
        losses.conv_matching_loss(stats, targets, None, alpha=0.0, beta_dr=0.0)
    assert names[2] in str(e.value) and "resolution" in str(e.value)


def test_conv_missing_layer_and_bad_arguments():
    names, stats, targets, _ = _conv_case(0)
    del targets[names[3]]
    with pytest.raises(StatisticsMismatchError, match=names[3].replace(".", r"\.")):
        losses.conv_matching_loss(stats, targets, None, alpha=0.0, beta_dr=0.0)
    with pytest.raises(GVBSMError, match=r"\[0, 1\]"):
        losses.conv_matching_loss(stats, targets, None, alpha=0.0, beta_dr=1.5)
    with pytest.raises(GVBSMError, match=r"\[0, 1\]"):
        losses.bn_matching_loss({}, {}, None, alpha=-0.1)


# --------------------------------------------------------------------------- Data densification (Eq. 4-5)


def _dd_reference(images: torch.Tensor, labels: torch.Tensor, tau: float, pool_factor: int = 1):
    """Eq. 4-5 in float64: avg-pool by explicit block means, per-class Gram, eigvalsh, KL written out."""
    x = images.detach().double().requires_grad_(True)
    n, c, h, w = x.shape
    xp = x
    if pool_factor > 1:
        xp = x.reshape(n, c, h // pool_factor, pool_factor, w // pool_factor, pool_factor).mean(dim=(3, 5))
    flat = xp.reshape(n, -1)
    total = x.sum() * 0
    for y in sorted(set(labels.tolist())):
        rows = [i for i in range(n) if int(labels[i]) == y]
        if len(rows) < 2:
            continue
        xy = flat[rows]
        sigma = torch.linalg.eigvalsh(xy @ xy.T)
        p = torch.exp(sigma.detach() / tau) / torch.exp(sigma.detach() / tau).sum()
        log_q = sigma - torch.log(torch.exp(sigma).sum())
        total = total + sum(p[i] * (torch.log(p[i]) - log_q[i]) for i in range(len(rows)))
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


def _dd_check(images, labels, tau, pool_size, pool_factor, rtol=2e-4, atol=1e-6):
    x = images.clone().requires_grad_(True)
    loss = losses.data_densification_loss(x, labels, tau=tau, pool_size=pool_size)
    (grad,) = torch.autograd.grad(loss, x)
    ref, ref_grad = _dd_reference(images, labels, tau, pool_factor)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * 10)
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "labels",
    [[0, 0, 0, 1, 1, 1, 2, 2, 2], [2, 0, 1, 0, 2, 1, 1, 0, 2], [0, 0, 0, 0, 1, 1, 2, 2, 3]],
    ids=["equal-sorted", "equal-shuffled", "unequal-with-singleton"],
)
@pytest.mark.parametrize("tau", [4.0, 2.0])
def test_dd_value_and_gradient(seed, labels, tau):
    g = torch.Generator().manual_seed(seed)
    images = 0.08 * torch.randn(len(labels), 3, 8, 8, generator=g)
    _dd_check(images, torch.tensor(labels), tau, 32, 1)


def test_dd_singleton_classes_are_skipped():
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 0, 1, 2])
    images = 0.08 * torch.randn(5, 3, 8, 8, generator=g)
    loss, grad = _dd_check(images, labels, 4.0, 32, 1)
    assert grad[3:].abs().max() == 0  # classes 1 and 2 have one image each
    # dropping the singletons does not change the value
    alone = losses.data_densification_loss(images[:3], labels[:3])
    torch.testing.assert_close(alone, loss.detach())
    # no class with two images: zero, with a graph
    x = images.clone().requires_grad_(True)
    zero = losses.data_densification_loss(x, torch.arange(5))
    zero.backward()
    assert float(zero.detach()) == 0.0 and x.grad is not None and x.grad.abs().max() == 0


def test_dd_pools_at_64_px_and_not_at_32_px():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    big = 0.02 * torch.randn(6, 1, 64, 64, generator=g)
    loss64, _ = _dd_check(big, labels, 4.0, 32, 2)
    unpooled, _ = _dd_reference(big, labels, 4.0, 1)
    assert not math.isclose(float(loss64.detach()), float(unpooled), rel_tol=1e-2)
    small = 0.04 * torch.randn(6, 1, 32, 32, generator=g)
    _dd_check(small, labels, 4.0, 32, 1)


def test_dd_under_autocast_is_float32():
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    images = 0.08 * torch.randn(6, 3, 8, 8, generator=g)
    plain = losses.data_densification_loss(images, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = losses.data_densification_loss(images, labels)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_dd_flattens_the_spectrum_of_a_low_rank_batch():
    g = torch.Generator().manual_seed(0)
    k, n, d = 2, 8, 3 * 8 * 8
    u = torch.randn(k, 1, d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    coef = 1 + 0.3 * torch.randn(k, n, 1, generator=g)
    x = (coef * u + 0.02 * torch.randn(k, n, d, generator=g)).reshape(k * n, 3, 8, 8).requires_grad_(True)
    labels = torch.arange(k).repeat_interleave(n)

    def spread() -> torch.Tensor:  # std of softmax(Sigma_y) per class, float64
        with torch.no_grad():
            xy = x.detach().double().reshape(k, n, d)
            return torch.softmax(torch.linalg.eigvalsh(xy @ xy.transpose(1, 2)), -1).std(-1)

    before = spread()
    first = float(losses.data_densification_loss(x, labels).detach())
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(100):
        loss = losses.data_densification_loss(x, labels)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all()  # near-degenerate eigenvalues: gradient stays finite
        opt.step()
    after = spread()
    assert (before > 0.3).all()  # rank one: softmax(Sigma) is nearly one-hot
    assert (after < 0.1 * before).all()
    assert float(loss.detach()) < 0.05 * first


def test_dd_rejects_bad_shapes():
    with pytest.raises(GVBSMError, match=r"\(N, C, H, W\)"):
        losses.data_densification_loss(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(GVBSMError, match="labels"):
        losses.data_densification_loss(torch.randn(4, 1, 4, 4), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- Ensemble and soft labels (Eq. 8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("logit_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ensemble_logits(seed, logit_norm, dtype):
    g = torch.Generator().manual_seed(seed)
    scales = (0.5, 3.0, 10.0)
    logits = [(s * torch.randn(6, 5, generator=g)).to(dtype).requires_grad_(True) for s in scales]
    out = losses.ensemble_logits(logits, logit_norm=logit_norm)
    assert out.dtype == torch.float32
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), logits)

    ref_in = [z.detach().double().requires_grad_(True) for z in logits]
    if logit_norm:
        norms = [torch.sqrt(sum(z[i, j] ** 2 for i in range(6) for j in range(5))) for z in ref_in]
        mean_norm = sum(norms) / len(norms)
        ref = sum(mean_norm / nf * z for nf, z in zip(norms, ref_in)) / len(ref_in)
    else:
        ref = sum(ref_in) / len(ref_in)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr.double(), rg, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    if logit_norm:  # every rescaled teacher has the mean Frobenius norm
        assert torch.allclose(
            torch.stack([torch.linalg.norm(mean_norm.detach() / nf.detach() * z.detach()) for nf, z in zip(norms, ref_in)]),
            mean_norm.detach().expand(3),
        )


def test_ensemble_needs_a_teacher():
    with pytest.raises(GVBSMError, match="at least one teacher"):
        losses.ensemble_logits([])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_labels(temperature):
    z = torch.randn(5, 7)
    e = np.exp(_np(z) / temperature)
    _close(losses.soft_labels(z.bfloat16(), temperature), e / e.sum(-1, keepdims=True), rtol=2e-2, atol=1e-2)
    _close(losses.soft_labels(z, temperature), e / e.sum(-1, keepdims=True))


# --------------------------------------------------------------------------- Student losses (Eq. 11, KL, CE)


def _labels(kind: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    if kind == "index":
        return torch.randint(0, k, (n,), generator=g)
    lam = torch.rand(n, 1, generator=g)  # CutMix-style mixture of two one-hots
    a, b = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    eye = torch.eye(k)
    return lam * eye[a] + (1 - lam) * eye[b]


def _ce_reference(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n, k = s.shape
    y = labels.double() if labels.is_floating_point() else torch.eye(k, dtype=torch.float64)[labels]
    log_sm = s - torch.log(torch.exp(s).sum(-1, keepdim=True))
    return -sum((y[i] * log_sm[i]).sum() for i in range(n)) / n


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("reduction", ["mean_elements", "sum_classes"])
@pytest.mark.parametrize("label_kind", ["index", "probability"])
@pytest.mark.parametrize("gamma", [0.0, 0.15])
def test_mse_gt_loss(seed, reduction, label_kind, gamma):
    g = torch.Generator().manual_seed(seed)
    n, k = 6, 9
    s = (2 * torch.randn(n, k, generator=g)).requires_grad_(True)
    z = (3 * torch.randn(n, k, generator=g)).requires_grad_(True)
    labels = _labels(label_kind, n, k, g)
    loss = losses.mse_gt_loss(s, z, labels, gamma=gamma, reduction=reduction)
    loss.backward()
    assert z.grad is None  # z~ is a target

    s64 = s.detach().double().requires_grad_(True)
    z64 = z.detach().double()
    sq = [sum((s64[i, c] - z64[i, c]) ** 2 for c in range(k)) for i in range(n)]
    mse = sum(sq) / (n * k) if reduction == "mean_elements" else sum(sq) / n
    ref = mse + gamma * _ce_reference(s64, labels)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_mse_gt_errors():
    with pytest.raises(GVBSMError, match="as many classes"):
        losses.mse_gt_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), gamma=0.1)
    with pytest.raises(GVBSMError, match="sum_classes"):
        losses.mse_gt_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), gamma=0.1, reduction="sum")


@pytest.mark.parametrize("label_kind", ["index", "probability"])
def test_cross_entropy_loss(label_kind):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 4, generator=g).requires_grad_(True)
    labels = _labels(label_kind, 5, 4, g)
    loss = losses.cross_entropy_loss(s.bfloat16() if label_kind == "index" else s, labels)
    s64 = s.detach().double().requires_grad_(True)
    s_in = s64.bfloat16().double() if label_kind == "index" else s64
    ref = _ce_reference(s_in, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    if label_kind == "probability":
        (grad,) = torch.autograd.grad(loss, s)
        (ref_grad,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(GVBSMError, match="class indices"):
        losses.cross_entropy_loss(s, torch.rand(5, 3))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("scale_by_t2", [False, True])
def test_kl_soft_label_loss(seed, temperature, scale_by_t2):
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 6
    s = (2 * torch.randn(n, k, generator=g)).requires_grad_(True)
    z = (2 * torch.randn(n, k, generator=g)).requires_grad_(True)
    loss = losses.kl_soft_label_loss(s, z, temperature=temperature, scale_by_t2=scale_by_t2)
    loss.backward()
    assert z.grad is None

    s64 = s.detach().double().requires_grad_(True)
    zt, st = z.detach().double() / temperature, s64 / temperature
    p = torch.exp(zt) / torch.exp(zt).sum(-1, keepdim=True)
    q = torch.exp(st) / torch.exp(st).sum(-1, keepdim=True)
    ref = sum((p[i, c] * (torch.log(p[i, c]) - torch.log(q[i, c]))) for i in range(n) for c in range(k)) / n
    if scale_by_t2:
        ref = ref * temperature**2
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises(bad):
    with pytest.raises(NonFiniteLossError, match="synthesis loss is not finite") as e:
        losses.check_finite(torch.tensor(bad), "synthesis loss")
    assert "learning rate" in str(e.value)
    assert isinstance(e.value, FloatingPointError)


def test_check_finite_passes_finite():
    losses.check_finite(torch.tensor(1.5), "loss")
    losses.check_finite(torch.randn(3), "loss")
