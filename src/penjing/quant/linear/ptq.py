"""Post-training quantization and quantization-aware training: one config, three verbs.

- `weights_in_place_(model, config)`: weight fake quantization in place (weight-only
  INT8/INT4; `penjing.quant.quantize_` runs it for a QuantConfig without activations).
- `ptq(model, calib_loader, config)`: fold BatchNorm, insert activation quantizers,
  calibrate, freeze. Returns a quantized copy; the input model is left as it was.
- `qat(model, train_loader, config, epochs=...)`: the same copy, trained with fake
  quantization in the loop (straight-through estimator; LSQ scales when learnable).
- `ptq_guarded(model, calib_loader, config, evaluate=..., max_drop=...)`: PTQ that keeps
  the metric within `max_drop` of the float model's by leaving the most sensitive layers
  in float, one at a time (`ptq(..., max_drop=, evaluate=)` returns just the model).
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing import distributed, inputs
from penjing.core import history
from penjing.core.steps import Step
from penjing.errors import AccuracyGuardError, PenjingWarning
from penjing.hf import is_hf
from penjing.quant.linear import eager
from penjing.quant.linear.checkpoint import (
    check_calibrated,
    config_from_dict,
    config_to_dict,
    integer_state,
    restore_state,
)
from penjing.quant.linear.config import QuantConfig, resolve_filter, select
from penjing.quant.linear.fakequant import ActQuant, WeightQuant, get_weight_quant
from penjing.quant.linear.fold import fold_bn_
from penjing.quant.linear.graph import insert_quantizers, layer_order, trace
from penjing.quant.linear.weights import quantize_weights_
from penjing.train import fit


def _check_config(config: QuantConfig) -> None:
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a penjing.quant.QuantConfig (e.g. pj.quant.int8()), got "
            f"{type(config).__name__}"
        )


def weights_in_place_(model: nn.Module, config: QuantConfig, qat: bool,
                      order: list[str] | None = None) -> dict[str, WeightQuant]:
    """Fake-quantize the weights of the layers `config` picks, in place, and record it
    (`penjing.quant.quantize_` with a weight-only QuantConfig)."""
    config = resolve_filter(config, model)
    added = quantize_weights_(model, select(model, config, order), config, qat)
    history.record(model, {"op": "quantize", "config": config_to_dict(config), "in_place": True})
    return added


def prepare(model: nn.Module, config: QuantConfig, *, qat: bool = False) -> nn.Module:
    """A copy of `model` with fake-quantized weights and, when `config` quantizes
    activations, traced (a GraphModule) with observing activation quantizers, ready for
    `calibrate_`. BatchNorm is folded first (the copy is put in eval mode for that).
    A Hugging Face transformers model is not traced: each chosen Linear gets its input
    quantizer as a forward pre-hook (penjing.quant.linear.eager)."""
    _check_config(config)
    if is_hf(model):
        return eager.prepare(model, config, qat=qat)
    config = resolve_filter(config, model)  # stored in the history, so no function in it
    source, model = model, copy.deepcopy(model).eval()
    fold_bn_(model)
    order = layer_order(model, config) if config.activation is not None else None
    chosen = select(model, config, order)
    quantize_weights_(model, chosen, config, qat)
    step = {"op": "quantize", "config": config_to_dict(config)}
    if config.activation is None:
        history.record(model, step)
        return model
    modules = dict(model.named_modules())
    layers = [  # attention keeps float activations: it returns a tuple, not one tensor
        n for n in chosen if not isinstance(modules[n], nn.MultiheadAttention)
    ]
    gm = trace(model, config.types)
    insert_quantizers(gm, layers, config)
    history.carry(source, gm)
    history.record(gm, step)
    return gm


def activation_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    """Every activation quantizer of `model`, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


@torch.no_grad()
def calibrate_(model: nn.Module, loader: Iterable, batches: int | None = None) -> int:
    """Run `loader` (or its first `batches` batches) through `model` so the observers see
    the activations; return the number of batches seen. A batch is a tensor, a dict of
    keyword tensors (`input_ids`, `attention_mask`) or (inputs, labels), the inputs
    again a tensor, tuple or dict (penjing.inputs). Under torchrun every rank
    calibrates, then the observers merge what all ranks saw, so every rank freezes
    the same ranges."""
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be >= 1 or None, got {batches}")
    was_training = model.training
    model.eval()
    seen = 0
    for batch in itertools.islice(loader, batches):
        inputs.call(model, inputs.from_batch(batch, model))
        seen += 1
    model.train(was_training)
    if seen == 0:
        raise ValueError(
            "calibration needs at least one batch, got an empty loader; give ptq a loader "
            "over a few hundred training images"
        )
    if distributed.active():
        for quantizer in activation_quantizers(model).values():
            if not quantizer.frozen and hasattr(quantizer.observer, "all_reduce_"):
                quantizer.observer.all_reduce_()
    return seen


def freeze_(model: nn.Module, learnable: bool = False) -> dict[str, ActQuant]:
    """Fix every activation quantizer from its observer (then learn its scale if
    `learnable`), or, if already frozen, keep its learned scale; fix every QAT weight
    range or learned weight scale."""
    quantizers = activation_quantizers(model)
    for name, q in quantizers.items():
        if not q.frozen:
            q.freeze_(name, learnable)
        elif not learnable:
            q.bake_scale_()
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            wq = get_weight_quant(module, tensor)
            if wq is None:
                continue
            with torch.no_grad():
                value = chain.original  # what reaches the quantizer: after any mask
                for p in chain:
                    if p is wq:
                        break
                    value = p(value)
                wq.freeze_(value)
    return quantizers


def ptq(
    model: nn.Module,
    calib_loader: Iterable | None,
    config: QuantConfig | None = None,
    *,
    batches: int | None = None,
    max_drop: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> nn.Module:
    """Post-training quantization: a quantized copy of `model`, calibrated on `calib_loader`.

    What comes back, on every path (`model` itself is never changed):
    - activations quantized on a model torch.fx traces: a `torch.fx.GraphModule`, since the
      activation quantizers sit between the ops of its graph (residual adds and concats
      included), which is what an integer runtime needs;
    - weights only, or a transformers model (its activation quantizers are forward
      pre-hooks on each Linear): a copy of the model's own class.
    Either one is what `pj.save` / `pj.load`, `pj.export.onnx`, `calibrate_` and
    `layer_report` take.

    With `max_drop` and `evaluate` (a function model -> metric, higher is better, e.g.
    accuracy on held-out images), the accuracy guard of `ptq_guarded` runs: the most
    sensitive layers stay in float until the metric is within `max_drop` of the float
    model's, with a PenjingWarning naming them.

    >>> q = pj.quant.ptq(model, calib_loader, pj.quant.int8(observer="entropy"))
    >>> q = pj.quant.ptq(model, calib_loader, max_drop=0.01, evaluate=val_accuracy)
    """
    if max_drop is not None or evaluate is not None:
        guarded = ptq_guarded(model, calib_loader, config, evaluate=evaluate,
                              max_drop=max_drop, batches=batches)
        if guarded.float_layers:
            warnings.warn(f"PTQ kept {len(guarded.float_layers)} layer(s) in float to hold "
                          f"the drop within {max_drop:g}: "
                          + "; ".join(f"{n} ({guarded.reasons[n]})"
                                      for n in guarded.float_layers),
                          PenjingWarning, stacklevel=2)
        return guarded.model
    config = config or QuantConfig()
    _check_config(config)
    if config.activation is not None and calib_loader is None:
        raise ValueError(
            "quantizing activations needs a calib_loader, got None; pass a loader over a "
            "few hundred training images, or set activation=None for weights only"
        )
    q = prepare(model, config)
    if config.activation is not None:
        calibrate_(q, calib_loader, batches)
        freeze_(q)
    return q


@dataclass
class Guarded:
    """What `ptq_guarded` chose, and why."""

    model: nn.Module  # the quantized copy
    baseline: float  # the float model's metric
    metric: float  # the quantized copy's
    max_drop: float
    float_layers: list[str] = field(default_factory=list)  # left in float, in the order given up
    reasons: dict[str, str] = field(default_factory=dict)  # layer -> why it was given up
    single_drops: dict[str, float] = field(default_factory=dict)  # each layer quantized alone
    tried: list[tuple[int, float]] = field(default_factory=list)  # (layers in float, metric)

    @property
    def drop(self) -> float:
        return self.baseline - self.metric

    def format(self) -> str:
        lines = [f"accuracy guard: float {self.baseline:.4f}, quantized {self.metric:.4f} "
                 f"(drop {self.drop:+.4f}, allowed {self.max_drop:g})"]
        if not self.float_layers:
            lines.append("every chosen layer quantized")
        for name in self.float_layers:
            lines.append(f"  kept in float: {name} ({self.reasons[name]})")
        return "\n".join(lines)


def _only(config: QuantConfig, floats: Iterable[str]) -> QuantConfig:
    """`config` with the layers `floats` left in float, ahead of its own layer patterns."""
    layers = {f"{re.escape(n)}": False for n in floats}
    layers.update(config.layers)
    return replace(config, layers=layers)


def ptq_guarded(
    model: nn.Module,
    calib_loader: Iterable | None,
    config: QuantConfig | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None,
    max_drop: float | None,
    batches: int | None = None,
) -> Guarded:
    """PTQ within an accuracy budget: quantize; while `evaluate` says the metric fell by
    more than `max_drop` below the float model's, leave one more layer in float, the most
    sensitive first, and quantize again.

    Sensitivity is measured, not guessed: each chosen layer is quantized alone and the
    model evaluated, so the guard costs one calibration and evaluation per layer, plus
    one per layer given up. `evaluate(model) -> float` (higher is better) should measure
    on images other than the test set that the result is reported on. When the drop
    holds only with every layer in float, an AccuracyGuardError says the best found.
    """
    if evaluate is None or not callable(evaluate):
        raise TypeError("the accuracy guard needs evaluate=, a function model -> metric "
                        f"(higher is better), got {evaluate!r}")
    if max_drop is None or isinstance(max_drop, bool) or not max_drop >= 0:
        raise ValueError(f"max_drop must be a number >= 0 (in evaluate's units, e.g. 0.01 "
                         f"for one accuracy point), got {max_drop!r}")
    config = config or QuantConfig()
    _check_config(config)
    resolved = resolve_filter(config, model)
    with torch.no_grad():
        baseline = float(evaluate(model))
    q = ptq(model, calib_loader, resolved, batches=batches)
    metric = float(evaluate(q))
    result = Guarded(q, baseline, metric, float(max_drop), tried=[(0, metric)])
    if baseline - metric <= max_drop:
        return result
    folded = copy.deepcopy(model).eval()
    fold_bn_(folded)
    order = layer_order(folded, resolved) if resolved.activation is not None else None
    chosen = list(select(folded, resolved, order))
    for name in chosen:
        alone = ptq(model, calib_loader, _only(resolved, [n for n in chosen if n != name]),
                    batches=batches)
        result.single_drops[name] = baseline - float(evaluate(alone))
    ranking = sorted(chosen, key=lambda n: -result.single_drops[n])
    best = (metric, 0)
    for k in range(1, len(ranking)):
        floats = ranking[:k]
        q = ptq(model, calib_loader, _only(resolved, floats), batches=batches)
        metric = float(evaluate(q))
        result.tried.append((k, metric))
        best = max(best, (metric, k))
        if baseline - metric <= max_drop:
            result.model, result.metric, result.float_layers = q, metric, floats
            result.reasons = {n: f"quantized alone it cost {result.single_drops[n]:.4f}"
                              for n in floats}
            return result
    metric, k = best
    raise AccuracyGuardError(
        f"PTQ cannot keep the drop within {max_drop:g}: the float model scores "
        f"{baseline:.4f}; the best found, with {k} of {len(chosen)} layers in float "
        f"({', '.join(ranking[:k]) or 'none'}), scores {metric:.4f} (drop "
        f"{baseline - metric:.4f}); allow a larger drop, calibrate on more images, try "
        "another observer, or train with QAT"
    )


def qat(
    model: nn.Module,
    train_loader: Iterable,
    config: QuantConfig | None = None,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    calib_batches: int = 8,
    **fit_kwargs,
) -> nn.Module:
    """Quantization-aware training: a quantized copy of `model`, fine-tuned with fake
    quantization for `epochs` epochs (penjing.train.fit; extra keywords go to it).

    Activation ranges come from `calib_batches` batches of `train_loader` and then stay
    fixed, or are learned (LSQ) with `config.learnable`. Weight ranges follow the weights.
    """
    config = config or QuantConfig()
    q = prepare(model, config, qat=True)
    if config.activation is not None:
        calibrate_(q, train_loader, calib_batches)
        for name, quantizer in activation_quantizers(q).items():
            quantizer.freeze_(name, config.learnable)
    fit(q, train_loader, epochs=epochs, lr=lr, **fit_kwargs)
    freeze_(q)
    q.eval()
    return q


def _replay(model: nn.Module, record: dict, tensors) -> nn.Module:
    config = replace(config_from_dict(record["config"]), learnable=False)
    if record.get("in_place"):
        weights_in_place_(model, config, False)
        return model
    return prepare(model, config)


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a model file keeps of a quantized model: integer weights and their scales."""
    check_calibrated(model)
    return integer_state(model)


STEP = Step("quantize", _replay, save_state=_stored, load_state=restore_state,
            help="fake-quantized weights and activations (penjing.quant.ptq, qat, "
                 "weight_only)")
