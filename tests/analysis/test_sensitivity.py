"""Sensitivity sweeps: exact restore, the table's numbers, sharding, bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from penjing.analysis import EvaluateError, SensitivityTable, sensitivity
from penjing.prune.masking.magnitude import magnitude_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(32, 2, 8, 8, generator=torch.Generator().manual_seed(1))


def _agreement(reference: torch.Tensor):
    """A metric in [0, 1]: the share of inputs whose argmax matches the dense model's."""
    labels = reference.argmax(1)

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(X).argmax(1) == labels).float().mean())

    return evaluate


def _bits(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs", [
    {"ratios": [0.3, 0.6, 0.9]},
    {"ratios": [0.5, 0.75], "structure": "nm", "layers": ["2", "5"]},
    {"ratios": [0.25, 0.5], "structure": "channel", "example_inputs": X[:1]},
    {"bits": [6, 3, 1], "quantizer": "kmeans"},
    {"bits": [8, 4, 2], "quantizer": "linear"},
])
def test_the_model_is_restored_bit_for_bit(kwargs):
    model = _model()
    before = _bits(model)
    with torch.no_grad():
        reference = model(X)
    table = sensitivity(model, _agreement(reference), **kwargs)
    assert _bits(model) == before
    assert table.baseline == 1.0
    assert all(len(v) == len(table.points) for v in table.values.values())
    assert all(0.0 <= x <= 1.0 for v in table.values.values() for x in v)


def test_masked_layers_are_swept_and_restored():
    model = _model()
    magnitude_(model, 0.5)
    before = _bits(model)
    with torch.no_grad():
        reference = model(X)
    table = sensitivity(model, _agreement(reference), ratios=[0.4, 0.8])
    assert _bits(model) == before
    # 40 % is below the 50 % already pruned: nothing changes, the metric is the baseline
    assert all(v[0] == table.baseline for v in table.values.values())


def test_each_point_prunes_exactly_its_ratio_of_one_layer():
    model = _model()
    seen = []

    def evaluate(m: nn.Module) -> float:
        zeros = {n: int((p.weight == 0).sum()) for n, p in m.named_modules()
                 if isinstance(p, nn.Conv2d | nn.Linear)}
        seen.append(zeros)
        return 0.0

    sensitivity(model, evaluate, ratios=[0.5], layers=["5", "7"])
    assert seen[1] == {"0": 0, "2": 0, "5": 1024, "7": 0}  # 0.5 of 16 x 128 in layer "5"
    assert seen[2] == {"0": 0, "2": 0, "5": 0, "7": 32}


def test_a_large_ratio_hurts_more_than_a_small_one():
    model = _model()
    with torch.no_grad():
        reference = model(X)
    table = sensitivity(model, _agreement(reference), ratios=[0.1, 0.95])
    for layer in table.layers:
        assert table.values[layer][1] <= table.values[layer][0]
    assert any(table.drop(layer)[1] > 0 for layer in table.layers)


def test_baseline_is_evaluated_once_and_every_point_once():
    calls = []
    model = _model()
    sensitivity(model, lambda m: calls.append(1) or 0.5, ratios=[0.2, 0.4, 0.6])
    assert len(calls) == 1 + 4 * 3


def test_csv_and_png(tmp_path):
    model = _model()
    with torch.no_grad():
        reference = model(X)
    table = sensitivity(model, _agreement(reference), ratios=[0.5, 0.9], macs={"0": 7})
    rows = list(csv.reader(table.save_csv(tmp_path / "s.csv").open()))
    assert rows[0] == ["layer", "weights", "macs", "sparsity=0.5", "sparsity=0.9"]
    assert rows[1][0] == "<baseline>" and float(rows[1][3]) == table.baseline
    assert rows[2][:3] == ["0", "144", "7"]
    assert [float(x) for x in rows[2][3:]] == table.values["0"]
    png = table.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "baseline" in str(table) and "0.9" in table.format()


@pytest.mark.parametrize("ratios", [[1.0], [-0.1], [0.5, 1.2], [], [True]])
def test_ratios_outside_the_unit_interval_are_refused(ratios):
    model = _model()
    before = _bits(model)
    with pytest.raises(ValueError, match="ratio|ratios"):
        sensitivity(model, lambda m: 1.0, ratios=ratios)
    assert _bits(model) == before


def test_an_evaluate_that_raises_leaves_the_model_as_it_was():
    model = _model()
    before = _bits(model)
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of data")
        return 1.0

    with pytest.raises(EvaluateError, match="layer '0' at sparsity 0.9: RuntimeError: out of data"):
        sensitivity(model, evaluate, ratios=[0.5, 0.9])
    assert _bits(model) == before


def test_unknown_layers_and_options_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        sensitivity(model, lambda m: 1.0, ratios=[0.5], layers=["fc9"])
    with pytest.raises(ValueError, match="structure must be one of"):
        sensitivity(model, lambda m: 1.0, ratios=[0.5], structure="row")
    with pytest.raises(ValueError, match="exactly one of ratios"):
        sensitivity(model, lambda m: 1.0, ratios=[0.5], bits=[4])
    with pytest.raises(ValueError, match="bit width must be an int in 1..16"):
        sensitivity(model, lambda m: 1.0, bits=[0])
    with pytest.raises(ValueError, match="needs example_inputs"):
        sensitivity(model, lambda m: 1.0, ratios=[0.5], structure="channel")
    with pytest.raises(TypeError, match="must return a number"):
        sensitivity(model, lambda m: "good", ratios=[0.5])


def test_table_drop_follows_the_metric_direction():
    t = SensitivityTable("loss", "sparsity", "weight", 1.0, [0.5], {"a": [1.5]}, {"a": 10},
                         higher_is_better=False)
    assert t.drop("a") == [0.5]


def _sharded_worker(rank: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model()
        with torch.no_grad():
            reference = model(X)
        calls = []
        evaluate = _agreement(reference)
        table = sensitivity(model, lambda m: calls.append(1) or evaluate(m),
                            ratios=[0.3, 0.6, 0.9])
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"values": table.values, "calls": len(calls),
                       "world": table.world_size}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch
def test_sharded_sweep_gives_the_same_table(tmp_path):
    import json

    import torch.multiprocessing as mp

    model = _model()
    with torch.no_grad():
        reference = model(X)
    single = sensitivity(model, _agreement(reference), ratios=[0.3, 0.6, 0.9])
    out = str(tmp_path / "table")
    mp.spawn(_sharded_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    parts = [json.loads((tmp_path / f"table.{r}").read_text()) for r in range(2)]
    for part in parts:
        assert part["values"] == single.values and part["world"] == 2
    # 4 layers x 3 ratios = 12 points shared 6 / 6, plus each rank's baseline
    assert [p["calls"] for p in parts] == [7, 7]
