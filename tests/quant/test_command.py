from __future__ import annotations

import re

import pytest
import torch

import penjing as pj
from penjing.cli import main
from penjing.quant.linear.config import make_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory, lenet5_trained):
    path = tmp_path_factory.mktemp("quantize") / "lenet5.safetensors"
    pj.train.save_checkpoint(lenet5_trained[0], path)
    return path


def test_quantize_prints_the_layer_table_and_writes_both_files(
    tmp_path, weights, lenet5_trained, capsys
):
    onnx_path, out = tmp_path / "q.onnx", tmp_path / "q.safetensors"
    rc = main(["quantize", "lenet5", "--weights", str(weights), "--observer", "percentile",
               "--calib-images", "128", "--onnx", str(onnx_path), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in {"conv1", "conv2", "fc1", "fc2"}}
    assert list(rows) == ["conv1", "conv2", "fc1", "fc2"]
    for cells in rows.values():
        assert cells[2] == "int8/ch" and float(cells[6]) > 38 and float(cells[8]) > 30
    assert rows["conv2"][9] == "25"  # 8 + 8 + ⌈log2(20·5·5)⌉ accumulator bits
    fp32, quantized = (float(v) / 100 for v in re.search(
        r"FP32 ([\d.]+)%, quantized ([\d.]+)%", text).groups())
    assert fp32 == pytest.approx(lenet5_trained[4])
    assert quantized >= fp32 - 0.01
    ort_acc = float(re.search(r"ONNX Runtime accuracy ([\d.]+)%", text).group(1)) / 100
    assert abs(ort_acc - quantized) <= 0.002  # ORT's integer model follows the simulation
    assert "QLinearConv×2" in text and "QGemm×2" in text
    # the model file holds the same model
    loaded = pj.load(out, pj.models.create("lenet5"))
    test = lenet5_trained[2]
    assert pj.train.evaluate(loaded, test) == pytest.approx(quantized, abs=1e-9)
    assert out.stat().st_size < 0.3 * weights.stat().st_size


def test_max_drop_keeps_sensitive_layers_in_float(weights, capsys):
    rc = main(["quantize", "lenet5", "--weights", str(weights), "--bits", "2",
               "--calib-images", "128", "--max-drop", "1", "--guard-images", "500", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    float_acc, quant_acc, allowed = (float(v) for v in re.search(
        r"accuracy guard: float ([\d.]+), quantized ([\d.]+) \(drop [-+\d.]+, allowed "
        r"([\d.]+)\)", text).groups())
    assert allowed == 0.01 and float_acc - quant_acc <= 0.01
    kept = re.findall(r"kept in float: (\w+) \(quantized alone it cost", text)
    assert kept and set(kept) < {"conv1", "conv2", "fc1", "fc2"}
    rows = {line.split()[0]: line.split()[2] for line in text.splitlines()
            if line.split() and line.split()[0] in {"conv1", "conv2", "fc1", "fc2"}}
    assert all(rows[name] == "float" for name in kept if name in rows)


def test_int4_groups_weight_only(tmp_path, weights, capsys):
    rc = main(["quantize", "lenet5", "--weights", str(weights), "--bits", "4",
               "--granularity", "group", "--group-size", "32", "--weight-only"])
    text = capsys.readouterr().out
    assert rc == 0 and "activations float" in text
    assert text.count("int4/g32") == 1 + 4  # the setting line and every layer


def test_gptq_and_awq_quantize_the_linear_layers_and_say_the_convs_stay_float(
        tmp_path, weights, lenet5_trained, capsys):
    accuracy = {}
    for method in ("nearest", "gptq", "awq"):
        out = tmp_path / f"{method}.safetensors"
        argv = ["quantize", "lenet5", "--weights", str(weights), "--bits", "3",
                "--granularity", "group", "--group-size", "32", "--weight-only",
                "--calib-images", "128", "--skip", "conv.*", "--out", str(out)]
        rc = main([*argv, "--method", method])
        text = capsys.readouterr().out
        assert rc == 0, text
        accuracy[method] = float(re.search(r"quantized ([\d.]+)%", text).group(1)) / 100
        loaded = pj.load(out, pj.models.create("lenet5"))  # the file holds what was measured
        assert pj.train.evaluate(loaded, lenet5_trained[2]) == pytest.approx(accuracy[method],
                                                                           abs=1e-9)
        if method != "nearest":
            assert f"by {method.upper()} on 128 calibration images (2 Linear layers)" in text
            assert pj.quant.get_weight_quant(loaded.conv1) is None
    # 3-bit groups cost round-to-nearest accuracy; the layer-wise methods keep more of it
    assert max(accuracy["gptq"], accuracy["awq"]) >= accuracy["nearest"] - 0.005
    with pytest.warns(pj.errors.PenjingWarning, match="GPTQ quantizes Linear layers only"):
        assert main(["quantize", "lenet5", "--weights", str(weights), "--weight-only",
                     "--method", "gptq", "--calib-images", "64"]) == 0
    assert main(["quantize", "lenet5", "--weights", str(weights), "--method", "awq"]) == 2
    assert "AWQ quantizes weights only, once: give it with --weight-only" in \
        capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--bits", "9"], "bits must be one of"),
     (["--act-bits", "1"], "bits must be one of"),
     (["--granularity", "group"], "group_size goes with granularity 'group'"),
     (["--group-size", "32"], "group_size goes with granularity 'group'"),
     (["--calib-images", "0"], "calib_images must be >= 1, got 0"),
     (["--skip", "conv9"], "layers pattern 'conv9' matches no module"),
     (["--skip", "conv["], "layers pattern 'conv[' is not a regular expression"),
     (["--max-drop", "150"], "--max-drop is in accuracy points, between 0 and 100"),
     (["--max-drop", "1", "--epochs", "1"], "max_drop guards PTQ; with QAT"),
     (["--max-drop", "1", "--guard-images", "0"], "guard_images must be >= 1, got 0")],
)
def test_bad_options_are_clear_errors(weights, capsys, argv, message):
    assert main(["quantize", "lenet5", "--weights", str(weights), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_weights_and_unknown_model(tmp_path, weights, capsys):
    assert main(["quantize", "lenet5", "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", "nosuch:thing", "--weights", str(weights)]) == 2
    assert "cannot import module 'nosuch' for model 'nosuch:thing'" in capsys.readouterr().err


def test_make_config_maps_options_to_specs():
    cfg = make_config(bits=4, granularity="tensor", act_bits=None, skip=("fc2",),
                      skip_first=True)
    assert cfg.weight.bits == 4 and cfg.activation is None and not cfg.first
    assert dict(cfg.layers) == {"fc2": False}
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        make_config(observer="kl")
    with pytest.raises(ValueError, match="granularity must be one of .* got 'row'"):
        make_config(granularity="row")
    assert torch.equal(torch.tensor(make_config().activation.qmax), torch.tensor(255))
