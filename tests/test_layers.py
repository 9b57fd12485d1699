"""One way to choose layers: penjing.layers filters, accepted by every layer-taking API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_filters_combine_and_pick_the_layers_named():
    model = pj.models.create("lenet5")
    convs = pj.layers.types(nn.Conv2d)
    assert pj.layers.matching(model, convs) == ["conv1", "conv2"]
    assert pj.layers.matching(model, convs | pj.layers.names("fc2")) == ["conv1", "conv2", "fc2"]
    assert pj.layers.matching(model, pj.layers.regex("fc.*") & ~pj.layers.names("fc1")) == [
        "fc2"]
    with pytest.raises(ValueError, match="not a regular expression"):
        pj.layers.regex("fc[")


def test_pruning_and_sharing_take_a_filter():
    model = pj.models.create("lenet5")
    done = pj.prune.magnitude_(model, sparsity=0.5, layers=pj.layers.types(nn.Linear))
    assert set(pj.prune.masks(model)) == {"fc1", "fc2"} and done
    assert float((model.conv1.weight == 0).float().mean()) == 0.0
    infos = pj.quant.kmeans_(model, bits=2, layers=pj.layers.names("conv2"))
    assert list(infos) == ["conv2"]
    with pytest.raises(ValueError, match="accepts none of the prunable layers"):
        pj.prune.magnitude_(model, sparsity=0.5, layers=pj.layers.types(nn.BatchNorm2d))


def test_structured_pruning_ignores_the_filtered_layers():
    model = pj.models.create("vgg")
    first = pj.layers.matching(model, pj.layers.types(nn.Conv2d))[0]
    small = pj.prune.channels(model, X[:1], ratio=0.5,
                              ignored_layers=pj.layers.names(first))
    assert small.get_submodule(first).out_channels == model.get_submodule(first).out_channels
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_quantization_takes_a_filter_and_the_file_replays_it(tmp_path):
    model = pj.models.create("lenet5").eval()
    config = pj.quant.int8(filter_fn=~pj.layers.names("fc2"))
    q = pj.quant.ptq(model, [X], config)
    quantized = {n for n, _ in q.named_modules() if n.endswith("parametrizations")}
    assert "fc2.parametrizations" not in quantized and "fc1.parametrizations" in quantized
    pj.save(q, tmp_path / "q.safetensors")
    loaded = pj.load(tmp_path / "q.safetensors", pj.models.create("lenet5"))
    with torch.no_grad():
        assert torch.equal(q(X), loaded(X))
