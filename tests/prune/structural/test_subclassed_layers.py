"""Conv2d and Linear subclasses that carry tensors of their own (timm's ScaledStdConv2d
`gain`, per-filter scales, a second weight): channel pruning slices each per-channel tensor
with its channels, keeps a layer whole when a tensor's shape says nothing about them, and
never returns a model that fails its first forward pass. Each layer is built here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import penjing as pj
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural.surgery import changes_from_rows


class ScaledStdConv2d(nn.Conv2d):
    """NFNet's conv (as in timm): weights standardized per filter, scaled by a learned gain."""

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1) -> None:
        super().__init__(cin, cout, k, padding=padding)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin * k * k) ** -0.5
        self.eps = 1e-6

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FilterScaledConv(nn.Conv2d):
    """A per-filter scale kept as a flat buffer (out,), and an unrelated scalar."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.register_buffer("filter_scale", torch.rand(cout) + 0.5)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.filter_scale.view(1, -1, 1, 1) / self.temperature


class ScaledLinear(nn.Linear):
    """A Linear with a per-output-feature gain (out, 1)."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__(fin, fout)
        self.gain = nn.Parameter(torch.rand(fout, 1) + 0.5)

    def forward(self, x):
        return F.linear(x, self.weight * self.gain, self.bias)


class MixingConv(nn.Conv2d):
    """A second weight-shaped tensor: (out, in) mixing that no per-channel rule describes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.register_buffer("mix", torch.eye(cout, cin))

    def forward(self, x):
        return super().forward(x) + F.conv2d(x, self.mix[:, :, None, None])


class HiddenSizeConv(nn.Conv2d):
    """Reads its width from a Python list sized at init, where no rule can see it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.sizes = [cout]

    def forward(self, x):
        return super().forward(x).reshape(x.shape[0], self.sizes[0], -1).mean(-1)[..., None, None]


def _net(first: type[nn.Module], second: type[nn.Module] = nn.Conv2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(first(3, 16), nn.ReLU(), second(16, 16, 3, padding=1)
                         if second is nn.Conv2d else second(16, 16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), ScaledLinear(16, 8), nn.ReLU(),
                         nn.Linear(8, 4))


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("layer", [ScaledStdConv2d, FilterScaledConv])
def test_per_filter_tensors_are_cut_with_their_filters(layer):
    model = _net(layer).eval()
    small = pj.prune.channels(model, X, ratio=0.5)
    first, linear = small[0], small[6]
    assert first.weight.shape[0] == 8 and first.out_channels == 8
    per_filter = first.gain if layer is ScaledStdConv2d else first.filter_scale
    assert per_filter.shape[0] == 8 and linear.gain.shape == (4, 1)
    # the kept filters keep their own gains: the pruned layer computes what those filters
    # computed before (read through the same standardization and scale)
    kept = [i for i in range(16) if any(torch.equal(model[0].weight[i], w) for w in first.weight)]
    assert len(kept) == 8
    full = model[0](X)[:, kept]
    assert torch.allclose(small[0](X), full, atol=1e-5)
    assert small(X).shape == (2, 4)
    # the record replays on a fresh model: the gains are sliced there too
    (step,) = pj.core.history.steps(small)
    rebuilt = _net(layer)
    pj.prune.apply_(rebuilt, changes_from_rows(step["changes"]))
    assert rebuilt[0].weight.shape[0] == 8 and rebuilt(X).shape == (2, 4)


def test_a_model_file_of_a_pruned_subclass_loads(tmp_path):
    small = pj.prune.channels(_net(ScaledStdConv2d).eval(), X, ratio=0.5)
    pj.save(small, tmp_path / "m.safetensors")
    loaded = pj.load(tmp_path / "m.safetensors", lambda: _net(ScaledStdConv2d))
    assert loaded[0].gain.shape == (8, 1, 1, 1)
    assert torch.equal(loaded.eval()(X), small(X))


def test_a_tensor_of_unknown_shape_keeps_its_layer_whole_and_says_so():
    model = _net(MixingConv).eval()
    with pytest.warns(PenjingWarning, match=r"0\.mix of MixingConv, shaped \(16, 3\), is not one "
                      r"value per output channel: the channels of '0' stay whole"):
        small = pj.prune.channels(model, X, ratio=0.5)
    assert small[0].weight.shape == (16, 3, 3, 3)
    assert small[2].weight.shape[0] == 8  # the layers after it are still pruned
    assert torch.allclose(small[0](X), model[0](X))


def test_a_model_that_would_not_run_is_refused_and_left_as_it_was():
    model = _net(HiddenSizeConv).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"fails its first forward pass \(Runtime"
                       r"Error: .*\), so it is left as it was.*register_op"):
        pj.prune.channels_(model, X, ratio=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].out_channels == 16 and model[2].in_channels == 16
    assert pj.core.history.steps(model) == []
    assert model(X).shape == (2, 4)
