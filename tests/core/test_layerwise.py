"""The block-by-block runner: statistics that equal the inputs each layer saw (computed
once for layers that read one tensor), block methods that see a block's layers together."""

from __future__ import annotations

import pytest
import torch
from support_decoders import calib, tiny

from penjing.core.layerwise import compress_blocks_

pytest.importorskip("transformers")


def test_layers_that_read_one_tensor_get_the_statistics_of_that_tensor():
    model = tiny("llama")
    seen: dict[str, list[torch.Tensor]] = {}
    block = model.model.layers[0]
    names = {"q_proj": block.self_attn.q_proj, "k_proj": block.self_attn.k_proj,
             "o_proj": block.self_attn.o_proj, "down_proj": block.mlp.down_proj}
    handles = [m.register_forward_pre_hook(
        lambda m, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, m.in_features)))
        for n, m in names.items()]
    got = {}

    def keep(chosen, stats, _run):
        got.update(stats)
        return {name: None for name in chosen}

    batches = calib(3)
    with torch.no_grad():  # what each layer of block 0 sees on the calibration batches
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    done = compress_blocks_(model, batches, block_method=keep)
    assert len(done) == 2 * 7
    for short in names:
        x = torch.cat(seen[short]).double()
        stats = got[f"model.layers.0.{'mlp' if short == 'down_proj' else 'self_attn'}.{short}"]
        assert stats.tokens == x.shape[0]
        torch.testing.assert_close(stats.hessian, x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.sq_norms, x.square().sum(0), rtol=1e-5, atol=1e-7)
    q = got["model.layers.0.self_attn.q_proj"]
    v = got["model.layers.0.self_attn.v_proj"]
    assert torch.equal(q.hessian, v.hessian) and q.hessian is not v.hessian


def test_a_runner_takes_one_method_or_the_other():
    with pytest.raises(TypeError, match="either method or block_method"):
        compress_blocks_(tiny("llama"), calib(1))


def test_a_transformers_model_of_unknown_layout_is_one_block_and_the_user_is_told(
        monkeypatch):
    from penjing.errors import PenjingWarning

    monkeypatch.setattr("penjing.core.layerwise.BLOCK_PATHS", ())  # a layout it does not know
    seen = []

    def count(chosen, stats, _run):
        seen.append(len(chosen))
        return dict.fromkeys(chosen)

    with pytest.warns(PenjingWarning, match="no list of blocks found in LlamaForCausalLM"):
        compress_blocks_(tiny("llama"), calib(1), block_method=count)
    assert seen == [2 * 7 + 1]  # every Linear at once, the head included
