"""Backbone registry and small-image zoo."""

import copy

import pytest
import torch
from torch import nn

from gvbsm_hf.backbones import create_backbone, list_backbones, register_backbone
from gvbsm_hf.backbones import registry
from gvbsm_hf.errors import GVBSMError, OfflineError, UnknownBackboneError

ZOO = ["convnet", "convnet128", "convnet32", "convnet32_d2", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"]
CASES = [(name, size, chans) for name in ZOO for size in (28, 32) for chans in (1, 3)]
CASES += [(name, 16, 1) for name in ZOO]  # digits (8 px upsampled to 16)


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_backbones())
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
