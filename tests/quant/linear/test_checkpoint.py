from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import FormatError
from penjing.models.encoder import TinyEncoder
from penjing.quant import (
    PerGroup,
    QuantConfig,
    QuantSpec,
    int8,
    load_quantized,
    prepare,
    ptq,
    save_quantized,
    weight_only,
)
from penjing.quant.linear.checkpoint import config_from_dict, config_to_dict


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    model = pj.models.create("vgg", width=0.25)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(
    ("make", "config"),
    [(lambda: pj.models.create("lenet5"), int8()),
     (_vgg, int8(observer="entropy", first=False)),
     (_vgg, weight_only(bits=4, group_size=32)),
     (TinyEncoder, int8(observer="percentile"))],
)
def test_round_trip_gives_the_very_same_outputs(tmp_path, make, config):
    torch.manual_seed(0)
    model = make().eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    q = ptq(model, calib, config)
    size = save_quantized(q, config, tmp_path / "q.safetensors")
    loaded = load_quantized(make(), tmp_path / "q.safetensors")  # fresh random weights
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(loaded(x), q(x))
    float_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    assert size < 0.5 * float_bytes  # int8 weights; biases, norms and scales stay float32


def test_weights_are_stored_as_int8(tmp_path):
    from safetensors.torch import load_file

    model = pj.models.create("lenet5").eval()
    q = ptq(model, [torch.randn(8, 1, 28, 28)], int8())
    save_quantized(q, int8(), tmp_path / "q.safetensors")
    tensors = load_file(tmp_path / "q.safetensors")
    ints = {k: v for k, v in tensors.items() if k.endswith(".int")}
    assert set(ints) == {f"{n}.parametrizations.weight.original.int"
                         for n in ("conv1", "conv2", "fc1", "fc2")}
    assert all(v.dtype == torch.int8 for v in ints.values())
    assert int(ints["fc1.parametrizations.weight.original.int"].abs().max()) == 127


def test_config_survives_json():
    cfg = QuantConfig(
        weight=QuantSpec(4, granularity=PerGroup(64)), observer="mse", weight_range="mse",
        types=(nn.Linear,), layers={"fc1": False, "fc2": QuantSpec(8)}, first=False,
        learnable=True,
    )
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_bad_files_are_clear_errors(tmp_path):
    model = pj.models.create("lenet5").eval()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(model, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="cannot read"):
        load_quantized(model, tmp_path / "junk.safetensors")
    pj.train.save_checkpoint(model, tmp_path / "float.safetensors")
    with pytest.raises(FormatError, match="not a penjing quantized checkpoint"):
        load_quantized(model, tmp_path / "float.safetensors")
    q = ptq(model, [torch.randn(8, 1, 28, 28)], int8())
    path = tmp_path / "q.safetensors"
    save_quantized(q, int8(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt"):
        load_quantized(model, tmp_path / "bad.safetensors")
    with pytest.raises(FormatError, match="saved from a different model or config"):
        load_quantized(pj.models.create("lenet300"), path)


def test_an_uncalibrated_model_is_not_saved(tmp_path):
    q = prepare(pj.models.create("lenet5"), int8())
    with pytest.raises(ValueError, match="'conv1_input_quant' is not calibrated yet"):
        save_quantized(q, int8(), tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("bits", [8, 16])
def test_unsigned_weights_round_trip(tmp_path, bits):
    """Regression: unsigned 8-bit weights were stored as int8, so 128..255 wrapped."""
    torch.manual_seed(0)
    config = QuantConfig(weight=QuantSpec(bits, symmetric=False, signed=False))
    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], config)
    save_quantized(q, config, tmp_path / "q.safetensors")
    loaded = load_quantized(pj.models.create("lenet5"), tmp_path / "q.safetensors")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(loaded(x), q(x))


def test_a_file_cannot_make_load_import_code(tmp_path):
    """Regression: layer types in the file's config were imported by name, so loading a
    file could run any installed module's top-level code."""
    import sys

    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], int8())
    path = tmp_path / "q.safetensors"
    save_quantized(q, int8(), path)
    linear = "torch.nn.modules.linear:Linear"
    cases = [(lambda c: c.replace(linear, "this:Linear"), "module 'this' is not imported"),
             (lambda c: c.replace(linear, "os:system"), "does not name an nn.Module class"),
             (lambda c: c[:-1], "holds a quantization config penjing cannot read")]
    for edit, message in cases:
        def change(tensors, metadata, edit=edit):
            metadata["config"] = edit(metadata["config"])

        _rewrite(path, tmp_path / "bad.safetensors", change)
        with pytest.raises(FormatError, match=message):
            load_quantized(pj.models.create("lenet5"), tmp_path / "bad.safetensors")
    assert "this" not in sys.modules


def test_a_checkpoint_of_another_shape_does_not_fit(tmp_path):
    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], int8())
    save_quantized(q, int8(), tmp_path / "q.safetensors")
    with pytest.raises(FormatError, match="does not fit this LeNet5"):
        load_quantized(pj.models.create("lenet5", num_classes=5), tmp_path / "q.safetensors")


@pytest.mark.parametrize(("qmin", "qmax"), [(-8, 7), (0, 15), (-2, 1), (-4, 3)])
@pytest.mark.parametrize("numel", [1, 2, 7, 64, 513])
def test_nibble_packing_round_trips(qmin, qmax, numel):
    from penjing.quant.linear.checkpoint import pack_nibbles, unpack_nibbles

    torch.manual_seed(numel)
    shape = torch.Size([numel])
    ints = torch.randint(qmin, qmax + 1, shape)
    ints[0] = qmin
    ints[-1] = qmax
    packed = pack_nibbles(ints, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_nibbles(packed, qmin, shape), ints.to(torch.int32))
    with pytest.raises(ValueError, match="cannot hold a weight of shape"):
        unpack_nibbles(packed[:-1] if numel > 2 else torch.zeros(5, dtype=torch.uint8),
                       qmin, shape)


def test_int4_weights_are_stored_two_to_a_byte(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    sizes = {}
    for bits in (4, 8):
        config = weight_only(bits=bits, group_size=32)
        q = ptq(_vgg(), [torch.randn(8, 1, 28, 28)], config)
        sizes[bits] = save_quantized(q, config, tmp_path / f"w{bits}.safetensors")
        loaded = load_quantized(_vgg(), tmp_path / f"w{bits}.safetensors")
        x = torch.randn(4, 1, 28, 28)
        assert torch.equal(loaded(x), q(x))
    tensors = load_file(tmp_path / "w4.safetensors")
    packed = {k: v for k, v in tensors.items() if k.endswith(".int4")}
    assert packed and not any(k.endswith(".int") for k in tensors)
    weights = {k.removesuffix(".int4"): p for k, p in packed.items()}
    numel = {k: v.numel() for k, v in q.state_dict().items() if k in weights}  # the 8-bit q
    assert set(numel) == set(weights)
    assert all(p.dtype == torch.uint8 and p.numel() == (numel[k] + 1) // 2
               for k, p in weights.items())
    # int8 → int4 saves half a byte per weight, and nothing else changes
    assert sizes[8] - sizes[4] >= 0.5 * sum(numel.values()) - 64 * len(numel)


def test_a_packed_weight_of_the_wrong_length_is_a_format_error(tmp_path):
    config = weight_only(bits=4)
    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], config)
    save_quantized(q, config, tmp_path / "q.safetensors")
    key = "fc1.parametrizations.weight.original.int4"

    def shorten(tensors, metadata):  # a consistent file of the wrong size
        tensors[key] = tensors[key][:-1].clone()

    _rewrite(tmp_path / "q.safetensors", tmp_path / "short.safetensors", shorten)
    with pytest.raises(FormatError, match="packed bytes of torch.uint8 cannot hold a weight"):
        load_quantized(pj.models.create("lenet5"), tmp_path / "short.safetensors")


def _rewrite(src, dst, edit) -> None:
    """Copy a quantized checkpoint through edit(tensors, metadata), with a valid digest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from penjing.core.checkpoint import INTEGRITY_KEY, checkpoint_digest
    from penjing.quant.linear.checkpoint import TENSOR_HASHED, _digest

    with safe_open(str(src), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, metadata)
    metadata.pop(INTEGRITY_KEY, None)
    if metadata["format"] in TENSOR_HASHED:
        metadata["sha256"] = _digest(tensors)
    else:
        metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    save_file(tensors, str(dst), metadata=metadata)


def test_format_1_files_still_load_and_newer_ones_ask_for_an_upgrade(tmp_path):
    from penjing.quant.linear.checkpoint import unpack_nibbles

    config = weight_only(bits=4)
    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], config)
    save_quantized(q, config, tmp_path / "q.safetensors")
    shapes = {k: v.shape for k, v in q.state_dict().items()}

    def as_format_1(tensors, metadata):  # int4 weights unpacked into int8, as format 1 did
        for key in [k for k in tensors if k.endswith(".int4")]:
            ints = unpack_nibbles(tensors.pop(key), -8, shapes[key.removesuffix(".int4")])
            tensors[key.removesuffix("4")] = ints.to(torch.int8)
        metadata["format"] = "penjing.quantized/1"

    _rewrite(tmp_path / "q.safetensors", tmp_path / "v1.safetensors", as_format_1)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(load_quantized(pj.models.create("lenet5"), tmp_path / "v1.safetensors")(x),
                       q(x))
    _rewrite(tmp_path / "q.safetensors", tmp_path / "v9.safetensors",
             lambda t, m: m.update(format="penjing.quantized/9"))
    with pytest.raises(FormatError, match="newer than this penjing reads.*upgrade penjing"):
        load_quantized(pj.models.create("lenet5"), tmp_path / "v9.safetensors")
