"""`penjing prune`: the numbers it prints are measured, options are checked."""

from __future__ import annotations

import pytest
import torch

import penjing as pj
from penjing.cli import main
from penjing.cli.prune import prune_command

FAST = {"repeats": 2, "progress": False, "latency_batch": 4}


def test_channel_pruning_quarters_the_vgg_and_saves_a_loadable_file(tmp_path):
    path = tmp_path / "small.safetensors"
    summary = prune_command("vgg", ratio=0.5, dataset=None, input_shape=(4, 1, 28, 28),
                            out=path, **FAST)
    small = pj.load(path, pj.models.create("vgg"))
    assert summary.after.params == pj.analysis.count_params(small)
    assert summary.before.macs == 29_424_640
    assert summary.after.macs / summary.before.macs == pytest.approx(0.25, abs=0.01)
    assert summary.before.accuracy is None
    text = summary.format()
    assert "MACs / image" in text and f"{summary.after.macs:,}" in text


def test_stripe_masks_are_compacted_and_nm_masks_only_count_as_non_zero():
    stripe = prune_command("vgg", structure="stripe", sparsity=0.5, dataset=None,
                           input_shape=(2, 1, 28, 28), **FAST)
    # half the stripes; the 1×1 conv of the stripe form runs over the padded input
    assert stripe.after.macs < 0.75 * stripe.before.macs
    assert "re-expressed" in stripe.format()
    nm = prune_command("lenet300", structure="nm", dataset=None,
                       input_shape=(2, 1, 28, 28), **FAST)
    assert nm.after.macs == nm.before.macs
    assert nm.after.nonzero_macs == nm.before.macs - (784 * 300 + 300 * 100 + 100 * 10) // 2


def test_accuracy_is_measured_on_the_bundled_test_split():
    summary = prune_command("lenet300", structure="neuron", ratio=0.5,
                            criterion="taylor", **FAST)
    assert 0.0 <= summary.after.accuracy <= 1.0 and summary.before.accuracy is not None
    assert summary.after.params < 0.6 * summary.before.params


def test_a_users_own_model_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = prune_command("my_nets:tiny", ratio=0.5, dataset=None,
                            input_shape=(1, 3, 10, 10), **FAST)
    assert summary.before.params == 8 * 27 + 8 + 4 * 72 + 4
    assert summary.after.params == 4 * 27 + 4 + 4 * 36 + 4


def test_head_pruning_of_a_users_transformer(tmp_path, monkeypatch):
    (tmp_path / "my_attention.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)\n"
        "    def forward(self, x):\n"
        "        return self.attn(x, x, x, need_weights=False)[0]\n"
        "def net():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = prune_command("my_attention:net", structure="head", ratio=0.5, dataset=None,
                            input_shape=(2, 5, 16), **FAST)
    # q, k, v lose 8 rows each (with biases), the output projection 8 columns
    assert summary.before.params - summary.after.params == 3 * (8 * 16 + 8) + 16 * 8
    assert "of the heads of 1 attention layers" in summary.format()
    with pytest.raises(ValueError, match=r"criterion must be one of \['l1', 'l2', 'random'\], "
                       "got 'taylor'"):
        prune_command("my_attention:net", structure="head", criterion="taylor",
                      dataset=None, input_shape=(2, 5, 16))


def test_cli_prints_the_table(capsys):
    code = main(["prune", "lenet5", "--data", "none", "--input-shape", "2,1,28,28",
                 "--ratio", "0.5", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "lenet5: group pruning, ratio 0.5" in out and "latency ms, batch 2" in out


def test_bad_options_are_errors(capsys):
    with pytest.raises(ValueError, match="structure must be one of .*, got 'diagonal'"):
        prune_command("vgg", structure="diagonal", dataset=None, input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="criterion does not apply to block pruning; its "
                       "options: pattern, sparsity, layers"):
        prune_command("vgg", structure="block", criterion="bn", dataset=None,
                      input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="ratio does not apply to nm pruning"):
        prune_command("vgg", structure="nm", ratio=0.5, dataset=None,
                      input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="--nm must look like 2:4, got '2-4'"):
        prune_command("vgg", structure="nm", nm="2-4", dataset=None,
                      input_shape=(1, 1, 28, 28))
    # option values are checked before the model is built (and perhaps trained)
    with pytest.raises(ValueError, match=r"0 < n < m \(2:4 by default\), got 4:2"):
        prune_command("alexnet", structure="nm", nm="4:2", dataset=None,
                      input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        prune_command("alexnet", structure="block", sparsity=1.5, dataset=None,
                      input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="block pruning zeroes a fraction of weights: give "
                       "--sparsity"):
        prune_command("alexnet", structure="block", ratio=0.5, dataset=None,
                      input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="sparsity does not apply to group pruning"):
        prune_command("alexnet", sparsity=0.5, dataset=None, input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"ratio must be a fraction of channels .* got 1.5"):
        prune_command("alexnet", ratio=1.5, dataset=None, input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="without --data give --input-shape"):
        prune_command("vgg", dataset=None)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        prune_command("no_such_module:make", dataset=None, input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="module 'torch.nn' has no attribute 'nope'"):
        prune_command("torch.nn:nope", dataset=None, input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        prune_command("alexnet", dataset=None, input_shape=(1, 1, 28, 28))
    assert main(["prune", "vgg", "--data", "none", "--input-shape", "1,1,28,28",
                 "--ratio", "1.0", "--quiet"]) == 2
    assert "ratio must be a fraction of channels to remove in [0, 1), got 1.0" in (
        capsys.readouterr().err)


def test_a_function_returning_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="must give an nn.Module, got dict"):
        prune_command("builtins:dict", dataset=None, input_shape=(1, 1, 28, 28))


def test_batchnorm_statistics_are_re_measured_after_pruning(tmp_path):
    runs = {}
    for batches in (0, 20):
        path = tmp_path / f"bn{batches}.safetensors"
        summary = prune_command("vgg", ratio=0.5, bn_batches=batches, out=path, **FAST)
        runs[batches] = (summary.format(), pj.load(path, pj.models.create("vgg")).state_dict())
    assert "re-measured on 20 training batches" in runs[20][0]
    assert "re-measured" not in runs[0][0]
    fresh = pj.models.create("vgg").state_dict()
    key = next(k for k in runs[0][1] if k.endswith("running_var"))
    # untrained: 0 keeps the initial statistics (ones), 20 batches measure real ones
    assert torch.equal(runs[0][1][key], fresh[key][: len(runs[0][1][key])])
    assert not torch.allclose(runs[20][1][key], runs[0][1][key])
    with pytest.raises(ValueError, match="bn_batches must be an int >= 0"):
        prune_command("vgg", bn_batches=-1, **FAST)


def test_latency_shows_its_spread_and_says_when_it_is_too_wide(monkeypatch):
    import itertools

    import penjing.cli.prune as command

    # before: steady 10 ms; after: 4, 6, 8, 10 ms, whose interquartile range is 50 % of 7
    timings = itertools.chain([0.0], [0.010] * 4, [0.0], [0.004, 0.006, 0.008, 0.010])
    monkeypatch.setattr(command, "latency", lambda *a, **k: next(timings))
    summary = prune_command("lenet300", dataset=None, input_shape=(2, 1, 28, 28),
                            repeats=4, progress=False, latency_batch=2)
    assert summary.before.latency_ms == pytest.approx(10.0)
    assert summary.after.latency_ms == pytest.approx(7.0)
    assert summary.after.latency_spread == pytest.approx((8.5 - 5.5) / 7)
    text = summary.format()
    assert "10.000 ±0%" in text and "7.000 ±21%" in text
    assert "warning: the latency timings spread by 43% of their median" in text
