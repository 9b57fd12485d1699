"""Small student models for distillation: far fewer weights than the LeNets they learn from."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A one-hidden-layer perceptron, 784-30-10 by default (23.8 k weights, LeNet-300-100 / 11)."""

    def __init__(self, hidden: int = 30, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ThinLeNet5(nn.Module):
    """LeNet-5 with a quarter of the channels: conv 5@5×5, pool, conv 12@5×5, pool, fc 60, fc 10.

    About 13.7 k weights against LeNet-5's 431 k. ReLUs after the convolutions, because a
    thin network cannot spare the capacity that Caffe's linear conv layers waste.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 5, kernel_size=5)
        self.conv2 = nn.Conv2d(5, 12, kernel_size=5)
        self.fc1 = nn.Linear(12 * 4 * 4, 60)
        self.fc2 = nn.Linear(60, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
