"""The ground floor every method stands on, importing no method itself: parametrizations
(masks, shared weights), checkpoint files, counting (parameters, MACs, latency), run modes,
and the registry of steps through which model files, `.pjz` files, recipes and the CLI
learn what each method recorded and how to replay it."""
