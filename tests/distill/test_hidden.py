"""Hidden-state distillation of an encoder on unlabelled dict batches: the losses read
only the tokens the mask keeps, and a short pass brings a pruned student closer to its
teacher."""

from __future__ import annotations

import copy

import pytest
import torch

import penjing as pj
from penjing.distill import HIDDEN_LOSSES, distill_hidden_, hidden_loss, mean_pool

transformers = pytest.importorskip("transformers")


def _bert(hidden: int = 32):
    # weights large enough that heads and neurons matter (at BERT's 0.02 the residual
    # stream hides them), no dropout so a few steps show
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=hidden, intermediate_size=64, max_position_embeddings=64,
        num_hidden_layers=2, num_attention_heads=4, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:3, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_losses_leave_padding_out():
    a = torch.randn(2, 5, 4)
    b = a.clone()
    b[0, 3:] += 10  # only padding differs
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for name, loss in HIDDEN_LOSSES.items():
        assert float(loss(a, b, mask)) == pytest.approx(0, abs=1e-6), name
        assert float(loss(a, b, None)) > 0.01, name
    torch.testing.assert_close(mean_pool(a, mask)[0], a[0, :3].mean(0))


def test_a_short_pass_brings_a_pruned_student_closer_to_its_teacher():
    teacher = _bert()
    student = copy.deepcopy(teacher)
    train, held = _batches(8), _batches(2, seed=1)
    pj.prune.hf_heads_(student, 0.5, criterion="activation", loader=train)
    pj.prune.hf_ffn_(student, 0.5, criterion="activation", loader=train)
    before = {name: hidden_loss(teacher, student, held, name) for name in HIDDEN_LOSSES}
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # it runs in eval mode and comes back in the mode it had
    result = distill_hidden_(teacher, student, train, loss="token_mse", epochs=4, lr=1e-3,
                             progress=False)
    assert len(result.loss) == 4 and result.loss[-1] < result.loss[0]
    after = {name: hidden_loss(teacher, student, held, name) for name in HIDDEN_LOSSES}
    assert after["token_mse"] < 0.6 * before["token_mse"], (before, after)
    assert after["cosine"] < before["cosine"], (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in weights.items())
    assert teacher.training


def test_bad_pairs_and_losses_are_clear_errors():
    teacher = _bert()
    with pytest.raises(ValueError, match="teacher and student are the same module"):
        distill_hidden_(teacher, teacher, _batches(1), progress=False)
    with pytest.raises(ValueError, match="unknown hidden-state loss 'kl'; choose one of"):
        distill_hidden_(teacher, copy.deepcopy(teacher), _batches(1), loss="kl", progress=False)
    with pytest.raises(ValueError, match=r"student's output has shape \(8, 12, 64\), the "
                                         r"teacher's \(8, 12, 32\)"):
        distill_hidden_(teacher, _bert(hidden=64), _batches(1), progress=False)
    with pytest.raises(ValueError, match="the loader gave no batches"):
        hidden_loss(teacher, copy.deepcopy(teacher), [])
