"""The one torch.fx tracer penjing uses, for pruning's dependency graph and for placing
quantizers: torch.nn layers (and any extra leaf types) stay whole, and a model that cannot
be traced is an error naming the module where tracing failed."""

from __future__ import annotations

from torch import fx, nn

from penjing.errors import UnsupportedLayerError


class Tracer(fx.Tracer):
    """The default fx tracer plus extra leaf types; remembers where tracing failed."""

    def __init__(self, leaves: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.leaves = tuple(leaves)
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx's signature
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def trace(
    model: nn.Module, leaves: tuple[type[nn.Module], ...] = (), *, advice: str
) -> fx.GraphModule:
    """`model` as a GraphModule sharing its layers; untraceable → `UnsupportedLayerError`
    naming the module (or forward) that failed, followed by `advice` on what to do."""
    tracer = Tracer(leaves)
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
