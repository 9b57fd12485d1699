"""Parameter and MAC counts: exact numbers for layers whose cost is known by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.core.counting import count_macs, count_params, latency


def test_conv_and_linear_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 5))
    x = torch.randn(1, 3, 6, 6)
    assert count_macs(model, x) == 36 * 8 * 27 + 8 * 36 * 5
    assert count_macs(model, torch.randn(4, 3, 6, 6)) == 4 * count_macs(model, x)
    assert count_params(model) == 8 * 27 + 8 + 8 * 36 * 5 + 5


def test_grouped_and_depthwise_convs_count_what_they_compute():
    x = torch.randn(1, 8, 5, 5)
    assert count_macs(nn.Conv2d(8, 8, 3, groups=8), x) == 9 * 8 * 9
    assert count_macs(nn.Conv2d(8, 4, 3, groups=2), x) == 9 * 4 * 4 * 9


def test_transposed_and_unbatched_convs_count_what_they_compute():
    # a transposed conv multiplies every input pixel by its whole (in, out, kh, kw) weight
    up = nn.ConvTranspose2d(2, 3, 2, stride=2)
    assert count_macs(up, torch.randn(1, 2, 4, 4)) == 16 * 2 * 3 * 4
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(3, 6, 6)) == count_macs(conv, torch.randn(1, 3, 6, 6))


def test_linear_on_a_sequence_counts_every_token():
    assert count_macs(nn.Linear(4, 6), torch.randn(2, 7, 4)) == 2 * 7 * 4 * 6


def test_nonzero_counts_follow_the_masks():
    model = pj.models.create("lenet300")
    dense_macs = count_macs(model, torch.randn(1, 1, 28, 28))
    pj.prune.nm_(model, 2, 4, layers=["fc1", "fc2"])
    x = torch.randn(1, 1, 28, 28)
    assert count_macs(model, x) == dense_macs
    assert count_macs(model, x, nonzero=True) == dense_macs - (784 * 300 + 300 * 100) // 2
    biases = 300 + 100 + 10
    nonzero_weights = (784 * 300 + 300 * 100) // 2 + 100 * 10
    assert count_params(model, nonzero=True) == nonzero_weights + biases


def test_shared_parameters_count_once():
    layer = nn.Linear(3, 3)
    assert count_params(nn.Sequential(layer, layer)) == 12


def test_latency_is_a_positive_median_and_repeats_are_checked():
    model = nn.Linear(4, 4)
    assert latency(model, torch.randn(1, 4), warmup=0, repeats=3) > 0
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        latency(model, torch.randn(1, 4), repeats=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_counts_projections_and_both_products(batch_first):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=6, vdim=6)
    q = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    k = torch.randn(3, 7, 6) if batch_first else torch.randn(7, 3, 6)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, q, k):
            return self.attn(q, k, k)[0]

    expected = 15 * 8 * 8 + 21 * (6 + 6) * 8 + 2 * 15 * 7 * 8 + 15 * 8 * 8
    assert count_macs(Wrap(), (q, k)) == expected
    ours = Wrap()
    ours.attn = pj.prune.HeadAttention.from_mha(mha)
    assert count_macs(ours, (q, k)) == expected  # the same work, counted per Linear layer
