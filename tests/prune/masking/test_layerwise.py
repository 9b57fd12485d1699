"""SparseGPT and Wanda: sparsity exactly as asked (per row, or N:M), lower layer error than
magnitude pruning where the inputs say which weights matter, masks that stay and load."""

from __future__ import annotations

import pytest
import torch
from support_decoders import calib, tiny

import penjing as pj
from penjing.prune import SparseGPTConfig, WandaConfig, prune_
from penjing.prune.masking.layerwise import _keep_mask, sparsegpt_matrix, wanda_scores

transformers = pytest.importorskip("transformers")


def inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose features differ in size by 100×, in no order, as a
    decoder's do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5
    sizes = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    return (torch.randn(tokens, features, generator=g) @ mix) * sizes


def error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - pruned) @ x.t()).square().mean())


def magnitude(w: torch.Tensor, sparsity: float | None, n=None, m=None) -> torch.Tensor:
    return w * _keep_mask(w.abs(), sparsity, n, m)


@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_and_wanda_beat_magnitude_at_the_same_sparsity(amount):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), inputs(512, 128)
    h = (x.t() @ x / len(x)).double()
    sq = x.double().square().sum(dim=0)
    gpt = sparsegpt_matrix(w, h, SparseGPTConfig(**amount, block_size=32))
    wanda = w * _keep_mask(wanda_scores(w, sq), amount.get("sparsity"), amount.get("n"),
                           amount.get("m"))
    mag = magnitude(w, amount.get("sparsity"), amount.get("n"), amount.get("m"))
    for pruned in (gpt, wanda, mag):
        assert int((pruned == 0).sum()) == 64 * 64  # half of every row, exactly
    assert error(w, gpt, x) < 0.5 * error(w, mag, x)
    assert error(w, wanda, x) < 0.8 * error(w, mag, x)
    assert error(w, gpt, x) < error(w, wanda, x)  # the weight update pays


def test_nm_masks_hold_n_of_every_m_and_rows_lose_exactly_their_share():
    torch.manual_seed(2)
    w, x = torch.randn(8, 32), inputs(128, 32)
    nm = sparsegpt_matrix(w, (x.t() @ x).double(), SparseGPTConfig(n=2, m=4, block_size=16))
    assert pj.prune.is_nm(nm, 2, 4)
    rows = sparsegpt_matrix(w, (x.t() @ x).double(), SparseGPTConfig(0.75, block_size=16))
    assert ((rows == 0).sum(dim=1) == 24).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config", [SparseGPTConfig(n=2, m=4), WandaConfig(sparsity=0.5)],
                         ids=["sparsegpt-2:4", "wanda-50%"])
def test_a_decoder_is_pruned_block_by_block_with_masks_that_save_and_load(kind, config,
                                                                         tmp_path):
    model = tiny(kind)
    done = prune_(model, config, calib=calib(6))
    assert done and all(s == pytest.approx(0.5) for s in done.values())
    masked = set(pj.prune.masks(model))
    assert masked == set(done)  # every block Linear (GPT-2's Conv1D too), not the head
    assert not any("lm_head" in n or "wte" in n for n in masked)
    pj.save(model, tmp_path / "m.safetensors")
    loaded = pj.load(tmp_path / "m.safetensors", lambda: tiny(kind))
    ids = calib(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert set(pj.prune.masks(loaded)) == masked


def test_configs_refuse_a_bad_amount_and_prune_asks_for_data():
    with pytest.raises(ValueError, match="give exactly one of sparsity"):
        SparseGPTConfig(sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="give n and m together"):
        WandaConfig(sparsity=None, n=2)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        WandaConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="a multiple of m"):
        SparseGPTConfig(n=2, m=4, block_size=6)
    with pytest.raises(ValueError, match="measures every layer on calibration data"):
        prune_(tiny("llama"), WandaConfig())
