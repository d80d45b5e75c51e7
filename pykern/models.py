"""Reference architectures built from plain torch.nn modules (no downloads, no torchvision):
the models pykern.convert and pykern.fuse are tested on (tests/test_convert.py), the examples
train (examples/) and the benchmark times. Each function returns an nn.Module in training mode
with torch's default initialization (ResNet's as torchvision's).

    resnet50            torchvision's ResNet-50 structure (Bottleneck blocks [3, 4, 6, 3])
    resnet_small        the same network shape, BasicBlocks and a few channels, for CPU tests
    segmentation_net    dilated (atrous) convolutions and an ASPP-style head (DeepLab-like)
    mobilenet_small     depthwise-separable inverted residual blocks (MobileNetV2-like)
    vit_small           a Vision Transformer encoder: patch conv, pre-norm LayerNorm + attention
    transformer_encoder nn.TransformerEncoder (batch_first), as a language model would use it
    dcgan_generator     DCGAN's generator: ConvTranspose2d + BatchNorm2d + ReLU, then Tanh
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "resnet50",
    "resnet_small",
    "segmentation_net",
    "mobilenet_small",
    "vit_small",
    "transformer_encoder",
    "dcgan_generator",
]


# ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34's block)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's ResNet v1.5), 1x1 expand, and a
    shortcut (ResNet-50's block)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet: stem (conv, BN, ReLU, max pool), four stages of blocks (the first
    block of each later stage strides by 2), global average pool, fully connected.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, e.g. [3, 4, 6, 3].
        widths: planes per stage, e.g. (64, 128, 256, 512).
        num_classes: outputs of the final Linear.
        in_channels: image channels.
        stem_kernel, stem_stride: the first convolution (7, 2 for ImageNet; 3, 1 for small
            images).
    """

    def __init__(
        self,
        block,
        layers,
        widths=(64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_kernel: int = 7,
        stem_stride: int = 2,
    ):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(
            in_channels, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True)):
            self.add_module(
                f"layer{i + 1}", self._make_layer(block, planes, blocks, 1 if i == 0 else 2)
            )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self.num_stages = len(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with torchvision's module names (its state_dict keys are torchvision's)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


def resnet_small(
    num_classes: int = 10, in_channels: int = 3, widths=(8, 16), layers=(1, 1)
) -> ResNet:
    """A ResNet of BasicBlocks with a 3x3 stride-1 stem, for small images (16 to 32 pixels)
    and CPU tests: conv, BatchNorm, ReLU, max pool, residual adds, adaptive average pool."""
    return ResNet(
        BasicBlock, list(layers), tuple(widths), num_classes, in_channels, stem_kernel=3,
        stem_stride=1,
    )  # fmt: skip


# Dilated-convolution segmentation network


def _conv_bn_relu(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act=nn.ReLU,
) -> nn.Sequential:
    """Conv2d (no bias, 'same'-sized padding) + BatchNorm2d + activation."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): parallel 3x3 convolutions at several
    dilations, a 1x1 convolution and an image-level (global average pool) branch, concatenated
    and projected by a 1x1 convolution."""

    def __init__(self, cin: int, cout: int, dilations=(2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1)]
            + [_conv_bn_relu(cin, cout, 3, dilation=d) for d in dilations]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True)
        )
        self.project = _conv_bn_relu(cout * (len(dilations) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SegmentationNet(nn.Module):
    """A DeepLab-like segmentation network: a backbone that downsamples by 4 (strided
    convolution, max pool) and then keeps its resolution with dilated convolutions, an ASPP
    head, a 1x1 classifier, and bilinear upsampling to the input size."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(
            _conv_bn_relu(in_channels, width, 3, stride=2),
            nn.MaxPool2d(3, 2, 1),
            _conv_bn_relu(width, 2 * width, 3, dilation=2),
            _conv_bn_relu(2 * width, 2 * width, 3, dilation=4),
        )
        self.head = ASPP(2 * width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.classifier(self.head(self.backbone(x)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def segmentation_net(
    num_classes: int = 5, in_channels: int = 3, width: int = 16
) -> SegmentationNet:
    """Dilated-convolution segmentation network: (N, in_channels, H, W) -> (N, classes, H, W)."""
    return SegmentationNet(num_classes, in_channels, width)


# MobileNet-style depthwise-separable network


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise convolution (groups = channels),
    1x1 linear projection; a residual add when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn_relu(cin, hidden, 1, act=nn.ReLU6),
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


def mobilenet_small(
    num_classes: int = 10, in_channels: int = 3, widths=(8, 16, 16, 24), expand: int = 4
) -> nn.Sequential:
    """A MobileNetV2-like classifier: stem conv, inverted residual blocks (stride 2 where the
    width changes), 1x1 head, global average pool, dropout-free Linear."""
    layers = [_conv_bn_relu(in_channels, widths[0], 3, stride=2, act=nn.ReLU6)]
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers.append(InvertedResidual(cin, cout, 1 if cin == cout else 2, expand))
    layers += [
        _conv_bn_relu(widths[-1], 4 * widths[-1], 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * widths[-1], num_classes),
    ]
    return nn.Sequential(*layers)


# Vision Transformer encoder


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: non-overlapping patches embedded by a strided convolution, a class
    token and learned position embeddings, pre-norm blocks, a final LayerNorm, and a Linear on
    the class token."""

    def __init__(
        self,
        image_size=32,
        patch_size=4,
        in_channels=3,
        dim=64,
        depth=2,
        heads=4,
        mlp_dim=128,
        num_classes=10,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: patch_size {patch_size} must divide image_size {image_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(
    image_size: int = 32,
    patch_size: int = 4,
    in_channels: int = 3,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
    num_classes: int = 10,
) -> ViT:
    """A small Vision Transformer encoder classifier (ViT-Ti-like at dim 192, depth 12)."""
    return ViT(image_size, patch_size, in_channels, dim, depth, heads, mlp_dim, num_classes)


# nn.TransformerEncoder


def transformer_encoder(
    d_model: int = 32,
    nhead: int = 4,
    num_layers: int = 2,
    dim_feedforward: int = 64,
    norm_first: bool = False,
    dropout: float = 0.0,
) -> nn.TransformerEncoder:
    """nn.TransformerEncoder of batch_first nn.TransformerEncoderLayers with a final LayerNorm:
    (N, S, d_model) -> (N, S, d_model)."""
    layer = nn.TransformerEncoderLayer(
        d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(
        layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
    )


# DCGAN generator


def dcgan_generator(nz: int = 16, ngf: int = 8, nc: int = 3, image_size: int = 32) -> nn.Sequential:
    """DCGAN's generator: (N, nz, 1, 1) noise -> (N, nc, image_size, image_size) in [-1, 1].
    A 4x4 ConvTranspose2d to 4x4 pixels, then stride-2 ConvTranspose2d layers that double the
    size and halve the channels, each followed by BatchNorm2d and ReLU; Tanh at the end.

    Args:
        nz: noise channels. ngf: channels of the last hidden layer. nc: image channels.
        image_size: a power of two, at least 8.
    """
    ups = image_size.bit_length() - 3  # stride-2 layers after the 4x4 start
    if image_size < 8 or image_size != 4 << ups:
        raise ValueError(
            f"dcgan_generator: image_size must be a power of two >= 8, got {image_size}"
        )
    channels = [ngf * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. [4 ngf, 2 ngf, ngf]
    layers = [
        nn.ConvTranspose2d(nz, channels[0], 4, 1, 0, bias=False),
        nn.BatchNorm2d(channels[0]),
        nn.ReLU(True),
    ]
    for cin, cout in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
        ]
    layers += [nn.ConvTranspose2d(channels[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)
