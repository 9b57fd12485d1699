"""penjing.save / penjing.load: one file that rebuilds what was done to a model."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.legacy import TinyRes, trained  # TinyRes: a user's CNN, nothing of ours
from safetensors.torch import load_file, save_file
from torch import nn

import penjing as pj
from penjing.core.checkpoint import checkpoint_digest
from penjing.errors import FormatError, UnsupportedLayerError

X = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))


MNIST = (1, 28, 28)


def same(a: nn.Module, b: nn.Module, x: torch.Tensor = X) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_channels_removed_come_back(tmp_path):
    pruned = pj.prune.channels(trained(TinyRes()), X[:1], ratio=0.5)
    size = pj.save(pruned, tmp_path / "m.safetensors", metadata={"model": "tinyres"})
    assert size == (tmp_path / "m.safetensors").stat().st_size
    fresh = TinyRes()
    loaded = pj.load(tmp_path / "m.safetensors", fresh)
    assert loaded is not fresh and fresh.body[0].out_channels == 32  # the argument untouched
    assert loaded.body[0].out_channels == pruned.body[0].out_channels < 32
    assert same(pruned, loaded)
    # and a chain: the loaded model pruned again, saved and loaded again
    again = pj.prune.channels(loaded, X[:1], ratio=0.5)
    pj.save(again, tmp_path / "m2.safetensors")
    assert same(again, pj.load(tmp_path / "m2.safetensors", TinyRes))


def test_live_masks_and_shared_weights_stay_live(tmp_path):
    model = trained(pj.models.create("lenet300"), MNIST)
    pj.prune.magnitude_(model, sparsity=0.8)
    pj.save(model, tmp_path / "masked.safetensors")
    masked = pj.load(tmp_path / "masked.safetensors", pj.models.create("lenet300"))
    assert set(pj.prune.masks(masked)) == {"fc1", "fc2", "fc3"}
    assert all(torch.equal(pj.prune.masks(masked)[k], v) for k, v in pj.prune.masks(model).items())
    x = X.new_zeros(4, 1, 28, 28).normal_()
    assert same(model, masked, x)
    # masks are stored as booleans, not a second float copy of every weight
    stored = load_file(tmp_path / "masked.safetensors")
    assert stored["fc1.parametrizations.weight.0.mask"].dtype == torch.bool
    # a fine-tune of the loaded model keeps its zeros
    pj.train.fit(masked, [(x, torch.arange(4))], epochs=2, progress=False)
    assert float((masked.fc1.weight == 0).float().mean()) >= 0.8

    pj.quant.kmeans_(model, bits=3)
    pj.save(model, tmp_path / "shared.safetensors")
    shared = pj.load(tmp_path / "shared.safetensors", pj.models.create("lenet300"))
    assert pj.quant.get_shared(shared.fc1) is not None
    assert same(model, shared, x)
    assert int(shared.fc1.weight.unique().numel()) <= 2**3
    assert load_file(tmp_path / "shared.safetensors")[
        "fc1.parametrizations.weight.0.codes"].dtype == torch.uint8


def test_quantized_models_come_back_with_integer_weights(tmp_path):
    model = trained(TinyRes())
    pruned = pj.prune.channels(model, X[:1], ratio=0.25)
    q = pj.quant.ptq(pruned, [X], pj.quant.int8())
    pj.save(q, tmp_path / "q.safetensors")
    stored = load_file(tmp_path / "q.safetensors")
    assert any(k.endswith(".int") and v.dtype == torch.int8 for k, v in stored.items())
    loaded = pj.load(tmp_path / "q.safetensors", TinyRes)
    assert same(q, loaded)

    weights4 = pj.quant.ptq(model, None, pj.quant.weight_only(bits=4, group_size=8))
    pj.save(weights4, tmp_path / "w4.safetensors")
    assert any(k.endswith(".int4") for k in load_file(tmp_path / "w4.safetensors"))
    assert same(weights4, pj.load(tmp_path / "w4.safetensors", TinyRes))


def test_heads_and_compaction_replay(tmp_path):
    encoder = trained(pj.models.create("encoder"), MNIST)
    x = torch.randn(2, *MNIST)
    pj.prune.heads_(encoder, 0.5)
    pj.save(encoder, tmp_path / "heads.safetensors")
    assert same(encoder, pj.load(tmp_path / "heads.safetensors", pj.models.create("encoder")), x)

    vgg = trained(pj.models.create("vgg"), MNIST)
    pj.prune.pattern_(vgg, "stripe", sparsity=0.6)
    pj.finalize_(vgg)
    done = pj.prune.compact_(vgg)
    assert done
    pj.save(vgg, tmp_path / "compact.safetensors")
    x = torch.randn(2, 1, 28, 28)
    loaded = pj.load(tmp_path / "compact.safetensors", pj.models.create("vgg"))
    compacted = {n for n, m in loaded.named_modules()
                 if type(m).__name__ in ("StripeConv2d", "ShapeConv2d")}
    assert compacted == set(done)
    assert same(vgg, loaded, x)


def test_older_formats_load_through_the_same_entry(tmp_path):
    model = trained(TinyRes())
    pj.train.save_checkpoint(model, tmp_path / "plain.safetensors")
    assert same(model, pj.load(tmp_path / "plain.safetensors", TinyRes))

    small = pj.models.create("resnet20")
    changes = pj.prune.channels_(small, torch.randn(1, 1, 28, 28), ratio=0.5)
    pj.prune.save_pruned(small, changes, tmp_path / "pruned.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert same(small, pj.load(tmp_path / "pruned.safetensors",
                               lambda: pj.models.create("resnet20")), x)

    config = pj.quant.int8()
    q = pj.quant.ptq(model, [X], config)
    pj.quant.save_quantized(q, config, tmp_path / "old-q.safetensors")
    assert same(q, pj.load(tmp_path / "old-q.safetensors", TinyRes))

    pj.codec.save(small, tmp_path / "pruned.pjz")  # the .pjz records the pruned structure
    assert same(small, pj.load(tmp_path / "pruned.pjz", lambda: pj.models.create("resnet20")), x)

    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert same(model, pj.load(tmp_path / "ckpt.pt", TinyRes))


def test_codec_save_of_live_parametrizations_loads_into_a_fresh_model(tmp_path):
    model = trained(pj.models.create("lenet300"), MNIST)
    pj.prune.magnitude_(model, sparsity=0.9)
    pj.quant.kmeans_(model, bits=4)
    pj.codec.save(model, tmp_path / "m.pjz")
    state = pj.codec.load(tmp_path / "m.pjz")
    assert set(state) == set(pj.models.create("lenet300").state_dict())
    assert same(model, pj.load(tmp_path / "m.pjz", pj.models.create("lenet300")),
                torch.randn(2, 1, 28, 28))


def test_bad_files_and_models_are_clear_errors(tmp_path):
    pruned = pj.prune.channels(trained(TinyRes()), X[:1], ratio=0.5)
    path = tmp_path / "m.safetensors"
    pj.save(pruned, path)
    with pytest.raises(FormatError, match="saved from another architecture"):
        pj.load(path, lambda: pj.models.create("lenet5"))

    # a forged history that would index past a tensor is refused, nothing applied
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    steps = json.loads(meta["penjing.history"])
    steps[0]["changes"][0][3] = [0, 1, 10_000]
    meta["penjing.history"] = json.dumps(steps)
    meta["penjing.sha256"] = checkpoint_digest(tensors, meta)  # a forger recomputes it
    save_file(tensors, tmp_path / "forged.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="does not fit"):
        pj.load(tmp_path / "forged.safetensors", TinyRes)
    meta["penjing.history"] = '[{"op": "rm -rf"}]'
    meta["penjing.sha256"] = checkpoint_digest(tensors, meta)
    save_file(tensors, tmp_path / "unknown.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="history cannot be read"):
        pj.load(tmp_path / "unknown.safetensors", TinyRes)

    # a pickle that is not a plain state dict never runs
    class Boom:
        def __reduce__(self):
            return (print, ("pickle ran",))

    torch.save({"model": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights_only"):
        pj.load(tmp_path / "evil.pt", TinyRes)

    with pytest.raises(FileNotFoundError):
        pj.load(tmp_path / "missing.safetensors", TinyRes)
    with pytest.raises(ValueError, match="penjing.codec.save"):
        pj.save(pruned, tmp_path / "m.pjz")

    class Scaled(nn.Module):
        def forward(self, w):
            return 2 * w

    odd = TinyRes()
    torch.nn.utils.parametrize.register_parametrization(odd.head, "weight", Scaled())
    with pytest.raises(UnsupportedLayerError, match="finalize_"):
        pj.save(odd, tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()


def test_a_tied_embedding_and_head_are_stored_once_and_stay_tied(tmp_path):
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()

    model = build()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)  # not what a fresh build holds
    path = tmp_path / "tied.safetensors"
    size = pj.save(model, path)
    assert size < 1.1 * 512 * 32 * 4 + 4 * sum(  # the table once, plus the other weights
        p.numel() for n, p in model.named_parameters() if "embed" not in n)
    loaded = pj.load(path, build)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
