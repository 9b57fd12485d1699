"""A small VGG with BatchNorm for 28×28 inputs: the plain conv stack that channel pruning
speeds up most."""

from __future__ import annotations

import torch
from torch import nn

# Channels per 3×3 conv, "M" = 2×2 max-pool: 28 → 14 → 7 → 3.
VGG_SMALL = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class SmallVGG(nn.Module):
    """conv-BN-ReLU blocks, then flatten into a two-layer classifier (so pruning the last
    conv must also shrink the first Linear's input features)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        config: tuple = VGG_SMALL,
        width: float = 1.0,
        hidden: int = 256,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            out = max(1, round(item * width))
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
