"""Hugging Face `transformers` models in penjing: how to recognise one.

transformers is optional: nothing here imports it, a model is recognised by its class.
"""

from __future__ import annotations

from torch import nn


def is_hf(model: nn.Module) -> bool:
    """Whether `model` is a `transformers` PreTrainedModel (by its classes, without
    importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2's layers): y = x @ W + b with W of
    shape (in, out), a Linear with its weight transposed. A parametrized one (masked,
    shared) counts too: torch gives it a subclass of its own."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)
