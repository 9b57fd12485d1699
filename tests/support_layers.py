"""Layers the tests build models from that penjing did not write (imported by test files
through the path tests/conftest.py adds)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SameConv2d(nn.Conv2d):
    """TensorFlow-style "same" padding computed in forward, as packaged EfficientNet and
    MobileNet ports write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
