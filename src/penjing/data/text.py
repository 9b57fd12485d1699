"""Text for language-model benchmarks: Wikipedia articles from the gensim wheel, token
windows, and perplexity with a bootstrap interval.

Nothing is fetched at run time: the articles are the shortened English Wikipedia dump that
gensim ships for its own tests. gensim is optional and imported only when articles are asked for.
"""

from __future__ import annotations

import bz2
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from penjing.core.modes import eval_mode
from penjing.errors import MissingDependencyError

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_INSTALL = "pip install gensim==4.4.0"
SPLITS = ("calib", "eval", "all")
CALIB_EVERY = 4  # articles 0, 4, 8, ... in file order calibrate; fixed: it sets every figure
BOOTSTRAP_SEED = 20240229  # fixed, so the same windows always give the same interval
BOOTSTRAP_RESAMPLES = 1000

_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)  # ==History== -> History
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'', '''bold''' quote runs that filter_wiki keeps
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Perplexity:
    """A perplexity, exp(mean token NLL), with a 95 % bootstrap interval over windows."""

    value: float
    low: float  # 2.5th percentile of exp(mean NLL) over window resamples
    high: float  # 97.5th percentile
    windows: int  # how many windows it was measured on: the interval narrows with more
    # each window's mean NLL, for paired comparisons on the same windows (perplexity_ratio)
    window_nll: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] over {self.windows} windows"


def _wiki_dump():
    """The dump file inside the installed gensim package, or an error saying what to install."""
    try:
        import gensim
    except ImportError as err:
        raise MissingDependencyError(
            "Wikipedia articles come from the gensim wheel, and gensim is not installed; "
            f"install it with `{GENSIM_INSTALL}`"
        ) from err
    dump = resources.files(gensim).joinpath(WIKI_DUMP)
    if not dump.is_file():
        raise FileNotFoundError(
            f"the gensim package has no {WIKI_DUMP} (some distributions strip gensim's test "
            f"data); install the PyPI wheel with `{GENSIM_INSTALL}`"
        )
    return dump


def _plain_text(markup: str) -> str:
    """An article's text without wiki markup: gensim's filter_wiki, then the headings,
    bold/italic quotes and blank-line runs that it leaves behind."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = _EMPHASIS.sub("", _HEADING.sub(r"\1", filter_wiki(markup)))
    text = "\n".join(line.strip() for line in text.splitlines())
    return _BLANK_RUN.sub("\n\n", text).strip()


def _is_redirect(markup: str) -> bool:
    return markup.lstrip().lower().startswith("#redirect")


@lru_cache(maxsize=1)
def _parse(dump) -> tuple[str, ...]:
    # Parsing takes seconds (mostly filter_wiki's regular expressions); the tuple is immutable.
    from gensim.corpora.wikicorpus import extract_pages

    with dump.open("rb") as raw, bz2.open(raw) as xml:
        pages = [text for _, text, _ in extract_pages(xml, filter_namespaces=("0",))]
    texts = (_plain_text(markup) for markup in pages if markup.strip() and not _is_redirect(markup))
    return tuple(text for text in texts if text)


def wiki_articles(split: str = "eval") -> list[str]:
    """Plain text of the English Wikipedia articles shipped in gensim's wheel, one per item.

    The 206 pages of gensim 4.4.0's shortened dump, less redirects and empty pages, leave 106
    articles in file order. The split is fixed: every 4th article (indices 0, 4, 8, ...) is
    ``"calib"`` (27 articles, for calibrating quantizers), the rest is ``"eval"`` (79, held
    out for perplexity), and ``"all"`` is all of them. Markup is stripped with gensim's
    ``filter_wiki``; a little residue stays (image sizes such as "20px", gallery captions).

    >>> text = "\\n\\n".join(wiki_articles("eval"))  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    articles = _parse(_wiki_dump())
    if split == "all":
        return list(articles)
    calib = split == "calib"
    return [text for i, text in enumerate(articles) if (i % CALIB_EVERY == 0) == calib]


def lm_windows(
    token_ids: torch.Tensor | list[int], length: int, *, count: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens, shape (n, length), dtype long, from a 1-D
    sequence of token ids; the last partial window is dropped, `count` keeps the first ones.

    >>> lm_windows([1, 2, 3, 4, 5], 2).tolist()
    [[1, 2], [3, 4]]
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 (a window predicts its tokens 1..length-1), "
                         f"got {length}")
    if isinstance(token_ids, torch.Tensor) and (
        token_ids.is_floating_point() or token_ids.is_complex()
    ):
        raise TypeError(f"token_ids must be integers, got a {token_ids.dtype} tensor")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}; flatten it first")
    available = ids.numel() // length
    if available == 0:
        raise ValueError(f"a window needs {length} tokens, got a sequence of {ids.numel()}; "
                         "give more text or a shorter length")
    if count is not None and not 1 <= count <= available:
        raise ValueError(f"count must be in [1, {available}] (the sequence of {ids.numel()} "
                         f"tokens holds {available} windows of {length}), got {count}")
    n = available if count is None else count
    # clone: the windows must not share memory with the caller's tensor
    return ids[: n * length].reshape(n, length).clone()


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean negative log-likelihood of each window's tokens 1..L-1, float64, shape (n,)."""
    device, means = _device(model), []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        output = model(input_ids=batch)
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != batch.shape:
            raise TypeError(
                "model(input_ids=...) must return an output with .logits shaped (batch, length, "
                f"vocab) like a Hugging Face causal LM, got {type(output).__name__}"
            )
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                              reduction="none")
        means.append(nll.view(batch.shape[0], -1).double().mean(dim=1).cpu())
    return torch.cat(means)


def _bootstrap(window_nll: torch.Tensor) -> tuple[float, float]:
    """95 % interval of exp(mean NLL) over resamples of the windows, from a fixed seed."""
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    n = window_nll.numel()
    picks = torch.randint(n, (BOOTSTRAP_RESAMPLES, n), generator=generator)
    means = window_nll[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    return math.exp(low.item()), math.exp(high.item())


def perplexity_ratio(a: Perplexity, b: Perplexity) -> tuple[float, float, float]:
    """(a / b, low, high): the ratio of two perplexities measured on the same windows, with
    a 95 % paired bootstrap interval (the same windows resampled for both). Much narrower
    than the two intervals side by side, since most of their width is which text was
    picked, shared by both: an interval that excludes 1 says which model is better.

    >>> ratio, low, high = perplexity_ratio(gptq_ppl, nearest_ppl)  # doctest: +SKIP
    """
    if not a.window_nll or len(a.window_nll) != len(b.window_nll):
        raise ValueError(f"a paired ratio needs both perplexities measured by perplexity() on "
                         f"the same windows, got {len(a.window_nll)} and {len(b.window_nll)} "
                         "per-window losses")
    diff = torch.tensor(a.window_nll, dtype=torch.float64) - torch.tensor(
        b.window_nll, dtype=torch.float64)
    low, high = _bootstrap(diff)
    return math.exp(diff.mean().item()), low, high




@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> Perplexity:
    """Perplexity of a causal LM over token windows: exp(mean NLL over every predicted token).

    Each window of length L predicts its tokens 1..L-1 from their prefixes, so n windows
    score n·(L-1) tokens; all windows have the same length, so the mean over tokens is the
    mean of the per-window means. `low`/`high` is a 95 % percentile bootstrap over windows
    (1000 resamples, fixed seed) of exp(mean NLL): it shows how much the figure depends on
    which text was picked, not the model's own randomness. The model runs in eval mode
    (its mode is restored after) and is called as ``model(input_ids=...)``, reading ``.logits``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError("windows must be shaped (n >= 1, length >= 2), got "
                         f"{tuple(windows.shape)}; make them with lm_windows()")
    if windows.dtype != torch.long:
        raise TypeError(f"windows must hold token ids as torch.long, got {windows.dtype}")
    with eval_mode(model):
        window_nll = _window_nll(model, windows, batch_size)
    low, high = _bootstrap(window_nll)
    return Perplexity(math.exp(window_nll.mean().item()), low, high, windows.shape[0],
                      tuple(window_nll.tolist()))
