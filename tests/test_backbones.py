"""Backbone registry and small-image zoo."""

import ast
import copy
from pathlib import Path

import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from gvbsm_hf.backbones import create_backbone, list_backbones, register_backbone, registry
from gvbsm_hf.errors import GVBSMError, OfflineError, UnknownBackboneError
from gvbsm_hf.hooks import StatisticsHooks

ZOO = ["convnet", "convnet128", "convnet32", "convnet32_d2", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"]
CASES = [(name, size, chans) for name in ZOO for size in (28, 32) for chans in (1, 3)]
CASES += [(name, 16, 1) for name in ZOO]  # digits (8 px upsampled to 16)
# the cross-architecture evaluators (issue 35, benchmarks/cross_arch_fashion_mnist.py)
EVALUATORS = ["convnet128_in", "convnet128_nn", "resnet18_cifar", "mobilenetv2_100", "shufflenetv2_100", "vit_tiny_p4"]
EVAL_CASES = [(name, size, chans) for name in EVALUATORS for size, chans in ((28, 1), (32, 3), (16, 1))]


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_backbones())
    assert set(EVALUATORS) <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


@pytest.mark.parametrize("name,size,chans", CASES)
def test_zoo_forward_backward(name, size, chans):
    model = create_backbone(name, num_classes=7, in_chans=chans, image_size=size)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, chans, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    # gradients reach both ends of the network and the pixels (synthesis optimises the pixels)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert first_conv.weight.grad.abs().sum() > 0
    assert last_linear.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert first_conv.in_channels == chans


@pytest.mark.parametrize("size", [8, 12, 16, 28, 32, 64])
def test_convnet_stops_pooling_at_1x1(size):
    model = create_backbone("convnet", num_classes=3, in_chans=1, image_size=size, width=4, depth=5)
    pools = sum(isinstance(m, nn.AvgPool2d) for m in model.modules())
    expected_pools, s = 0, size
    for _ in range(5):
        if s > 1:
            expected_pools, s = expected_pools + 1, s // 2
    assert pools == expected_pools
    assert model.classifier.in_features == 4 * s * s
    assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


@pytest.mark.parametrize("norm,layer", [("batchnorm", nn.BatchNorm2d), ("instancenorm", nn.GroupNorm),
                                        ("groupnorm", nn.GroupNorm), ("none", None)])
def test_convnet_norms(norm, layer):
    model = create_backbone("convnet", num_classes=5, in_chans=3, image_size=16, width=8, norm=norm)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    if layer is None:
        assert norms == []
    else:
        assert len(norms) == 3 and all(type(m) is layer for m in norms)
    if norm == "instancenorm":  # one group per channel = instance norm with affine parameters
        assert all(m.num_groups == m.num_channels for m in norms)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        conv, gn = copy.deepcopy(model.features[0]).double(), copy.deepcopy(model.features[1]).double()
        with torch.no_grad():
            gn.weight.normal_()
            gn.bias.normal_()
        h = conv(x)
        y = gn(h)
        ref = (h - h.mean(dim=(2, 3), keepdim=True)) / torch.sqrt(h.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
        ref = ref * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y, ref)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_convnet128_is_the_paper_evaluator():
    model = create_backbone("convnet128", num_classes=10, in_chans=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert model.classifier.in_features == 128 * 4 * 4
    assert "instancenorm" in registry._REGISTRY["convnet128"][0].__doc__


def test_convnet_bad_arguments_name_the_fix():
    with pytest.raises(GVBSMError, match="batchnorm"):
        create_backbone("convnet", num_classes=10, norm="layernorm")
    model = create_backbone("convnet", num_classes=10, in_chans=1, image_size=28, width=4)
    with pytest.raises(GVBSMError, match="image_size"):
        model(torch.randn(2, 1, 32, 32))


def test_zoo_has_no_pretrained_weights():
    with pytest.raises(GVBSMError, match="pretrained=False"):
        create_backbone("convnet128", num_classes=10, pretrained=True)


def test_torchvision_backbone_one_channel():
    model = create_backbone("tv:shufflenet_v2_x0_5", num_classes=7, in_chans=1, image_size=32)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)


def test_timm_backbone_one_channel():
    for name in ("timm:resnet18", "resnet18"):  # prefixed and bare timm names
        model = create_backbone(name, num_classes=7, in_chans=1, image_size=32)
        assert model.conv1.in_channels == 1
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_adapted_first_conv_keeps_grey_activations():
    """Pretrained-filter adaptation: a grey image on 1 channel gives the same output as repeated on 3."""
    import torchvision

    model = torchvision.models.get_model("resnet18", weights=None).double().eval()
    x1 = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    ref = model(x1.expand(-1, 3, -1, -1))
    registry._adapt_first_conv(model, in_chans=1, pretrained=True)
    model.double().eval()
    assert model.conv1.in_channels == 1
    torch.testing.assert_close(model(x1), ref)
    # 2 channels: the filters are the channel mean scaled by 3/2, so a grey image still matches
    model2 = torchvision.models.get_model("resnet18", weights=None).double().eval()
    ref2 = model2(x1.expand(-1, 3, -1, -1))
    registry._adapt_first_conv(model2, in_chans=2, pretrained=True)
    model2.double().eval()
    torch.testing.assert_close(model2(x1.expand(-1, 2, -1, -1)), ref2)


def test_replace_classifier():
    import torchvision

    model = torchvision.models.get_model("mobilenet_v2", weights=None)
    registry._replace_classifier(model, 13)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 13)


@pytest.mark.parametrize(
    "bad,suggestion",
    [("convnet12", "convnet128"), ("resnet18cifar", "resnet18_cifar"), ("tv:resnet181", "tv:resnet18"),
     ("timm:resnt18", "timm:resnet18")],
)
def test_unknown_backbone_suggests(bad, suggestion):
    with pytest.raises(UnknownBackboneError) as info:
        create_backbone(bad, num_classes=10)
    msg = str(info.value)
    assert bad in msg and suggestion in msg
    assert "list_backbones()" in msg and "timm.list_models" in msg and "'tv:<name>'" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["tv:resnet18", "timm:resnet18"])
def test_pretrained_offline_raises(name, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty caches: nothing is downloaded yet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OfflineError) as info:
        create_backbone(name, num_classes=10, in_chans=1, pretrained=True)
    msg = str(info.value)
    assert "pretrained=False" in msg and "cache" in msg and "teacher folder" in msg


def test_pretrained_uses_cache_when_offline(monkeypatch, tmp_path):
    """Weights already in the torch hub cache are used offline (no OfflineError)."""
    import torchvision

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("shufflenet_v2_x0_5").DEFAULT
    ref = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None)
    path = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    model = create_backbone("tv:shufflenet_v2_x0_5", num_classes=4, in_chans=1, pretrained=True)
    assert model.fc.out_features == 4
    torch.testing.assert_close(model.conv5[0].weight, ref.conv5[0].weight)  # copied, not re-initialised
    torch.testing.assert_close(model.conv1[0].weight[:, 0], ref.conv1[0].weight.sum(dim=1))


def test_register_backbone(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_backbone("tiny_linear", hidden=3)
    def tiny(num_classes, in_chans, image_size, hidden):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * image_size**2, hidden), nn.Linear(hidden, num_classes))

    assert "tiny_linear" in list_backbones()
    model = create_backbone("tiny_linear", num_classes=2, in_chans=1, image_size=4)
    assert model[1].out_features == 3
    assert create_backbone("tiny_linear", num_classes=2, in_chans=1, image_size=4, hidden=5)[1].out_features == 5
    with pytest.raises(GVBSMError, match="already registered"):
        register_backbone("tiny_linear")(lambda **kw: None)
    with pytest.raises(GVBSMError, match="':'"):
        register_backbone("tv:mine")


# ------------------------------------------------------------------ cross-architecture evaluators


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,size,chans", EVAL_CASES)
def test_evaluator_forward_backward(name, size, chans):
    model = create_backbone(name, num_classes=10, in_chans=chans, image_size=size)
    x = torch.randn(3, chans, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == chans
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 10  # the head is last
    assert x.grad.abs().sum() > 0


def _convnet_params(in_chans: int, size: int, classes: int, norm_params: int) -> int:
    width, convs = 128, 0
    for c in (in_chans, 128, 128):
        convs += c * width * 9 + width
        size //= 2
    return convs + 3 * norm_params + width * size * size * classes + classes


def _vit_params(in_chans: int, size: int, classes: int, dim: int = 192, depth: int = 6, patch: int = 4) -> int:
    tokens = (size // patch) ** 2 + 1
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    return in_chans * patch * patch * dim + dim + dim + tokens * dim + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("size,chans", [(28, 1), (32, 3)])
def test_evaluator_parameter_counts(size, chans):
    """Counts from the architectures' definitions: the ConvNets and the ViT by formula; ResNet-18 is
    torchvision's with a 3x3 stem; MobileNetV2 and ShuffleNetV2 1.0x have torchvision's counts at 3
    channels (only the stem strides differ) and one stem filter slice less per missing channel."""
    counts = {n: _num_params(create_backbone(n, num_classes=10, in_chans=chans, image_size=size)) for n in EVALUATORS}
    assert counts["convnet128_in"] == _convnet_params(chans, size, 10, norm_params=2 * 128)
    assert counts["convnet128_nn"] == _convnet_params(chans, size, 10, norm_params=0)
    assert counts["vit_tiny_p4"] == _vit_params(chans, size, 10)
    tv = {n: _num_params(torchvision.models.get_model(n, weights=None, num_classes=10))
          for n in ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0")}
    assert counts["resnet18_cifar"] == tv["resnet18"] - 64 * 3 * 7 * 7 + 64 * chans * 3 * 3
    assert counts["mobilenetv2_100"] == tv["mobilenet_v2"] - 32 * (3 - chans) * 3 * 3
    assert counts["shufflenetv2_100"] == tv["shufflenet_v2_x1_0"] - 24 * (3 - chans) * 3 * 3
    assert 2.6e6 < counts["vit_tiny_p4"] < 2.8e6 and 3.0e5 < counts["convnet128_in"] < 3.3e5


def test_convnet128_in_is_the_dd_literature_convnet():
    model = create_backbone("convnet128_in", num_classes=10, in_chans=1, image_size=28)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128, 128, 128] and all(c.bias is not None for c in convs)
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
    assert model.classifier.in_features == 128 * 3 * 3  # 28 -> 14 -> 7 -> 3
    nn_model = create_backbone("convnet128_nn", num_classes=10, in_chans=1, image_size=28)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in nn_model.modules())


def test_vit_tiny_p4_is_timm_and_checks_the_patch_grid():
    model = create_backbone("vit_tiny_p4", num_classes=10, in_chans=1, image_size=28)
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.num_patches == 49 and model.embed_dim == 192 and len(model.blocks) == 6
    assert model.blocks[0].attn.num_heads == 3
    with pytest.raises(GVBSMError, match="divisible by patch_size=4"):
        create_backbone("vit_tiny_p4", num_classes=10, in_chans=1, image_size=30)


@pytest.mark.parametrize("name", EVALUATORS)
def test_evaluator_init_is_deterministic(name):
    def build(seed: int) -> dict:
        torch.manual_seed(seed)
        return create_backbone(name, num_classes=10, in_chans=1, image_size=28).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


@pytest.mark.parametrize("name", EVALUATORS)
def test_statistics_hooks_run_on_evaluators(name):
    """The package's BN / Conv statistics hooks attach to every evaluator without error: BN layers
    where there are any, every Conv2d otherwise (ConvNet-IN/NN: 3 convs; the ViT: its patch embedding)."""
    model = create_backbone(name, num_classes=10, in_chans=1, image_size=28)
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    with StatisticsHooks(model, patch_size=4) as hooks:
        model(x)
        assert len(hooks) > 0 and set(hooks.conv_stats) == set(hooks.conv_layers)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert bool(hooks.bn_layers) == has_bn and set(hooks.bn_stats) == set(hooks.bn_layers)
        if name == "vit_tiny_p4":
            assert hooks.conv_layers == ["patch_embed.proj"] and not hooks.bn_layers
        if name.startswith("convnet128_"):
            assert len(hooks.conv_layers) == 3
        loss = sum(s["channel_var"].sum() + s["patch_mean"].sum() for s in hooks.conv_stats.values())
        loss = loss + sum(m.sum() + v.sum() for m, v in hooks.bn_stats.values())
        assert torch.isfinite(loss)
        loss.backward()
    assert not hooks.active and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_backbones_import_at_module_top():
    """No import statement inside a function of gvbsm_hf.backbones (torchvision and timm are hard
    dependencies); an optional heavy dependency would need a commented exception here."""
    folder = Path(registry.__file__).parent
    inner = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{path.name}:{node.lineno}" for node in ast.walk(fn)
                          if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not inner, inner


def test_public_registry_api():
    from gvbsm_hf import backbones

    for name in ("create_backbone", "list_backbones", "register_backbone", "is_backbone_name",
                 "unknown_backbone_message", "has_pretrained_weights"):
        assert callable(getattr(backbones, name)) and callable(getattr(registry, name))
    assert backbones.is_backbone_name("vit_tiny_p4") and backbones.is_backbone_name("tv:resnet18")
    assert backbones.is_backbone_name("timm:resnet18") and not backbones.is_backbone_name("tv:nope")
    assert not backbones.has_pretrained_weights("convnet128_in") and backbones.has_pretrained_weights("tv:resnet18")
    assert "convnet128_in" in backbones.unknown_backbone_message("convnet128_im")
