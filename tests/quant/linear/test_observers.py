from __future__ import annotations

import pytest
import torch

from penjing.quant import OBSERVERS, PerChannel, PerGroup, QuantSpec
from penjing.quant.linear.observers import make_observer

U8 = QuantSpec(8, symmetric=False, signed=False)


def _heavy_tailed(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(4096, generator=g).abs() for _ in range(4)]
    batches[2][0] = 40.0  # one outlier far outside the bulk
    return batches


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_every_observer_gives_a_range_inside_min_max(name):
    obs = make_observer(name, U8)
    for x in _heavy_tailed():
        obs(x)
    lo, hi = obs.range()
    assert float(lo) >= 0 and 0 < float(hi) <= 40.0 + 1e-4
    scale, zero = obs.qparams()
    assert float(scale) > 0 and 0 <= int(zero) <= 255


def test_minmax_keeps_the_outlier_and_clipping_observers_drop_it():
    ranges = {}
    for name in OBSERVERS:
        obs = make_observer(name, U8)
        for x in _heavy_tailed():
            obs(x)
        ranges[name] = float(obs.range()[1])
    assert ranges["minmax"] == pytest.approx(40.0)
    for name in ("percentile", "entropy"):
        assert ranges[name] < 10.0, (name, ranges[name])
    # at 8 bits one outlier costs MSE more clipped than kept; at 4 bits the steps cost more
    mse4 = make_observer("mse", QuantSpec(4, symmetric=False, signed=False))
    for x in _heavy_tailed():
        mse4(x)
    assert float(mse4.range()[1]) < 10.0
    # moving average: the outlier batch is averaged with its neighbours
    assert ranges["moving_average"] < 40.0


def test_moving_average_follows_the_batches():
    obs = make_observer("moving_average", U8)
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([0.0, 3.0]))
    assert float(obs.range()[1]) == pytest.approx(1.0 + 0.1 * (3.0 - 1.0))


def test_percentile_of_a_uniform_is_near_that_quantile():
    obs = OBSERVERS["percentile"](QuantSpec(8, symmetric=False, signed=True), percentile=99.0)
    x = torch.linspace(-1, 1, 200_001)
    obs(x[::2])
    obs(x[1::2])  # second batch, same range: no rebinning
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(0.98, abs=0.01)
    assert float(lo) == pytest.approx(-0.98, abs=0.01)


def test_histogram_widens_when_later_batches_grow():
    obs = make_observer("percentile", U8)
    obs(torch.rand(1000))
    obs(torch.rand(1000) * 10)
    assert obs.edge_hi >= 9.9
    assert float(obs.counts.sum()) == 2000


def test_per_channel_minmax_gives_one_range_per_channel():
    obs = make_observer("minmax", QuantSpec(8, granularity=PerChannel(1)))
    obs(torch.randn(8, 3, 5))
    lo, hi = obs.range()
    assert lo.shape == hi.shape == (3,)


def test_histogram_observers_refuse_per_channel():
    with pytest.raises(ValueError, match="per tensor"):
        make_observer("entropy", QuantSpec(8, granularity=PerChannel(0)))
    with pytest.raises(ValueError, match="per tensor or per channel"):
        make_observer("minmax", QuantSpec(8, granularity=PerGroup(32)))


def test_no_data_and_unknown_names_are_errors():
    with pytest.raises(ValueError, match="seen no data"):
        make_observer("mse", U8).range()
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        make_observer("kl", U8)


def test_a_callable_is_accepted_where_a_name_is():
    obs = make_observer(lambda spec: OBSERVERS["percentile"](spec, percentile=90.0), U8)
    obs(torch.linspace(0, 1, 10_001))
    assert float(obs.range()[1]) == pytest.approx(0.9, abs=0.01)


def test_mse_range_has_no_more_error_than_minmax():
    from penjing.quant import fake_quantize

    spec = QuantSpec(4, symmetric=False, signed=False)
    data = torch.cat(_heavy_tailed())
    errors = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, spec)
        obs(data)
        errors[name] = float((fake_quantize(data, *obs.qparams(), spec) - data).square().sum())
    assert errors["mse"] < 0.5 * errors["minmax"]


def test_entropy_keeps_a_one_sided_minimum_spike():
    """Regression: an image's background (most pixels at one negative value) once pulled
    the KL threshold down to |background|, clipping every stroke pixel."""
    g = torch.Generator().manual_seed(0)
    levels = torch.linspace(-0.42, 2.82, 256)  # normalised 8-bit pixels
    background = torch.full((80_000,), -0.42)
    strokes = levels[torch.randint(1, 256, (20_000,), generator=g)]
    obs = make_observer("entropy", U8)
    obs(torch.cat([background, strokes]))
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(-0.42) and float(hi) > 2.0


def test_entropy_is_not_pulled_down_by_relu_zeros():
    """Regression: half the values exactly zero (after ReLU) once made the smallest
    threshold win; exact zeros cost nothing at any threshold."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g).clamp_min(0)
    obs = make_observer("entropy", U8)
    obs(x)
    assert obs.zeros == int((x == 0).sum())
    assert float(obs.range()[1]) > 0.6 * float(x.max())


def test_percentile_counts_exact_zeros():
    x = torch.cat([torch.zeros(9_000), torch.linspace(0.001, 1, 1_000)])
    obs = OBSERVERS["percentile"](U8, percentile=95.0)
    obs(x)
    assert float(obs.range()[1]) == pytest.approx(0.5, abs=0.01)  # 95 % of 10,000 values


def test_entropy_clips_at_most_a_thousandth_of_a_spiky_histogram(mnist):
    """Regression: a first conv over digit images gives one repeated value per channel
    (the convolved background); KL charged those spikes so much that it clipped a fifth
    of the values. The search now starts where at most 0.1 % are clipped."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(1, 32, 3, padding=1)
    with torch.no_grad():
        y = torch.relu(conv(mnist.train.tensors[0][:256]))
    clipped = {}
    for limit in (0.999, 0.001):  # no limit: TensorRT's plain search; the default
        obs = OBSERVERS["entropy"](U8, max_clipped=limit)
        obs(y)
        clipped[limit] = float((y > obs.range()[1]).float().mean())
    assert clipped[0.999] > 0.1
    assert clipped[0.001] <= 0.001
    with pytest.raises(ValueError, match="max_clipped must be in"):
        OBSERVERS["entropy"](U8, max_clipped=1.0)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_infinite_activations_are_an_error(name):
    """Regression: min/max gave an infinite scale, the histograms a bare torch error."""
    obs = make_observer(name, U8)
    with pytest.raises(ValueError, match="must be finite"):
        obs(torch.tensor([0.0, 1.0, float("inf")]))


def test_observer_options_out_of_range_are_errors():
    with pytest.raises(ValueError, match="momentum must be in"):
        OBSERVERS["moving_average"](U8, momentum=0.0)
    with pytest.raises(ValueError, match="bins must be >= 16, got 8"):
        OBSERVERS["mse"](U8, bins=8)
    with pytest.raises(ValueError, match="percentile must be in"):
        OBSERVERS["percentile"](U8, percentile=0.0)
