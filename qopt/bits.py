"""True storage cost: bits per weight with every side datum counted.

A quantized [out, in] matrix stores
- the payload: `bits` per weight, dense (kept outliers still have a slot);
- one fp16 scale per block, and one fp16 zero point per block if asymmetric;
- each kept outlier as an fp16 value plus its flat index (ceil(log2(out*in)) bits);
- side data of the input transform: SmoothQuant's fp16 factor per input
  channel, and AWQ's fp16 scale per input channel (each stored; a deployment
  that folds them into the preceding norm would not pay them, see
  `qopt.quant.awq`). Rotations are regenerated from their size, so they cost
  nothing. GPTQ and HQQ change the stored values, not what is stored.
A 16-bit (unquantized) matrix costs 16 bits per weight.

Model-level `bpw` is total bits / total weights over the linear layers of the
transformer blocks; the token embedding and the output head are reported
separately (tied, they are one matrix, counted once, under `embed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from qopt.quant.formats import index_bits
from qopt.quant.outliers import outlier_count
from qopt.strategy import EDGE_ROLES, LayerConfig

SCALE_BITS = 16
ZERO_BITS = 16
OUTLIER_VALUE_BITS = 16
SMOOTH_FACTOR_BITS = 16
AWQ_SCALE_BITS = 16
UNQUANTIZED_BITS = 16


@dataclass(frozen=True)
class BitCost:
    """Storage of one or more weight matrices, in bits."""

    n_weights: int = 0
    payload: int = 0
    scales: int = 0
    zeros: int = 0
    outliers: int = 0
    side: int = 0

    @property
    def total(self) -> int:
        return self.payload + self.scales + self.zeros + self.outliers + self.side

    @property
    def bpw(self) -> float:
        """Bits per weight (0 for an empty cost)."""
        return self.total / self.n_weights if self.n_weights else 0.0

    def __add__(self, other: BitCost) -> BitCost:
        return BitCost(
            self.n_weights + other.n_weights,
            self.payload + other.payload,
            self.scales + other.scales,
            self.zeros + other.zeros,
            self.outliers + other.outliers,
            self.side + other.side,
        )


def layer_cost(out_features: int, in_features: int, config: LayerConfig) -> BitCost:
    """The storage cost of one [out, in] matrix quantized as `config`."""
    n = out_features * in_features
    if not config.quantizes_weights:
        side = SMOOTH_FACTOR_BITS * in_features if config.quantizes_activations and config.outliers == "smooth" else 0
        return BitCost(n_weights=n, payload=UNQUANTIZED_BITS * n, side=side)
    grid = config.grid()
    assert grid is not None
    blocks = grid.n_blocks(out_features, in_features)
    outliers = 0
    if config.topk_fraction is not None:
        outliers = outlier_count(n, config.topk_fraction) * (OUTLIER_VALUE_BITS + index_bits(n))
    side = SMOOTH_FACTOR_BITS * in_features if config.outliers == "smooth" else 0
    if config.rounding == "awq":
        side += AWQ_SCALE_BITS * in_features
    return BitCost(
        n_weights=n,
        payload=config.bits * n,
        scales=SCALE_BITS * blocks,
        zeros=ZERO_BITS * blocks if grid.has_zero else 0,
        outliers=outliers,
        side=side,
    )


class LayerShape(Protocol):
    name: str
    role: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class ModelCost:
    """Storage of a whole model under one strategy.

    `blocks` covers the transformer blocks' linear layers (this is what `bpw`
    means everywhere in qopt); `embed` and `head` are the edge matrices;
    `other_params` (norms, biases, position embeddings) are stored in 16 bits.
    """

    blocks: BitCost
    embed: BitCost
    head: BitCost
    other_params: int

    @property
    def bpw(self) -> float:
        return self.blocks.bpw

    @property
    def total_bytes(self) -> int:
        bits = self.blocks.total + self.embed.total + self.head.total + UNQUANTIZED_BITS * self.other_params
        return (bits + 7) // 8


def model_cost(units: Sequence[LayerShape], plan: Mapping[str, LayerConfig], other_params: int = 0) -> ModelCost:
    """Sum `layer_cost` over a model's units, as resolved by `Strategy.resolve`."""
    parts = {"blocks": BitCost(), "embed": BitCost(), "lm_head": BitCost()}
    for unit in units:
        group = unit.role if unit.role in EDGE_ROLES else "blocks"
        parts[group] = parts[group] + layer_cost(unit.out_features, unit.in_features, plan[unit.name])
    return ModelCost(blocks=parts["blocks"], embed=parts["embed"], head=parts["lm_head"], other_params=other_params)
