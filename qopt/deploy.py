"""Deployment targets: search spaces whose every strategy a serving engine stores exactly.

`search.deploy: llamacpp` keeps each gene group to what a GGUF block type or
F16 holds (`qopt.gguf_export`): INT4/INT5 in groups of 32, symmetric or not;
INT8 in groups of 32, symmetric; or 16 bits. No outliers kept in 16 bits, no
input transforms (smoothing, rotation, AWQ), no activation quantization, fp32
accumulation. A group whose layers' inputs are not whole blocks of 32 stays
16-bit. Every front member then exports with `qopt export --format gguf`,
and its true bits per weight are the file's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TARGETS = ("llamacpp",)


def limits(target: str, in_features: Sequence[int], genes: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Values each gene may take on `target`, for a group of layers with these input widths,
    given the genes chosen so far (`genes`: a config's genes in table order, possibly partial)."""
    from qopt.gguf_export import BLOCK, BLOCK_TYPES, EXACT_GENES, STORABLE_ROUNDINGS

    assert target in TARGETS
    whole_blocks = all(n % BLOCK == 0 for n in in_features)
    allowed: dict[str, tuple[Any, ...]] = {
        "bits": tuple(sorted({b for b, _ in BLOCK_TYPES})) + (16,) if whole_blocks else (16,),
        "rounding": STORABLE_ROUNDINGS,
        **{name: (value,) for name, value in EXACT_GENES.items()},
    }
    symmetric = tuple(s for b, s in sorted(BLOCK_TYPES) if b == genes.get("bits"))
    if symmetric:
        allowed["symmetric"] = symmetric
    return allowed
