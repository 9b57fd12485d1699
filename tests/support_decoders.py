"""Tiny transformers decoders built from configs (nothing downloaded), token batches and
correlated inputs, shared by the layer-wise method tests (GPTQ, AWQ, SparseGPT, Wanda)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def tiny(kind: str) -> nn.Module:
    """A two-block decoder of the given family, seeded, in eval mode."""
    import transformers as t

    torch.manual_seed(0)
    small = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4}
    configs = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, num_key_value_heads=2)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**small, num_key_value_heads=2)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                       n_head=4, n_positions=64)),
    }
    return configs[kind]().eval()


def calib(n: int = 8, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of 2 random token sequences."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=g) for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and of very different sizes, as a decoder's
    are (the case GPTQ's error correction and AWQ's scales are for)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5
    scales = torch.logspace(-1, 1, features)
    return (torch.randn(tokens, features, generator=g) @ mix) * scales
