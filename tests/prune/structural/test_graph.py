"""The dependency graph: coupling found by tracing, clear errors where it cannot follow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.prune import dependency_graph


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Gate()

    def forward(self, x):
        return self.inner(x)


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on a tensor value


class FFT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.fft.fft2(self.conv(x)).real


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 4)

    def forward(self, x):
        return self.rnn(x)[0]


def test_untraceable_model_names_the_module():
    with pytest.raises(UnsupportedLayerError, match=r"cannot trace module 'inner' \(Gate\)"):
        dependency_graph(Branchy(), torch.randn(1, 3))


def test_unknown_op_names_the_node():
    with pytest.raises(UnsupportedLayerError, match=r"op 'fft_fft2' at node 'fft_fft2'"):
        dependency_graph(FFT(), torch.randn(1, 1, 8, 8))


def test_unknown_layer_names_the_module():
    with pytest.raises(UnsupportedLayerError, match=r"module 'rnn' \(GRU\) is a layer"):
        dependency_graph(Recurrent(), torch.randn(2, 1, 4))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 1)
        self.b = nn.Conv2d(1, 5, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_maps_each_producer_to_its_slice_of_the_consumer():
    groups = pj.prune.groups(Concat(), torch.randn(1, 1, 4, 4))
    by_producer = {g.producers[0]: g for g in groups}
    a_in = next(s for s in by_producer["a"].slices if s.fqn == "c")
    b_in = next(s for s in by_producer["b"].slices if s.fqn == "c")
    assert sorted(int(i) for idx in a_in.indices for i in idx) == [0, 1, 2]
    assert sorted(int(i) for idx in b_in.indices for i in idx) == [3, 4, 5, 6, 7]
    assert "c" not in by_producer  # the model output keeps its channels


class SliceByPosition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :4])


def test_positional_channel_slice_pins_its_channels():
    assert pj.prune.groups(SliceByPosition(), torch.randn(1, 1, 4, 4)) == []


def test_flatten_then_linear_owns_whole_spatial_blocks():
    model = pj.models.create("vgg", width=0.25)
    groups = pj.prune.groups(model, torch.randn(1, 1, 28, 28))
    last = next(g for g in groups if "features.17" in g.producers)
    fc = next(s for s in last.slices if s.fqn == "classifier.0")
    assert fc.dim == 1 and all(len(idx) == 9 for idx in fc.indices)  # 3×3 features each
    assert list(fc.indices[1]) == list(range(9, 18))


def test_shared_module_called_twice_is_one_group():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.stem = nn.Conv2d(1, 4, 1)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.head(self.conv(self.conv(self.stem(x))))

    model = Twice()
    small = pj.prune.channels(model, torch.randn(1, 1, 4, 4), ratio=0.5)
    # the conv's input and output are coupled through the second call
    assert small.conv.in_channels == small.conv.out_channels == 2
    assert small.stem.out_channels == 2
    assert small(torch.randn(1, 1, 4, 4)).shape == (1, 1, 4, 4)


def test_bn_statistics_do_not_move_while_tracing():
    model = pj.models.create("resnet20", width=0.25).train()
    before = model.bn1.running_mean.clone()
    dependency_graph(model, torch.randn(4, 1, 28, 28))
    assert torch.equal(model.bn1.running_mean, before) and model.training


class Written(nn.Module):
    """A conv whose 8 channels reach the next layers through `how`, a number in the code."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(1, 8, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(8 * 16, 2)
        self.unflatten = nn.Unflatten(1, (8, 1, 1))

    def forward(self, x):
        y = self.a(x)
        if self.how == "view":  # the classic x.view(-1, 16 * 5 * 5) before a Linear
            return self.fc(y.view(-1, 8 * 16))
        if self.how == "reshape":
            return self.fc(torch.reshape(y, (-1, 8 * 16)))
        if self.how == "unflatten":
            return self.d(y.mean((2, 3)).unflatten(1, (8, 1, 1)))
        if self.how == "unflatten_layer":
            return self.d(self.unflatten(y.mean((2, 3))))
        if self.how == "permutation":
            return self.d(y[:, [1, 0, 3, 2, 5, 4, 7, 6]])
        if self.how == "slice_of_a_copy":  # every channel, in another order
            return self.d(torch.cat([y, y], 1)[:, 4:12])
        sizes = {"split": 4, "split_list": [4, 4], "split_by_shape": y.shape[1] // 2}[self.how]
        p, q = torch.split(y, sizes, dim=1)
        return self.b(p) + self.c(q)


@pytest.mark.parametrize("how", ["view", "reshape", "unflatten", "unflatten_layer",
                                 "permutation", "slice_of_a_copy", "split", "split_list"])
def test_channels_that_a_number_in_the_code_addresses_stay(how):
    """Once channels go, view(-1, 128), y[:, [6, 4, 2, 0]] or split(4) no longer fit."""
    model = Written(how).eval()
    x = torch.randn(2, 1, 4, 4)
    small = pj.prune.channels(model, x, ratio=0.5)
    assert small.a.out_channels == 8
    assert torch.equal(small(x), model(x))


def test_a_split_size_computed_from_the_shape_follows_the_pruned_channels():
    model = Written("split_by_shape").eval()
    x = torch.randn(2, 1, 4, 4)
    small = pj.prune.channels(model, x, ratio=0.5)
    assert small.a.out_channels == 4 and small.b.in_channels == small.c.in_channels == 2
    assert small(x).shape == (2, 2, 4, 4)


def test_std_with_unbiased_given_by_position_keeps_the_labels_rank():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):  # torch.std(x, 1, True): the True is `unbiased`, not keepdim
            return self.b(self.a(x)) * torch.std(x, 1, True).unsqueeze(-1)

    x = torch.randn(3, 4)
    small = pj.prune.channels(Scaled(), x, ratio=0.5)
    assert small.a.out_features == 4 and small(x).shape == (3, 2)
