"""The grid a weight matrix is rounded onto, as a plain value.

A `QuantGrid` is resolved once from a layer's genes (`LayerConfig.grid()`)
and is all the numerics in this package read: the number format and its
width, how the matrix is cut into blocks that share a scale, whether blocks
have a zero point, and the rule that picks each block's range. A
`WeightQuantization` adds what happens around the grid: the rounding method,
outliers kept in 16 bits, and the input transform (smoothing, rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantGrid:
    """Where one matrix's weights may land.

    `format`: "int" (uniform codes), "fp" (e2m1 at 4 bits, e4m3 at 8) or
    "nf4"; `bits`: code width in bits per weight; `symmetric`: signed codes
    and no zero point (always true for the float grids); `granularity`:
    "tensor", "channel" (one output row) or "group" (`group_size` consecutive
    inputs of a row) blocks sharing one scale; `scale_rule`: how a block's
    range is picked ("absmax", "mse" clip search, "percentile" clip at
    `clip_percentile`).
    """

    format: str
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None = None
    scale_rule: str = "absmax"
    clip_percentile: float | None = None

    @property
    def has_zero(self) -> bool:
        """Whether each block stores a zero point (asymmetric INT)."""
        return self.format == "int" and not self.symmetric

    def n_blocks(self, out_features: int, in_features: int) -> int:
        """How many blocks (each with its own scale) an [out, in] matrix has."""
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return out_features
        assert self.group_size is not None
        return out_features * math.ceil(in_features / self.group_size)


@dataclass(frozen=True)
class WeightQuantization:
    """How one weight matrix is quantized: its grid and what surrounds it.

    `grid` is None for a matrix left in 16 bits (it may still be smoothed or
    rotated for its activations' sake); `rounding`: "nearest", "stochastic", "gptq", "awq" or "hqq";
    `keep_fraction`: the fraction of largest-magnitude weights kept in fp16
    (None: none); `smooth_alpha`: SmoothQuant migration strength (None: no
    smoothing); `rotate`: a Hadamard rotation of the input dimension.
    """

    grid: QuantGrid | None
    rounding: str = "nearest"
    keep_fraction: float | None = None
    smooth_alpha: float | None = None
    rotate: bool = False

    @property
    def needs_hessian(self) -> bool:
        """Whether the rounding needs the layer's input Hessian from calibration data."""
        return self.grid is not None and self.rounding in ("gptq", "awq")
