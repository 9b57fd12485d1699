"""What compression bought, per tensor and in total, measured on the encoded bytes.

Every byte count comes from an actual encoded section (code tables, coder states and
sync points included), and the total is the size of the file on disk, headers and manifest included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from penjing.codec.huffman import fixed_width_bits


@dataclass(frozen=True)
class StreamReport:
    """One coded stream (Huffman, rANS, enumerative or fixed-width, whichever was smallest): its
    cost against
    the entropy floor and a fixed-width code."""

    symbols: int  # entries in the stream
    fixed_bits: int  # bits/symbol of a fixed-width code over the stream's alphabet
    coded_bits: float  # bits/symbol actually spent by its coder, tables and headers included
    entropy_bits: float | None  # Shannon floor; None when only the manifest was read
    bytes: int  # encoded size of the stream


@dataclass(frozen=True)
class LayerReport:
    """How one tensor was stored and what it costs."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    kept: float  # nonzero / numel; 1.0 for an empty tensor, which lost nothing
    encoding: str  # "sparse" | "dense" | "raw"
    weight_bits: int  # fixed-width bits per code, ceil(log2(codebook + 1)); element bits if raw
    index_bits: int | None  # gap width of the sparse format, None otherwise
    codebook_bytes: int
    index_bytes: int  # coded gap stream, its code table included
    weight_bytes: int  # coded value (or code) stream incl. table; the raw bytes if raw
    total_bytes: int
    original_bytes: int  # numel x element size
    ratio: float  # original_bytes / total_bytes
    padding: int  # padding entries the sparse format needed for long zero runs
    index_stream: StreamReport | None = None
    weight_stream: StreamReport | None = None


def _ratio(original: int, stored: int) -> float:
    if stored == 0:
        return 1.0 if original == 0 else float("inf")
    return original / stored


@dataclass(frozen=True)
class CompressionReport:
    """Per-tensor rows plus totals for a whole state_dict."""

    layers: list[LayerReport]
    original_bytes: int
    compressed_bytes: int  # the .pjz file size, headers and manifest included
    ratio: float
    coding_saving: float  # fraction entropy coding saved over fixed-width codes, all coded streams
    # (tables and sync points included; single-symbol streams left out)
    overhead_bytes: int = field(default=0)  # header + manifest: compressed minus all tensors

    @classmethod
    def from_layers(cls, layers: list[LayerReport], compressed_bytes: int) -> CompressionReport:
        original = sum(layer.original_bytes for layer in layers)
        # A stream over a single symbol (an all-zero tensor) needs 0 fixed-width bits, so
        # any code loses on it; it says nothing about entropy coding and is left out.
        streams = [
            s
            for layer in layers
            for s in (layer.index_stream, layer.weight_stream)
            if s is not None and s.symbols and s.fixed_bits
        ]
        fixed = sum(s.symbols * s.fixed_bits for s in streams)
        coded = sum(8 * s.bytes for s in streams)
        return cls(
            layers=list(layers),
            original_bytes=original,
            compressed_bytes=compressed_bytes,
            ratio=_ratio(original, compressed_bytes),
            coding_saving=1.0 - coded / fixed if fixed else 0.0,
            overhead_bytes=compressed_bytes - sum(layer.total_bytes for layer in layers),
        )

    def format(self) -> str:
        """A plain-text table, one row per tensor, then the totals."""
        head = (
            f"{'tensor':<32} {'shape':<18} {'enc':<6} {'kept':>6} {'w':>3} {'i':>3} "
            f"{'bytes':>10} {'ratio':>7}"
        )
        rows = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.shape)) or "()"
            ibits = "-" if r.index_bits is None else str(r.index_bits)
            rows.append(
                f"{r.name[-32:]:<32} {shape[:18]:<18} {r.encoding:<6} {r.kept:>6.1%} "
                f"{r.weight_bits:>3} {ibits:>3} {r.total_bytes:>10,} {r.ratio:>6.1f}x"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{self.original_bytes:,} B -> {self.compressed_bytes:,} B "
            f"({self.ratio:.1f}x, {self.overhead_bytes:,} B header+manifest); "
            f"entropy coding saved {self.coding_saving:.1%} over fixed-width codes"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()


def layer_report(
    entry: dict,
    element_size: int,
    *,
    index_entropy: float | None = None,
    weight_entropy: float | None = None,
) -> LayerReport:
    """Build a tensor's row from its manifest entry (and the entropies, when we have them)."""
    shape = tuple(entry["shape"])
    numel = 1
    for d in shape:
        numel *= d
    sizes: dict[str, int] = {}
    for kind, length, _crc in entry["sections"]:
        sizes[kind] = sizes.get(kind, 0) + length
    encoding = entry["encoding"]
    codebook = entry.get("codebook", 0)
    weight_bits = 8 * element_size if encoding == "raw" else fixed_width_bits(codebook + 1)
    if encoding == "packed":  # 1 bit (binary) or 2 (ternary) per element
        weight_bits = 1 if entry.get("levels") == 2 else 2
    index_bits = entry.get("index_bits") if encoding == "sparse" else None
    entries = entry.get("entries", 0) if encoding == "sparse" else numel
    weight_bytes = (sizes.get("values", 0) + sizes.get("codes", 0) + sizes.get("raw", 0)
                    + sizes.get("levels", 0))

    def stream(nbytes: int, fixed: int, entropy: float | None) -> StreamReport:
        spent = 8 * nbytes / entries if entries else 0.0
        return StreamReport(entries, fixed, spent, entropy, nbytes)

    index_stream = weight_stream = None
    if encoding == "sparse":
        index_stream = stream(sizes.get("gaps", 0), index_bits, index_entropy)
    if encoding in ("sparse", "dense"):
        weight_stream = stream(weight_bytes, weight_bits, weight_entropy)
    total = sum(sizes.values())
    original = numel * element_size
    return LayerReport(
        name=entry["name"],
        shape=shape,
        numel=numel,
        nonzero=entry["nonzero"],
        kept=entry["nonzero"] / numel if numel else 1.0,
        encoding=encoding,
        weight_bits=weight_bits,
        index_bits=index_bits,
        codebook_bytes=sizes.get("codebook", 0) + sizes.get("scales", 0),
        index_bytes=sizes.get("gaps", 0),
        weight_bytes=weight_bytes,
        total_bytes=total,
        original_bytes=original,
        ratio=_ratio(original, total),
        padding=entry.get("padding", 0),
        index_stream=index_stream,
        weight_stream=weight_stream,
    )
