"""Deep Compression storage: pruned, weight-shared tensors as Huffman-coded sparse streams.

`save` writes a state_dict as a checksummed .pjz file and reports what every tensor cost;
`load` reads it back bit-exact without unpickling anything. `relindex`, `huffman` and
`rans` are the codes underneath (`entropy` picks the smaller coder per stream), usable
on their own.

    import penjing.codec as codec
    report = codec.save(model, "model.pjz")
    print(report)                      # per-tensor bytes, ratio, Huffman saving
    state = codec.load("model.pjz")
"""

from __future__ import annotations

from penjing.codec import entropy, huffman, rans, relindex
from penjing.codec.container import inspect, load, report_size, save
from penjing.codec.report import CompressionReport, LayerReport, StreamReport

__all__ = [
    "CompressionReport",
    "LayerReport",
    "StreamReport",
    "entropy",
    "huffman",
    "inspect",
    "load",
    "rans",
    "relindex",
    "report_size",
    "save",
]
