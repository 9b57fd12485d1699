"""A bounded share of the loader fuzzing (`make fuzz` runs 100,000 inputs), and
property-based round trips of the encoders."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import penjing.codec as codec
from penjing.codec import bitpack, huffman, relindex
from penjing.errors import PenjingError

_spec = importlib.util.spec_from_file_location("fuzz_harness",
                                               Path(__file__).with_name("harness.py"))
harness = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_harness"] = harness  # dataclasses look their module up there
_spec.loader.exec_module(harness)

BUDGET_S = 10  # of the ~25 s this file may take in `make test`
SHARES = {"pjz": 0.35, "checkpoint": 0.1, "pruned": 0.1, "quantized": 0.05, "model": 0.15,
          "pjz_model": 0.1, "inspect": 0.07, "recipe": 0.08}


@pytest.fixture(scope="module")
def fuzzer():
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else None))
    return harness.Fuzzer(folder, seed=1)


def test_seeds_load_and_pass_every_rule(fuzzer):
    stats = harness.Stats()
    for kind in harness.KINDS:
        fuzzer.run(kind, fuzzer.seed_bytes(kind), stats)
    assert stats.exceptions == {}
    assert dict(stats.accepted) == dict.fromkeys(harness.KINDS, 1)
    assert set(stats.inputs) == set(SHARES) == set(harness.KINDS)


def test_mutated_files_are_refused_with_penjing_errors_only(fuzzer):
    stats = fuzzer.campaign(5_000, SHARES, seconds=BUDGET_S)
    assert stats.total >= 100
    assert stats.failures == [], [(k, e) for k, e, _ in stats.failures[:10]]
    assert stats.mutator_errors == 0
    # the mutations reach past the checksums: most inputs are refused, some still load
    assert 0 < sum(stats.accepted.values()) < stats.total


def test_the_harness_catches_what_it_should(fuzzer, monkeypatch):
    # a loader that lets a foreign exception through, or changes the model, is counted
    stats = harness.Stats()
    good = fuzzer.seed_bytes("pjz")

    def broken(path, model):
        raise IndexError("index 5 is out of bounds")

    monkeypatch.setitem(harness.LOADERS, "pjz", broken)
    fuzzer.run("pjz", good, stats)

    def meddling(path, model):
        model[0].weight.data.zero_()
        raise PenjingError("refused")

    monkeypatch.setitem(harness.LOADERS, "checkpoint", meddling)
    fuzzer.run("checkpoint", good, stats)
    fuzzer.models["checkpoint"] = harness.mlp()

    # a model file that loads although it was forged, and computes something else
    def forged(path, model):
        other = harness.mlp()
        other[0].bias.data += 1
        return other

    expected = harness._outputs(harness.mlp())
    monkeypatch.setitem(harness.LOADERS, "model", forged)
    fuzzer.must_match = expected
    fuzzer.run("model", good, stats)
    fuzzer.must_match = expected
    monkeypatch.setitem(harness.LOADERS, "model", lambda p, m: harness.mlp())  # as the seed
    fuzzer.run("model", good, stats)
    assert dict(stats.exceptions) == {"IndexError": 1, "model changed": 1,
                                      "forged loaded": 1}


def test_the_new_surfaces_are_reached(fuzzer):
    rng = np.random.default_rng(7)
    recipes = [harness.mutate_recipe(rng, fuzzer.recipes[0]) for _ in range(40)]
    assert any("&b" in r for r in recipes)  # alias and merge-key bombs
    untrusted = sum(not harness.mutate_model(rng, *fuzzer.model_files[2][:2])[1]
                    for _ in range(40))
    assert untrusted > 10  # forged configs are checked against the seed's outputs

    def tensors(data: bytes) -> int:
        try:
            return len(harness._Pjz.parse(data).manifest["tensors"])
        except Exception:  # a mutation that broke the manifest itself
            return 0

    assert max(tensors(harness.mutate_pjz(rng, fuzzer.pjz[0])) for _ in range(60)) >= 100


# ---- property-based round trips ------------------------------------------------------

_symbols = st.lists(st.integers(0, 2**16 - 1), max_size=3000).map(
    lambda xs: np.array(xs, dtype=np.uint16))
_skewed = st.tuples(st.integers(1, 40), st.integers(0, 5000), st.integers(0, 2**31)).map(
    lambda a: np.random.default_rng(a[2]).geometric(1 / a[0], a[1]).clip(0, 65535)
    .astype(np.uint16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(symbols=st.one_of(_symbols, _skewed), chunk=st.integers(1, huffman.MAX_CHUNK),
       max_len=st.integers(16, huffman.MAX_CODE_LEN))
def test_huffman_round_trips(symbols, chunk, max_len):
    assert np.array_equal(huffman.decode(huffman.encode(symbols, chunk=chunk,
                                                        max_len=max_len)), symbols)


@settings(max_examples=60, deadline=None)
@given(codes=st.lists(st.integers(0, 300), max_size=2000), zeros=st.floats(0, 1),
       index_bits=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_relindex_round_trips(codes, zeros, index_bits, seed):
    arr = np.array(codes, dtype=np.uint16)
    arr[np.random.default_rng(seed).random(arr.size) < zeros] = 0
    gaps, values = relindex.encode(arr, index_bits)
    assert gaps.size == np.count_nonzero(arr) + relindex.padding_count(arr, index_bits)
    assert np.array_equal(relindex.decode(gaps, values, arr.size, index_bits), arr)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 64), values=st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_bitpack_round_trips(width, values):
    arr = np.array([v & ((1 << width) - 1) for v in values], dtype=np.uint64)
    data = bitpack.pack_uints(arr, width)
    assert len(data) == bitpack.packed_size(arr.size, width)
    assert np.array_equal(bitpack.unpack_uints(data, arr.size, width), arr)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 12), min_size=0, max_size=4),
       values=st.integers(1, 40), sparsity=st.floats(0, 1), dtype=st.sampled_from(_DTYPES),
       seed=st.integers(0, 2**31))
def test_container_round_trips_bit_exact(tmp_path_factory, shape, values, sparsity, dtype,
                                         seed):
    g = torch.Generator().manual_seed(seed)
    book = torch.randn(values, generator=g).abs() + 0.01  # no -0.0: its sign is not kept
    w = book[torch.randint(0, values, shape, generator=g)]
    w = (w * (torch.rand(shape, generator=g) >= sparsity)).to(dtype)
    path = tmp_path_factory.mktemp("c") / "w.pjz"
    codec.save({"w": w, "i": torch.arange(7)}, path)
    back = codec.load(path)
    assert back["w"].dtype == dtype and back["w"].shape == w.shape
    assert torch.equal(back["w"].view(-1).view(torch.uint8) if w.numel() else back["w"],
                       w.view(-1).view(torch.uint8) if w.numel() else w)
    assert torch.equal(back["i"], torch.arange(7))
