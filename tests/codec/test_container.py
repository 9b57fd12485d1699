"""The .pjz container: bit-exact round trips, honest sizes, and loud failures on bad files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import penjing.codec as codec
from penjing.codec import container
from penjing.errors import FormatError


def _shared(
    shape: tuple[int, ...],
    values: int,
    sparsity: float,
    g: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A pruned, weight-shared tensor: `values` distinct non-zeros, `sparsity` zeros."""
    book = torch.linspace(-1.0, 1.0, values + 1)
    book = book[book != 0][:values]
    w = book[torch.randint(0, values, shape, generator=g)]
    keep = torch.rand(shape, generator=g) >= sparsity
    return (w * keep).to(dtype)  # `w * mask` leaves -0.0 for pruned negative weights


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        if not (a[name].is_floating_point() and a[name].isnan().any()):  # NaN != NaN
            assert torch.equal(a[name], b[name]), name
        assert _bits(a[name]) == _bits(b[name]), name


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": _shared((16, 8, 3, 3), 16, 0.7, g).abs(),  # abs: no -0.0, exact bits
        "conv.bias": torch.randn(16, generator=g),
        "fc.weight": _shared((60, 100), 31, 0.9, g).abs(),
        "fc.bias": torch.randn(60, generator=g),
        "bn.num_batches_tracked": torch.tensor(123, dtype=torch.int64),
        "half": _shared((30, 40), 7, 0.5, g, torch.float16).abs(),
        "bf16": _shared((30, 40), 7, 0.5, g, torch.bfloat16).abs(),
        "f64": _shared((50,), 3, 0.2, g, torch.float64).abs(),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(2.5),
        "mask": torch.rand(10, 10, generator=g) > 0.5,
        # NaN payloads and denormals, repeated so they are codebook-coded, not raw
        "odd": torch.tensor(
            [0x7FC00001, 0x7F800000, 0xFF800000 - (1 << 32), 1, 0], dtype=torch.int32
        )
        .view(torch.float32)
        .repeat(60),
        "raw-negzero": torch.cat([torch.randn(20, generator=g), torch.tensor([-0.0])]),
        "zeros": torch.zeros(40, 50),
    }


def test_round_trip_is_bit_exact(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "model.pjz"
    report = codec.save(state, path)
    _assert_same_bits(state, codec.load(path))
    enc = {layer.name: layer.encoding for layer in report.layers}
    assert enc["fc.weight"] in ("dense", "sparse")  # rANS makes dense codes competitive
    assert enc["conv.bias"] == enc["fc.bias"] == enc["bn.num_batches_tracked"] == "raw"
    for name in ("half", "bf16", "f64", "odd", "zeros"):
        assert enc[name] in ("dense", "sparse"), name
    assert enc["raw-negzero"] == "raw"


def test_negative_zero_is_a_zero(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    w = _shared((200, 100), 15, 0.9, g)
    assert (torch.signbit(w) & (w == 0)).any()
    report = codec.save({"w": w}, tmp_path / "w.pjz", coders=("huffman",))
    back = codec.load(tmp_path / "w.pjz")["w"]
    assert torch.equal(back, w)  # equal values; -0.0 comes back as +0.0
    assert not (torch.signbit(back) & (back == 0)).any()
    assert report.layers[0].encoding == "sparse"
    assert report.layers[0].nonzero == int(torch.count_nonzero(w))


def test_module_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.mul_(model[0].weight.abs() > 0.1)
    report = codec.save(model, tmp_path / "m.pjz")
    assert [layer.name for layer in report.layers] == list(model.state_dict())
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    fresh.load_state_dict(codec.load(tmp_path / "m.pjz"))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sparse_fc_compresses_over_20x(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    w = _shared((300, 784), 31, 0.9, g)
    report = codec.save({"fc1.weight": w}, tmp_path / "fc.pjz", coders=("huffman",))
    layer = report.layers[0]
    assert layer.encoding == "sparse" and layer.index_bits == 5 and layer.weight_bits == 5
    assert report.compressed_bytes == os.path.getsize(tmp_path / "fc.pjz")
    assert report.original_bytes == 300 * 784 * 4
    assert report.ratio > 20
    assert layer.padding > 0
    assert layer.index_stream.entropy_bits <= layer.index_stream.coded_bits
    assert layer.index_stream.coded_bits < layer.index_stream.fixed_bits


def test_report_is_the_bytes_on_disk(state: dict, tmp_path: Path) -> None:
    saved = codec.save(state, tmp_path / "a.pjz")
    dry = codec.report_size(state)
    assert saved.compressed_bytes == dry.compressed_bytes == os.path.getsize(tmp_path / "a.pjz")
    assert saved.layers == dry.layers
    assert saved.overhead_bytes > 20
    assert sum(r.total_bytes for r in saved.layers) + saved.overhead_bytes == saved.compressed_bytes
    for r in saved.layers:
        assert r.total_bytes == r.codebook_bytes + r.index_bytes + r.weight_bytes
        assert r.original_bytes == r.numel * state[r.name].element_size()
    raw = next(r for r in saved.layers if r.name == "fc.bias")
    assert raw.total_bytes == raw.original_bytes == 240 and raw.weight_bits == 32
    assert "fc.weight" in saved.format()


def test_inspect_reads_the_manifest(state: dict, tmp_path: Path) -> None:
    saved = codec.save(state, tmp_path / "a.pjz")
    seen = codec.inspect(tmp_path / "a.pjz")
    assert seen.compressed_bytes == saved.compressed_bytes
    assert seen.coding_saving == pytest.approx(saved.coding_saving)
    for a, b in zip(saved.layers, seen.layers, strict=True):
        assert (a.name, a.shape, a.encoding, a.total_bytes, a.padding, a.nonzero) == (
            b.name,
            b.shape,
            b.encoding,
            b.total_bytes,
            b.padding,
            b.nonzero,
        )
        if b.weight_stream is not None:
            assert b.weight_stream.entropy_bits is None
            assert b.weight_stream.coded_bits == pytest.approx(a.weight_stream.coded_bits)


def test_index_bits_override(state: dict) -> None:
    huffman = ("huffman",)  # with rANS the dense codes win and there are no gaps
    by_int = codec.report_size(state, index_bits=3, coders=huffman)
    assert next(r for r in by_int.layers if r.name == "fc.weight").index_bits == 3
    by_name = codec.report_size(state, index_bits={"fc.weight": 2}, coders=huffman)
    rows = {r.name: r for r in by_name.layers}
    assert rows["fc.weight"].index_bits == 2
    default = {r.name: r for r in codec.report_size(state, coders=huffman).layers}
    assert default["fc.weight"].index_bits == 5
    assert rows["fc.weight"].padding > default["fc.weight"].padding
    with pytest.raises(ValueError, match="not in the state_dict"):
        codec.report_size(state, index_bits={"nope.weight": 4})
    with pytest.raises(ValueError, match="index_bits must be in 1..16, got 17"):
        codec.report_size(state, index_bits=17)


def test_many_distinct_values_are_stored_raw() -> None:
    t = {"w": torch.arange(1.0, 301.0)}
    assert codec.report_size(t, max_codebook=299).layers[0].encoding == "raw"
    with pytest.raises(ValueError, match="max_codebook"):
        codec.report_size(t, max_codebook=70000)


@pytest.mark.parametrize("bad", [[1, 2], {"w": [1.0]}, {1: torch.ones(2)}])
def test_unsupported_objects_are_type_errors(bad, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        codec.save(bad, tmp_path / "x.pjz")
    assert not list(tmp_path.iterdir())


# ---- atomic writes -------------------------------------------------------------------


def test_save_leaves_no_temp_file(state: dict, tmp_path: Path) -> None:
    codec.save(state, tmp_path / "a.pjz")
    codec.save(state, tmp_path / "a.pjz")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["a.pjz"]


def test_failed_save_keeps_the_old_file(state: dict, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.pjz"
    codec.save(state, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        codec.save([1, 2, 3], path)
    assert path.read_bytes() == before

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        codec.save({"w": torch.ones(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pjz"]


# ---- bad files -----------------------------------------------------------------------


@pytest.fixture
def good(state: dict, tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "good.pjz"
    codec.save(state, path)
    return path, path.read_bytes()


def _expect_format_error(path: Path, data: bytes, match: str | None = None) -> FormatError:
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match) as info:
        codec.load(path)
    assert str(path) in str(info.value)
    assert "penjing.codec.save" in str(info.value)
    return info.value


def test_truncated_files_raise_format_error(good: tuple[Path, bytes], tmp_path: Path) -> None:
    _, data = good
    (length,) = struct.unpack_from("<Q", data, 8)
    cuts = [
        1,
        3,
        4,
        10,
        19,
        20,
        20 + length // 2,
        20 + length,
        20 + length + 1,
        (20 + length + len(data)) // 2,
        len(data) - 1,
    ]
    for cut in cuts:
        _expect_format_error(tmp_path / "cut.pjz", data[:cut], "truncated")
    _expect_format_error(tmp_path / "long.pjz", data + b"\x00", "unexpected bytes")


def test_a_flipped_byte_anywhere_raises_format_error(
    good: tuple[Path, bytes], tmp_path: Path
) -> None:
    _, data = good
    (length,) = struct.unpack_from("<Q", data, 8)
    manifest = json.loads(zlib.decompress(data[20 : 20 + length]))
    offsets = list(range(20)) + [20, 20 + length // 2, 20 + length - 1]
    start = 20 + length
    for entry in manifest["tensors"]:
        for _kind, size, _crc in entry["sections"]:
            if size:
                offsets += [start, start + size // 2, start + size - 1]
            start += size
    assert start == len(data)
    for at in offsets:
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        _expect_format_error(tmp_path / "flip.pjz", bytes(flipped))


def test_unknown_version_raises_format_error(good: tuple[Path, bytes], tmp_path: Path) -> None:
    _, data = good
    err = _expect_format_error(
        tmp_path / "v99.pjz", data[:4] + struct.pack("<H", 99) + data[6:], "version 99"
    )
    assert "upgrade penjing" in str(err)


@pytest.mark.parametrize(
    "data",
    [b"", b"PK\x03\x04" + bytes(100), bytes(range(256)) * 4, b'{"format": "pjz"}', b"PJZ"],
    ids=["empty", "zip", "random", "json", "magic-only"],
)
def test_not_a_pjz_raises_format_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.pjz"
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        codec.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(FormatError):
        codec.inspect(path)


def test_valid_checksum_on_a_bad_manifest_is_still_a_format_error(good, tmp_path) -> None:
    _, data = good
    (length,) = struct.unpack_from("<Q", data, 8)
    manifest = json.loads(zlib.decompress(data[20 : 20 + length]))
    manifest["tensors"][0]["dtype"] = "load"  # names a torch function, not a dtype
    blob = zlib.compress(json.dumps(manifest).encode())
    header = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
    _expect_format_error(tmp_path / "m.pjz", header + blob + data[20 + length :], "dtype")


def test_load_never_unpickles(good: tuple[Path, bytes], tmp_path: Path, monkeypatch) -> None:
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, pt)

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(FormatError, match="not a .pjz file"):
        codec.load(pt)
    path, _ = good
    assert "fc.weight" in codec.load(path)


def test_format_error_is_a_value_error() -> None:
    assert issubclass(FormatError, ValueError)
    assert container.FORMAT_VERSION == 1 and container.MAGIC == b"PJZ\x00"


def test_coding_saving_is_measured_on_the_coded_streams(state: dict) -> None:
    report = codec.report_size(state)
    streams = [
        s
        for r in report.layers
        for s in (r.index_stream, r.weight_stream)
        if s is not None and s.symbols and s.fixed_bits
    ]
    fixed = sum(s.symbols * s.fixed_bits for s in streams)
    coded = sum(8 * s.bytes for s in streams)
    assert report.coding_saving == pytest.approx(1 - coded / fixed)
    assert 0 < report.coding_saving < 1


def test_all_zero_tensor_costs_almost_nothing() -> None:
    report = codec.report_size({"w": torch.zeros(1000, 1000)})
    assert report.layers[0].total_bytes < 32
    assert report.layers[0].nonzero == 0 and report.layers[0].kept == 0.0


def test_manifest_that_does_not_inflate_is_a_format_error(good, tmp_path) -> None:
    _, data = good
    (length,) = struct.unpack_from("<Q", data, 8)
    blob = b'{"format": "pjz"}'  # plain JSON where compressed JSON belongs, with a valid CRC
    header = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
    _expect_format_error(tmp_path / "z.pjz", header + blob + data[20 + length :], "decompress")


def test_a_shape_too_large_for_memory_is_a_format_error(tmp_path: Path) -> None:
    # an all-zero sparse tensor costs a few bytes whatever its shape, so a file may claim
    # a shape of 2**50 elements with valid checksums; loading must refuse, not allocate
    path = tmp_path / "zeros.pjz"
    codec.save({"w": torch.zeros(1000, 1000)}, path, coders=("huffman",))
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data, 8)
    manifest = json.loads(zlib.decompress(data[20 : 20 + length]))
    assert manifest["tensors"][0]["encoding"] == "sparse"
    manifest["tensors"][0]["shape"] = [2**20, 2**20]
    blob = zlib.compress(json.dumps(manifest).encode())
    header = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
    _expect_format_error(tmp_path / "huge.pjz", header + blob + data[20 + length :], "memory")
    # beyond 2**48 elements the manifest itself is refused, before any product is formed
    manifest["tensors"][0]["shape"] = [2**25, 2**25]
    blob = zlib.compress(json.dumps(manifest).encode())
    header = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
    _expect_format_error(tmp_path / "huger.pjz", header + blob + data[20 + length :],
                         "more than 281,474,976,710,656 elements")
