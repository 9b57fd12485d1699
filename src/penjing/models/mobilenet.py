"""A MobileNetV2-style network (Sandler et al. 2018) for 28×28 digits: inverted residuals
with depthwise 3×3 convs and linear bottlenecks."""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, blocks n, first stride s), as in the paper's Table 2.
MOBILENET_SMALL = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1))


def conv_bn(in_channels: int, out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 linear project, with a residual when shapes match."""

    def __init__(self, in_channels: int, out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(in_channels, hidden))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        config: tuple = MOBILENET_SMALL,
        width: float = 1.0,
        last_channels: int = 128,
    ) -> None:
        super().__init__()
        channels = max(1, round(16 * width))
        layers: list[nn.Module] = [conv_bn(in_channels, channels, 3)]
        for t, c, n, s in config:
            out = max(1, round(c * width))
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(conv_bn(channels, last_channels))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
