from __future__ import annotations

import builtins
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import penjing as pj
from penjing.errors import MissingDependencyError

VOCAB = 64


def tiny_llama(attention_dropout: float = 0.0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=attention_dropout,
    )
    return transformers.LlamaForCausalLM(config)


class Oracle(nn.Module):
    """Knows the windows and puts a huge logit on each true next token."""

    def __init__(self, windows: torch.Tensor):
        super().__init__()
        self.windows = windows

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        rows = [int(torch.nonzero((self.windows == r).all(dim=1))[0]) for r in input_ids]
        upcoming = torch.roll(self.windows[rows], shifts=-1, dims=1)  # last position: don't care
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(2, upcoming.unsqueeze(-1), 1e4)
        return SimpleNamespace(logits=logits)


class Uniform(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def random_windows(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# lm_windows


def test_windows_are_consecutive_and_drop_the_partial_tail():
    windows = pj.data.lm_windows(list(range(11)), 3)
    assert windows.dtype == torch.long
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_windows_count_keeps_the_first_ones():
    windows = pj.data.lm_windows(torch.arange(100, 120, dtype=torch.int32), 4, count=2)
    assert windows.dtype == torch.long
    assert windows.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107]]


def test_windows_do_not_share_memory_with_the_input():
    ids = torch.arange(8)
    windows = pj.data.lm_windows(ids, 4)
    windows.zero_()
    assert ids.tolist() == list(range(8))


def test_a_sequence_of_exactly_one_window():
    assert pj.data.lm_windows([5, 6], 2).tolist() == [[5, 6]]


@pytest.mark.parametrize(("ids", "length", "count", "match"), [
    (list(range(10)), 1, None, "length must be >= 2 .* got 1"),
    (list(range(3)), 4, None, "a window needs 4 tokens, got a sequence of 3"),
    ([], 2, None, "a window needs 2 tokens, got a sequence of 0"),
    (list(range(10)), 3, 4, r"count must be in \[1, 3\] .* got 4"),
    (list(range(10)), 3, 0, r"count must be in \[1, 3\] .* got 0"),
    (torch.zeros(2, 8, dtype=torch.long), 2, None, r"must be 1-D, got shape \(2, 8\)"),
])
def test_windows_reject_bad_input(ids, length, count, match):
    with pytest.raises(ValueError, match=match):
        pj.data.lm_windows(ids, length, count=count)


def test_windows_reject_float_ids():
    with pytest.raises(TypeError, match="must be integers, got a torch.float32"):
        pj.data.lm_windows(torch.arange(8.0), 2)


# perplexity


def test_perplexity_matches_cross_entropy_over_all_predicted_tokens():
    model, windows = tiny_llama().eval(), random_windows(5, 12)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    # batch_size 2 over 5 windows: the last batch is short
    result = pj.data.perplexity(model, windows, batch_size=2)
    assert result.value == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert result.windows == 5
    assert result.low < result.value < result.high


def test_perplexity_runs_in_eval_mode_and_restores_the_mode():
    # with dropout on, a train-mode forward would not match the eval-mode reference
    model, windows = tiny_llama(attention_dropout=0.5), random_windows(3, 10)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                        windows[:, 1:].reshape(-1)).item())
    model.train()
    assert pj.data.perplexity(model, windows).value == pytest.approx(expected, rel=1e-5)
    assert model.training
    model.eval()
    pj.data.perplexity(model, windows)
    assert not model.training


def test_perfect_predictor_has_perplexity_one():
    windows = random_windows(6, 9)
    result = pj.data.perplexity(Oracle(windows), windows, batch_size=4)
    assert result.value == pytest.approx(1.0, abs=1e-6)
    assert result.low == pytest.approx(1.0, abs=1e-6)
    assert result.high == pytest.approx(1.0, abs=1e-6)


def test_uniform_predictor_has_perplexity_vocab_size():
    result = pj.data.perplexity(Uniform(), random_windows(4, 7))
    assert result.value == pytest.approx(VOCAB, rel=1e-6)
    assert result.low == pytest.approx(VOCAB, rel=1e-6)
    assert result.high == pytest.approx(VOCAB, rel=1e-6)


def test_bootstrap_interval_is_the_same_every_call():
    model, windows = tiny_llama(), random_windows(8, 6)
    first, again = pj.data.perplexity(model, windows), pj.data.perplexity(model, windows)
    assert first == again
    assert "over 8 windows" in str(first)


def test_a_paired_ratio_is_narrower_than_the_two_intervals_and_exact_for_a_shift():
    model, windows = tiny_llama(), random_windows(12, 10)
    a = pj.data.perplexity(model, windows)
    assert pj.data.perplexity_ratio(a, a) == (1.0, 1.0, 1.0)
    # b: every window's NLL 0.05 higher than a's, yet the windows spread a lot
    shifted = tuple(v + 0.05 for v in a.window_nll)
    b = pj.data.Perplexity(a.value * math.exp(0.05), a.low, a.high, a.windows, shifted)
    ratio, low, high = pj.data.perplexity_ratio(b, a)
    assert ratio == pytest.approx(math.exp(0.05)) and low == pytest.approx(ratio)
    assert high == pytest.approx(ratio)
    assert a.high > b.low  # side by side, the two intervals overlap: no verdict
    with pytest.raises(ValueError, match="measured by perplexity\\(\\) on the same windows"):
        pj.data.perplexity_ratio(a, pj.data.perplexity(model, windows[:5]))


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError, match=r"shaped \(n >= 1, length >= 2\), got \(7,\)"):
        pj.data.perplexity(Uniform(), torch.arange(7))
    with pytest.raises(ValueError, match=r"got \(3, 1\)"):
        pj.data.perplexity(Uniform(), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="as torch.long, got torch.float32"):
        pj.data.perplexity(Uniform(), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pj.data.perplexity(Uniform(), random_windows(2, 4), batch_size=0)


def test_perplexity_needs_logits():
    class Bare(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, VOCAB)

    with pytest.raises(TypeError, match="must return an output with .logits"):
        pj.data.perplexity(Bare(), random_windows(2, 4))


# wiki_articles


@pytest.fixture(scope="module")
def articles() -> dict[str, list[str]]:
    pytest.importorskip("gensim")
    return {split: pj.data.wiki_articles(split) for split in ("all", "calib", "eval")}


def test_wiki_splits_are_disjoint_and_cover_all(articles):
    everything, calib, held_out = articles["all"], articles["calib"], articles["eval"]
    assert calib and held_out
    assert not set(calib) & set(held_out)
    assert calib == everything[::4]
    assert held_out == [a for i, a in enumerate(everything) if i % 4]


def test_wiki_split_is_the_same_every_call(articles):
    again = pj.data.wiki_articles("eval")
    assert again == articles["eval"]
    again.clear()  # the caller's list is theirs: the cache must not change
    assert pj.data.wiki_articles("eval") == articles["eval"]


def test_wiki_articles_are_plain_text(articles):
    assert all(text and text == text.strip() for text in articles["all"])
    for markup in ("[[", "]]", "{{", "}}", "<ref", "''", "==", "#REDIRECT", "\n\n\n"):
        assert not any(markup in text for text in articles["all"]), markup
    assert articles["all"][0].startswith("Anarchism is a political philosophy")


def test_wiki_split_must_be_known():
    with pytest.raises(ValueError, match=r"split must be one of .* got 'test'"):
        pj.data.wiki_articles("test")


def test_wiki_without_gensim_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("gensim"):
            raise ImportError("No module named 'gensim'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match=r"pip install gensim==4\.4\.0"):
        pj.data.wiki_articles("eval")
