"""StatisticsHooks: BN/Conv statistics computed inside forward hooks (docs/method.md Eq. 1, 6, 9, 10)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gvbsm_hf.hooks import StatisticsHooks

STATS = ("channel_mean", "channel_var", "patch_mean", "patch_var")


# ----------------------------------------------------------------------------- references
def reference_conv_stats(x: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """Float64 statistics written from the definitions: loops over the patch grid."""
    x = x.double()
    n, c, h, w = x.shape
    out = {
        "channel_mean": x.mean(dim=(0, 2, 3)),
        "channel_var": ((x - x.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3)),
    }
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    means, variances = [], []
    for i in range(gh):
        for j in range(gw):
            block = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # partial at the border
            m = block.mean()
            means.append(m)
            variances.append(((block - m) ** 2).mean())
    out["patch_mean"] = torch.stack(means).view(gh, gw)
    out["patch_var"] = torch.stack(variances).view(gh, gw)
    return out


class Capture:
    """Test-side hooks that keep the Conv inputs/outputs and BN inputs (for the references)."""

    def __init__(self, model: nn.Module, target: str = "input"):
        self.conv: dict[str, torch.Tensor] = {}
        self.bn: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                self.handles.append(m.register_forward_hook(self._keep(self.conv, name, target)))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.handles.append(m.register_forward_hook(self._keep(self.bn, name, "input")))

    @staticmethod
    def _keep(store, name, target):
        def hook(module, args, output):
            store[name] = args[0] if target == "input" else output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def small_net(groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def randomise_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def weighted_loss(conv_stats, bn_stats, weights):
    total = 0.0
    for name, d in conv_stats.items():
        for k in STATS:
            total = total + (d[k].double() * weights[(name, k)]).sum()
    for name, (m, v) in bn_stats.items():
        total = total + (m.double() * weights[(name, "m")]).sum() + (v.double() * weights[(name, "v")]).sum()
    return total


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("target", ["input", "output"])
@pytest.mark.parametrize("hw,p", [((7, 7), 4), ((8, 8), 4), ((5, 9), 3), ((7, 7), 16)])
def test_stats_and_gradients_match_float64_reference(target, hw, p):
    model = randomise_bn(small_net())
    model64 = copy.deepcopy(model).double()
    x = torch.randn(5, 3, *hw) * 1.5 + 0.3

    x32 = x.clone().requires_grad_()
    with StatisticsHooks(model, conv_target=target, patch_size=p) as hooks:
        model(x32)
        conv_stats, bn_stats = dict(hooks.conv_stats), dict(hooks.bn_stats)

    x64 = x.double().requires_grad_()
    cap = Capture(model64, target)
    model64(x64)
    cap.remove()
    ref_conv = {name: reference_conv_stats(t, p) for name, t in cap.conv.items()}
    ref_bn = {name: (t.mean(dim=(0, 2, 3)), ((t - t.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3)))
              for name, t in cap.bn.items()}

    assert list(conv_stats) == list(ref_conv) == ["0", "3", "6"]
    assert list(bn_stats) == ["1", "4"]
    for name, ref in ref_conv.items():
        for k in STATS:
            got = conv_stats[name][k]
            assert got.dtype == torch.float32
            assert got.shape == ref[k].shape, (name, k)
            torch.testing.assert_close(got.double(), ref[k], rtol=1e-5, atol=1e-6)
    for name, (m, v) in ref_bn.items():
        torch.testing.assert_close(bn_stats[name][0].double(), m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn_stats[name][1].double(), v, rtol=1e-5, atol=1e-6)

    # gradients of a loss on the statistics w.r.t. the input
    weights = {(n, k): torch.randn(ref_conv[n][k].shape, dtype=torch.float64) for n in ref_conv for k in STATS}
    weights.update({(n, k): torch.randn(8, dtype=torch.float64) for n in ref_bn for k in ("m", "v")})
    (g32,) = torch.autograd.grad(weighted_loss(conv_stats, bn_stats, weights), x32)
    (g64,) = torch.autograd.grad(weighted_loss(ref_conv, ref_bn, weights), x64)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6 * g64.abs().max().item())


def test_bn_stats_equal_var_mean_and_targets_equal_running_stats():
    model = randomise_bn(small_net())
    x = torch.randn(6, 3, 10, 10)
    cap = Capture(model)
    with StatisticsHooks(model, conv=False) as hooks:
        model(x)
        assert hooks.conv_stats == {} and hooks.conv_layers == []
        for name, t in cap.bn.items():
            var, mean = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(hooks.bn_stats[name][0].double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hooks.bn_stats[name][1].double(), var, rtol=1e-5, atol=1e-6)
        targets = hooks.bn_targets()
        assert list(targets) == ["1", "4"]
        for name, (rm, rv) in targets.items():
            bn = dict(model.named_modules())[name]
            assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)
    cap.remove()


def test_large_offset_is_numerically_stable():
    """Channel offsets of 300 std: a naive float32 E[x^2]-E[x]^2 loses ~3 digits, the hook must not."""
    conv = nn.Conv2d(4, 2, 1)
    offsets = torch.tensor([300.0, -200.0, 250.0, 5.0]).view(1, 4, 1, 1)
    x = torch.randn(16, 4, 9, 9) + offsets
    with StatisticsHooks(conv, patch_size=4) as hooks:
        conv(x)
        ref = reference_conv_stats(x, 4)
        for k in STATS:
            torch.testing.assert_close(hooks.conv_stats[""][k].double(), ref[k], rtol=2e-5, atol=1e-5)
        # naive single-pass float32 is measurably worse on the channel variance (the test can fail)
        naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
        assert (naive.double() - ref["channel_var"]).abs().max() > 1e-3


def test_hooks_removed_on_exit_and_on_exception():
    model = small_net()
    before = hook_count(model)
    with StatisticsHooks(model) as hooks:
        assert hook_count(model) == before + 5 == len(hooks) + before
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with StatisticsHooks(model):
            assert hook_count(model) == before + 5
            raise RuntimeError("boom")
    assert hook_count(model) == before
    hooks = StatisticsHooks(model)
    hooks.remove()
    hooks.remove()  # idempotent
    assert hook_count(model) == before and not hooks.active


def test_enabled_clear_layer_names_and_filter():
    model = randomise_bn(small_net())
    x = torch.randn(2, 3, 8, 8)
    with StatisticsHooks(model, enabled=False) as hooks:
        assert hooks.layer_names == ["1", "4", "0", "3", "6"]  # registration order before any forward
        model(x)
        assert hooks.conv_stats == {} and hooks.bn_stats == {}
        hooks.enabled = True
        model(x)
        assert hooks.layer_names == ["0", "1", "3", "4", "6"]  # forward order
        assert set(hooks.conv_stats) == {"0", "3", "6"}
        hooks.clear()
        assert hooks.conv_stats == {} and hooks.bn_stats == {}
    with StatisticsHooks(model, layer_filter=lambda name, m: name != "3", bn=False) as hooks:
        model(x)
        assert list(hooks.conv_stats) == ["0", "6"] and hooks.bn_stats == {}
    with pytest.raises(ValueError, match="conv_target"):
        StatisticsHooks(model, conv_target="middle")


def test_bn_without_running_stats_is_skipped_and_model_without_bn():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with StatisticsHooks(model) as hooks:
        model(torch.randn(3, 1, 9, 9))
        assert hooks.bn_layers == [] and hooks.bn_stats == {} and hooks.bn_targets() == {}
        assert list(hooks.conv_stats) == ["0", "3"]
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, groups=2))
    x = torch.randn(3, 1, 9, 9)
    cap = Capture(no_bn)
    with StatisticsHooks(no_bn, patch_size=2) as hooks:
        no_bn(x)
        for name, t in cap.conv.items():
            ref = reference_conv_stats(t, 2)
            for k in STATS:
                torch.testing.assert_close(hooks.conv_stats[name][k].double(), ref[k], rtol=1e-5, atol=1e-6)
    cap.remove()


@pytest.mark.parametrize("builder", ["timm_resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_library_models_grouped_and_depthwise(builder):
    if builder == "timm_resnet18":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        tvm = pytest.importorskip("torchvision.models")
        model = getattr(tvm, builder)(weights=None, num_classes=10)
    model = randomise_bn(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    if builder != "timm_resnet18":
        assert grouped, "depthwise convs expected"
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    cap = Capture(model)
    with StatisticsHooks(model, patch_size=4) as hooks:
        model(x)
        assert set(hooks.conv_stats) == set(convs) and set(hooks.bn_stats) == set(bns)
        check = [convs[0], convs[-1]] + grouped[:2]
        for name in check:
            ref = reference_conv_stats(cap.conv[name].detach(), 4)
            for k in STATS:
                torch.testing.assert_close(hooks.conv_stats[name][k].double(), ref[k], rtol=1e-4, atol=1e-5)
        # back-propagation through every statistic works with the library's in-place ops (ReLU(inplace), +=)
        loss = sum(v.sum() for d in hooks.conv_stats.values() for v in d.values())
        loss = loss + sum(m.sum() + v.sum() for m, v in hooks.bn_stats.values())
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    cap.remove()
    assert hook_count(model) == 0


def test_channels_last_matches_contiguous():
    model = randomise_bn(small_net(groups=2))
    x = torch.randn(4, 3, 11, 11)
    with StatisticsHooks(model, patch_size=4) as hooks:
        model(x)
        ref = {n: {k: v.detach().clone() for k, v in d.items()} for n, d in hooks.conv_stats.items()}
        ref_bn = {n: (m.detach().clone(), v.detach().clone()) for n, (m, v) in hooks.bn_stats.items()}
        model_cl = model.to(memory_format=torch.channels_last)
        hooks.clear()
        cap = Capture(model_cl)
        model_cl(x.contiguous(memory_format=torch.channels_last))
        cap.remove()
        seen = cap.conv["3"]
        assert seen.is_contiguous(memory_format=torch.channels_last) and not seen.is_contiguous()
        for n, d in ref.items():
            for k in STATS:
                torch.testing.assert_close(hooks.conv_stats[n][k], d[k], rtol=1e-5, atol=1e-6)
        for n, (m, v) in ref_bn.items():
            torch.testing.assert_close(hooks.bn_stats[n][0], m, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hooks.bn_stats[n][1], v, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_statistics_are_float32():
    model = randomise_bn(small_net())
    x = torch.randn(4, 3, 8, 8)
    cap = Capture(model)
    with StatisticsHooks(model) as hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        assert cap.conv["3"].dtype == torch.bfloat16  # the activation itself is bf16
        for name in ("3", "6"):
            ref = reference_conv_stats(cap.conv[name], 4)  # exact float64 stats of the bf16 values
            for k in STATS:
                assert hooks.conv_stats[name][k].dtype == torch.float32
                torch.testing.assert_close(hooks.conv_stats[name][k].double(), ref[k], rtol=1e-5, atol=1e-5)
    cap.remove()


def test_torch_compile_hooks_fire_and_match_eager():
    """Hooks registered before compiling are traced into the graph; values and gradients match eager.

    Patch sizes that do not divide the map (7x7, p=4) are included: Inductor's avg_pool2d(ceil_mode)
    backward is wrong there (pytorch/pytorch#198119), which the hook avoids.
    """
    model = randomise_bn(small_net(groups=2))
    x = torch.randn(3, 3, 7, 7)
    with StatisticsHooks(model, patch_size=4) as hooks:
        xe = x.clone().requires_grad_()
        model(xe)
        eager = {n: dict(d) for n, d in hooks.conv_stats.items()}
        eager_bn = dict(hooks.bn_stats)
        weights = {(n, k): torch.randn(eager[n][k].shape, dtype=torch.float64) for n in eager for k in STATS}
        weights.update({(n, k): torch.randn(8, dtype=torch.float64) for n in eager_bn for k in ("m", "v")})
        (ge,) = torch.autograd.grad(weighted_loss(eager, eager_bn, weights), xe)
        hooks.clear()

        compiled = torch.compile(model)
        xc = x.clone().requires_grad_()
        compiled(xc)
        assert set(hooks.conv_stats) == set(eager) and set(hooks.bn_stats) == set(eager_bn)
        for n in eager:
            for k in STATS:
                torch.testing.assert_close(hooks.conv_stats[n][k], eager[n][k].detach(), rtol=1e-5, atol=1e-6)
        (gc,) = torch.autograd.grad(weighted_loss(hooks.conv_stats, hooks.bn_stats, weights), xc)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    hooks.clear()
    compiled(x)  # hooks removed: nothing is recorded any more
    assert hooks.conv_stats == {}
