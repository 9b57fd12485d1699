"""Model inputs as penjing passes them on: one tensor, a tuple of positional tensors, or a
dict of keyword tensors (`{"input_ids": ..., "attention_mask": ...}`), the same shape
everywhere a model is called (calibration, export, ONNX Runtime comparison).

A batch from a loader is either the inputs alone or `(inputs, labels, ...)`, where the
inputs are again one of the three forms: `((input_ids, attention_mask), labels)`. A dict
batch is always keyword inputs, never (inputs, labels).

>>> out = call(model, {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from penjing.errors import PenjingWarning

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def split(inputs: Inputs, what: str = "model inputs") -> tuple[tuple, dict[str, Any]]:
    """(positional args, keyword args) for `model(*args, **kwargs)`; `what` names the
    argument in the error for anything else."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what}: dict keys must be argument names (str), got {bad[:3]}")
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str) and inputs:
        return tuple(inputs), {}
    raise TypeError(
        f"{what} must be a tensor, a non-empty tuple of tensors or a dict of keyword "
        f"tensors, got {type(inputs).__name__}"
    )


def call(model: nn.Module, inputs: Inputs):
    """`model` run on `inputs` (a tensor, a tuple of positional tensors or a dict of
    keyword tensors)."""
    args, kwargs = split(inputs)
    if kwargs:
        _check_keywords(model, kwargs)
    _check_length(model, kwargs.get("input_ids", args[0] if args else None))
    return model(*args, **kwargs)


def _check_length(model: nn.Module, ids: object) -> None:
    """A clear error for token ids longer than a transformers model's position table."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    if (isinstance(limit, int) and isinstance(ids, torch.Tensor) and ids.dim() == 2
            and not ids.is_floating_point() and ids.shape[1] > limit):
        raise ValueError(
            f"input_ids hold {ids.shape[1]} tokens, more than the {limit} positions "
            f"{type(model).__name__} has (config.max_position_embeddings); truncate the text, "
            f"e.g. tokenizer(..., truncation=True, max_length={limit})"
        )


def _check_keywords(model: nn.Module, kwargs: dict) -> None:
    """A clear error for keyword inputs that `model.forward` does not take."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise TypeError(
            f"{type(model).__name__}.forward takes ({', '.join(params)}), got keyword "
            f"input(s) {unknown}; name the dict's keys after forward's arguments"
        )


def from_batch(batch: object, model: nn.Module | None = None) -> Inputs:
    """The model inputs of a loader batch: a tensor or dict as is, `batch[0]` of a tuple
    or list (inputs, labels, ...). When the second element looks like an attention mask
    (same shape as token ids) of a model that takes one, warn: it is read as labels and
    the model runs without it."""
    if isinstance(batch, torch.Tensor | Mapping):
        return batch
    if isinstance(batch, list | tuple) and batch:
        if len(batch) >= 2 and model is not None and _looks_like_mask(batch[0], batch[1], model):
            warnings.warn(
                f"the batch ({type(batch).__name__} of {len(batch)} tensors) is read as "
                "(inputs, labels), so its second tensor, shaped like an attention mask, is "
                f"not given to {type(model).__name__}; yield a dict "
                "{'input_ids': ..., 'attention_mask': ...} or ((input_ids, mask), labels)",
                PenjingWarning, stacklevel=3)
        return batch[0]
    raise TypeError(
        "a batch must be a tensor, a dict of keyword tensors or (inputs, labels), got "
        f"{type(batch).__name__}"
    )


def labelled(batch: object) -> tuple[Inputs, torch.Tensor]:
    """(inputs, labels) of an evaluation batch: `(inputs, labels, ...)`, or a dict whose
    "labels" entry is the labels and whose other entries are keyword inputs (the
    Hugging Face convention)."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(f"a dict batch needs a 'labels' entry to score against, got keys "
                            f"{sorted(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("an evaluation batch must be (inputs, labels) or a dict with 'labels', "
                    f"got {type(batch).__name__}")


def _looks_like_mask(first: object, second: object, model: nn.Module) -> bool:
    import inspect

    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return False
    if first.dim() < 2 or first.shape != second.shape or first.is_floating_point():
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params


def first_tensor(output: object) -> torch.Tensor:
    """The first tensor of a model's output: the tensor itself, the first of a tuple, or
    the first field of a dict / Hugging Face ModelOutput (`last_hidden_state`, `logits`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = [v for v in output.values() if v is not None]
    if isinstance(output, list | tuple) and output:
        return first_tensor(output[0])
    raise TypeError(f"the model returned {type(output).__name__}, not a tensor")


def flat_outputs(output: object) -> list[torch.Tensor]:
    """Every tensor a model returns, in order, as the ONNX exporter flattens them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = [v for v in output.values() if v is not None]
    if isinstance(output, list | tuple):
        return [t for v in output for t in flat_outputs(v)]
    return []


def output_names(output: object) -> list[str]:
    """Names for a model's flattened outputs: the dict / ModelOutput field names where it
    returns one, else `output` / `output0`, `output1`, ..."""
    if isinstance(output, Mapping):
        names = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        if len(names) == len(flat_outputs(output)):
            return names
    n = len(flat_outputs(output))
    return ["output"] if n == 1 else [f"output{i}" for i in range(n)]
