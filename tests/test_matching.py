"""The fused matching loss (gvbsm_hf.matching, issue 32) against the per-layer losses it replaces in the
recover step (gvbsm_hf.losses.bn_matching_loss / conv_matching_loss, docs/method.md Eq. 1, 6, 10):
values, gradients and EMAs over several iterations with the same beta_dr draws, in float64."""

from __future__ import annotations

import pytest
import torch

from gvbsm_hf import losses
from gvbsm_hf.errors import StatisticsMismatchError
from gvbsm_hf.matching import build_layout, drop_draws, fused_matching_loss

STATS = ("channel_mean", "channel_var", "patch_mean", "patch_var")


def _targets(seed: int):
    g = torch.Generator().manual_seed(seed)
    bn = {f"bn{i}": (torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64))
          for i, c in enumerate((3, 8, 5))}
    conv = {f"conv{i}": {"channel_mean": torch.randn(c, generator=g, dtype=torch.float64),
                         "channel_var": torch.rand(c, generator=g, dtype=torch.float64),
                         "patch_mean": torch.randn(p, p, generator=g, dtype=torch.float64),
                         "patch_var": torch.rand(p, p, generator=g, dtype=torch.float64)}
            for i, (c, p) in enumerate(((1, 4), (6, 2), (4, 3), (7, 1)))}
    return bn, conv


def _leaves(bn_t, conv_t, generator):
    """Current statistics: leaves requiring grad, shaped like the targets (one iteration's hooks)."""
    bn = {n: tuple((t + 0.3 * torch.randn(t.shape, generator=generator, dtype=t.dtype)).requires_grad_(True)
                   for t in pair) for n, pair in bn_t.items()}
    conv = {n: {s: (t + 0.3 * torch.randn(t.shape, generator=generator, dtype=t.dtype)).requires_grad_(True)
                for s, t in st.items()} for n, st in conv_t.items()}
    return bn, conv


def _leaf_list(bn, conv):
    return [t for pair in bn.values() for t in pair] + [t for st in conv.values() for t in st.values()]


@pytest.mark.parametrize("alpha", [0.0, 0.8])
@pytest.mark.parametrize("beta_dr", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("drop", ["layer", "statistic"])
@pytest.mark.parametrize("ema_init", ["zero", "first"])
def test_fused_matching_equals_the_per_layer_losses_float64(alpha, beta_dr, drop, ema_init):
    bn_t, conv_t = _targets(0)
    bn_w = {"bn0": 10.0, "bn1": 1.0, "bn2": 1.0}
    conv_w = {"conv0": 10.0}
    g_old, g_new, g_data = (torch.Generator().manual_seed(5) for _ in range(3))
    old_state: dict = {}
    new_state: dict = {}
    layout = None
    for _ in range(5):
        bn, conv = _leaves(bn_t, conv_t, g_data)
        l_bn, old_state["bn"] = losses.bn_matching_loss(bn, bn_t, old_state.get("bn"), alpha=alpha,
                                                        layer_weights=bn_w, ema_init=ema_init)
        l_conv, old_state["conv"], _ = losses.conv_matching_loss(
            conv, conv_t, old_state.get("conv"), alpha=alpha, beta_dr=beta_dr, generator=g_old, layer_weights=conv_w,
            drop=drop, ema_init=ema_init)
        old_grads = torch.autograd.grad(l_bn * 0.7 + l_conv * 1.3, _leaf_list(bn, conv), allow_unused=True)

        layout = layout or build_layout(bn, conv, bn_t, conv_t, bn_weights=bn_w, conv_weights=conv_w, drop=drop)
        keep = drop_draws(layout, beta_dr, g_new)
        f_bn, f_conv = fused_matching_loss(layout, bn, conv, new_state, alpha=alpha, keep=keep, ema_init=ema_init)
        new_grads = torch.autograd.grad(f_bn * 0.7 + f_conv * 1.3, _leaf_list(bn, conv), allow_unused=True)

        assert f_bn.dtype == torch.float64
        assert torch.allclose(f_bn, l_bn.double(), rtol=1e-12, atol=1e-12)
        assert torch.allclose(f_conv, l_conv.double(), rtol=1e-12, atol=1e-12)
        for a, b in zip(old_grads, new_grads):
            a = torch.zeros_like(b) if a is None else a
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert g_old.get_state().equal(g_new.get_state())  # the same draws, in the same order
    # the EMAs of every matched term agree (a term never kept has none in the old state, and is unseen here)
    ema, seen = new_state["flat"]["ema"], new_state["flat"]["seen"]
    olds = [old_state["bn"].get(n, (None, None))[i] for n in layout.bn_layers for i in (0, 1)]
    olds += [old_state["conv"].get(n, {}).get(s) for n, st in layout.conv_layers for s in st]
    start = 0
    for size, old in zip(layout.sizes, olds):
        part, part_seen = ema[start:start + size], seen[start:start + size]
        if old is None:
            assert not part_seen.any()
        else:
            assert part_seen.all() and torch.allclose(part, old.reshape(-1).double(), rtol=1e-12, atol=1e-14)
        start += size


def test_fused_matching_float32_and_bn_only_or_conv_only():
    bn_t, conv_t = _targets(1)
    bn_t = {n: (m.float(), v.float()) for n, (m, v) in bn_t.items()}
    conv_t = {n: {s: t.float() for s, t in st.items()} for n, st in conv_t.items()}
    g = torch.Generator().manual_seed(0)
    bn, conv = _leaves(bn_t, conv_t, g)
    for use_bn, use_conv in ((True, False), (False, True)):
        b, c = (bn if use_bn else {}), (conv if use_conv else {})
        layout = build_layout(b, c, bn_t, conv_t)
        f_bn, f_conv = fused_matching_loss(layout, b, c, {}, alpha=0.0)
        ref_bn = losses.bn_matching_loss(b, bn_t, None, alpha=0.0)[0] if use_bn else torch.zeros(())
        ref_conv = losses.conv_matching_loss(c, conv_t, None, alpha=0.0, beta_dr=0.0)[0] if use_conv else torch.zeros(())
        assert f_bn.dtype == torch.float32
        assert torch.allclose(f_bn, ref_bn, rtol=1e-5) and torch.allclose(f_conv, ref_conv, rtol=1e-5)


def test_fused_matching_adopts_a_per_layer_checkpoint_and_checks_shapes():
    bn_t, conv_t = _targets(2)
    g = torch.Generator().manual_seed(0)
    bn, conv = _leaves(bn_t, conv_t, g)
    _, old_bn = losses.bn_matching_loss(bn, bn_t, None, alpha=0.5)
    _, old_conv, _ = losses.conv_matching_loss(conv, conv_t, None, alpha=0.5, beta_dr=0.0)
    bn2, conv2 = _leaves(bn_t, conv_t, g)
    ref_bn, _ = losses.bn_matching_loss(bn2, bn_t, old_bn, alpha=0.5)
    ref_conv, _, _ = losses.conv_matching_loss(conv2, conv_t, old_conv, alpha=0.5, beta_dr=0.0)
    state = {"bn": old_bn, "conv": old_conv}  # written by the per-layer losses before the fused one existed
    layout = build_layout(bn2, conv2, bn_t, conv_t)
    f_bn, f_conv = fused_matching_loss(layout, bn2, conv2, state, alpha=0.5)
    assert set(state) == {"flat"}
    assert torch.allclose(f_bn, ref_bn, rtol=1e-12) and torch.allclose(f_conv, ref_conv, rtol=1e-12)
    bad = dict(conv_t, conv1={**conv_t["conv1"], "patch_mean": torch.zeros(5, 5, dtype=torch.float64)})
    with pytest.raises(StatisticsMismatchError, match="patch size"):
        build_layout(bn2, conv2, bn_t, bad)
    with pytest.raises(StatisticsMismatchError, match="no recorded convolution"):
        build_layout(bn2, conv2, bn_t, {})
