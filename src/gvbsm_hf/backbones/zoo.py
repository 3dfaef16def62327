"""Small-image backbones (8-64 px, 1 or 3 channels) used as G-VBSM teachers and evaluators on
small datasets (docs/method.md "Synthesis backbones": ConvNet-128, WRN-16-2, ResNet-18, ShuffleNetV2-0.5,
MobileNetV2-0.5). The teachers use BatchNorm, so that their running statistics can be matched
(Eq. 1, 6). Written with ``torch.nn`` only, except the ViT (timm's ``VisionTransformer``).

Cross-architecture evaluators (issue 35, ``benchmarks/cross_arch_fashion_mnist.py``): ``convnet128_in``
(the dataset-distillation literature's ConvNet: instance norm), ``convnet128_nn`` (no normalisation),
``resnet18_cifar``, ``mobilenetv2_100``, ``shufflenetv2_100`` (full width, CIFAR stems) and
``vit_tiny_p4`` (a 6-block ViT, patch 4). Each takes ``num_classes``, ``in_chans`` and ``image_size``
and works at 16, 28 and 32 px; only the BatchNorm ones can be G-VBSM teachers with BN matching.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import GVBSMError
from .registry import register_backbone

CONVNET_NORMS = ("batchnorm", "instancenorm", "groupnorm", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "instancenorm":  # dataset-distillation convention: affine instance norm as GroupNorm(C, C)
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(math.gcd(4, channels), channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise GVBSMError(f"Unknown ConvNet norm {norm!r}; use one of {CONVNET_NORMS}.")


# ------------------------------------------------------------------------------------------ ConvNet


class ConvNet(nn.Module):
    """ConvNet of the dataset-distillation literature: ``depth`` x [conv3x3 - norm - ReLU - avgpool2]
    and a linear head. Pooling stops once the map is 1x1, so 8-16 px inputs work."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        width: int = 128,
        depth: int = 3,
        norm: str = "batchnorm",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise GVBSMError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}.")
        self.image_size = image_size
        layers: list[nn.Module] = []
        size, channels = image_size, in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm_layer(norm, width), nn.ReLU(inplace=True)]
            if size > 1:
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = width * size * size
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise GVBSMError(
                f"ConvNet was built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}; "
                "create it with image_size equal to the input size."
            )
        return self.classifier(self.features(x).flatten(1))


@register_backbone("convnet", width=128, depth=3, norm="batchnorm")
def convnet(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet (``width``, ``depth``, ``norm`` in batchnorm | instancenorm | groupnorm | none)."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_backbone("convnet128", width=128, depth=3, norm="batchnorm")
def convnet128(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet-128 (width 128, depth 3, BatchNorm): the paper's small-dataset evaluator/teacher.

    DC/DM-style literature uses instance norm in this network; pass ``norm="instancenorm"`` for it.
    BatchNorm is the default here because G-VBSM matches BatchNorm statistics (Eq. 1, 6).
    """
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_backbone("convnet128_in", width=128, depth=3, norm="instancenorm")
def convnet128_in(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet-128 with affine instance norm (``GroupNorm(128, 128)``): the evaluator of the dataset-
    distillation literature (DC/DM/MTT's ``ConvNet``: 3 x [conv3x3 128 - instancenorm - ReLU - avgpool2])."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_backbone("convnet128_nn", width=128, depth=3, norm="none")
def convnet128_nn(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet-128 without normalisation (DC/DM's ``ConvNet`` with ``net_norm='none'``)."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_backbone("convnet32", width=32, depth=3, norm="batchnorm")
def convnet32(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet of width 32, depth 3: a cheap CPU teacher (about 1/16 of ConvNet-128's FLOPs)."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_backbone("convnet32_d2", width=32, depth=2, norm="batchnorm")
def convnet32_d2(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet of width 32, depth 2: a second, shallower CPU teacher (backbone diversity, GBM)."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


# ------------------------------------------------------------------------------------- ResNet-18


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool (CIFAR variant)."""

    def __init__(self, num_classes: int, in_chans: int = 3, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = []
            for j in range(n):
                layers.append(_BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@register_backbone("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ResNetCIFAR:
    """ResNet-18, CIFAR stem (3x3 conv stride 1, no max-pool)."""
    return ResNetCIFAR(num_classes, in_chans, **kwargs)


# --------------------------------------------------------------------------------------- WRN-16-2


class _WideBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv3x3, BN-ReLU-conv3x3)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(o)))))
        return out + residual


class WideResNet(nn.Module):
    """Wide ResNet ``depth``-``widen`` (Zagoruyko & Komodakis), pre-activation, CIFAR layout."""

    def __init__(self, num_classes: int, in_chans: int = 3, depth: int = 16, widen: int = 2, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise GVBSMError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28...), got {depth}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        groups, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(_WideBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@register_backbone("wrn_16_2")
def wrn_16_2(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> WideResNet:
    """WRN-16-2 (depth 16, widen factor 2)."""
    return WideResNet(num_classes, in_chans, **{"depth": 16, "widen": 2, **kwargs})


# ---------------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, 1))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), _conv_bn_act(hidden, cout, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier; ``stem_stride=1`` gives the CIFAR variant."""

    # expansion t, channels c, repeats n, stride s (Sandler et al., Table 2)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(
        self, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, stem_stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_act(in_chans, cin, 3, stem_stride)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_act(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = last
        self.classifier = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_backbone("mobilenetv2_050", width_mult=0.5, stem_stride=1)
def mobilenetv2_050(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 0.5, CIFAR strides (first conv stride 1)."""
    return MobileNetV2(num_classes, in_chans, **kwargs)


@register_backbone("mobilenetv2_100", width_mult=1.0, stem_stride=1)
def mobilenetv2_100(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> MobileNetV2:
    """MobileNetV2, full width, CIFAR strides (first conv stride 1): a cross-architecture evaluator."""
    return MobileNetV2(num_classes, in_chans, **kwargs)


# --------------------------------------------------------------------------------- ShuffleNetV2


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two downsampling branches (stride 2), then shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Identity()
        b2_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(b2_in, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (Ma et al.) with a CIFAR stem: 3x3 stride-1 first conv, no max-pool."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        stage_repeats: tuple[int, ...] = (4, 8, 4),
        stage_channels: tuple[int, ...] = (24, 48, 96, 192, 1024),
    ) -> None:
        super().__init__()
        if len(stage_channels) != len(stage_repeats) + 2:
            raise GVBSMError("ShuffleNetV2 needs len(stage_channels) == len(stage_repeats) + 2.")
        cin = stage_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        )
        stages = []
        for repeats, cout in zip(stage_repeats, stage_channels[1:-1]):
            blocks = [_ShuffleBlock(cin, cout, 2)] + [_ShuffleBlock(cout, cout, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        last = stage_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.num_features = last
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


@register_backbone("shufflenetv2_050")
def shufflenetv2_050(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 0.5x (channels 24-48-96-192-1024), CIFAR stem."""
    return ShuffleNetV2(num_classes, in_chans, **kwargs)


@register_backbone("shufflenetv2_100", stage_channels=(24, 116, 232, 464, 1024))
def shufflenetv2_100(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x (channels 24-116-232-464-1024), CIFAR stem: a cross-architecture evaluator."""
    return ShuffleNetV2(num_classes, in_chans, **kwargs)


# ------------------------------------------------------------------------------------------- ViT


@register_backbone("vit_tiny_p4", patch_size=4, embed_dim=192, depth=6, num_heads=3)
def vit_tiny_p4(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> VisionTransformer:
    """A small ViT for 16-32 px images (timm ``VisionTransformer``: patch 4, width 192, 6 blocks, 3 heads,
    class token, learned position embeddings; 49 tokens + 1 at 28 px). No BatchNorm: an evaluator, not a
    BN-matching teacher. ``image_size`` must be a multiple of ``patch_size``."""
    patch = int(kwargs["patch_size"])
    if image_size % patch:
        raise GVBSMError(f"vit_tiny_p4 needs image_size divisible by patch_size={patch}, got {image_size}; "
                         f"resize the images (image_size: {max(patch, image_size // patch * patch)}) or pass patch_size.")
    return VisionTransformer(img_size=image_size, in_chans=in_chans, num_classes=num_classes, **kwargs)
