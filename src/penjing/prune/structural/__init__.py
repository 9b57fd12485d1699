"""Channels removed for real: the dependency graph of coupled channels (ops, labels,
propagation), scoring criteria, the selection, the surgery that slices the layers and its
replayable record, network slimming, and why a channel stays."""
