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
