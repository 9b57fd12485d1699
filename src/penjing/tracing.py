"""The one torch.fx tracer penjing uses, for pruning's dependency graph, BatchNorm folding
and placing quantizers.

A layer is a leaf by `isinstance`, not by where its class is defined: a subclass of a
torch.nn layer (a Conv2d with TensorFlow-style "same" padding, a BatchNorm with extras) is
still that layer, so the methods that look for convs, BatchNorms and linears find it. fx's
default would trace into such a subclass and leave a bare `F.conv2d` that no rule ties to
a module. Containers (Sequential, ModuleList, ModuleDict) and plain nn.Module subclasses
are traced into. A model that cannot be traced is an error naming the module where
tracing failed.

Why torch.fx with leaves, and not torch.export or an autograd-graph walk: structured
surgery re-runs the model's own Python, so the graph must tell a size written in the code
(`x.view(-1, 128)`, `self.hidden_dim`) from one read off a shape (`x.size(1) // 2`); fx
records the latter as a node while torch.export specializes both to the same int, and an
autograd walk sees neither. Leaves keep module identity, which BatchNorm folding, quantizer
placement and the ONNX exporter need, and fx's graph runs on the meta device, so building
the dependency graph of a large model costs no forward pass. What fx cannot trace (Python
branching on tensor values) is an error naming the module.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from penjing.errors import UnsupportedLayerError

# Classes of torch.nn that hold other modules rather than compute: never leaves.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList,
               nn.ParameterDict)


def layer_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch.nn layer class `module` is (itself or the nearest base), None for a model
    or container of the user's own."""
    if isinstance(module, _CONTAINERS):
        return None
    for cls in type(module).__mro__:
        if cls is nn.Module:
            return None
        if cls.__module__.startswith(("torch.nn.", "torch.ao.nn.")):
            return cls
    return None


def is_layer(module: nn.Module) -> bool:
    """Whether `module` is a torch.nn layer or a subclass of one: the default leaf test."""
    return layer_class(module) is not None


class Tracer(fx.Tracer):
    """An fx tracer whose leaves are `leaves` and the modules `whole` accepts (by default
    torch.nn layers and their subclasses); remembers where tracing failed."""

    def __init__(self, leaves: tuple[type[nn.Module], ...] = (),
                 whole: Callable[[nn.Module], bool] = is_layer) -> None:
        super().__init__()
        self.leaves = tuple(leaves)
        self.whole = whole
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or self.whole(m)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx's signature
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def trace(
    model: nn.Module, leaves: tuple[type[nn.Module], ...] = (), *, advice: str,
    whole: Callable[[nn.Module], bool] = is_layer,
) -> fx.GraphModule:
    """`model` as a GraphModule sharing its layers; untraceable → `UnsupportedLayerError`
    naming the module (or forward) that failed, followed by `advice` on what to do."""
    tracer = Tracer(leaves, whole)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "cannot trace"
        where = tracer.failed_at
        part = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else (
            f"{type(model).__name__}.forward"
        )
        raise UnsupportedLayerError(
            f"torch.fx cannot trace {part}: {type(err).__name__}: {err}. {advice}"
        ) from err
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
