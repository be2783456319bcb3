"""Scaling granularity and scale choice: weights -> blocks -> (scale, zero) -> grid.

A weight matrix is cut into *blocks* that share one scale (and zero point):
the whole tensor, one output row ("channel"), or `group_size` consecutive
inputs of one row. Blocks are rows of a `[n_blocks, block_len]` tensor. A row
whose length is not a multiple of the group size ends in a shorter group; it is
padded with NaN, and NaN means "not quantized here" throughout this package
(kept outliers are NaN too), so padding never moves a scale.

The integer conventions follow torchao's `choose_qparams_affine` and GPTQ
(signed symmetric codes, zero kept exactly representable). torchao itself is
not used: its block sizes must divide the row (172 = 2 x 64 + 44 does not),
and it has no clip search or stochastic rounding.
"""

from __future__ import annotations

import torch

from qopt.quant.formats import float_levels, grid_max, int_range
from qopt.quant.grid import QuantGrid
from qopt.quant.rounding import round_to_int, round_to_levels

#: Shrink factors tried by the MSE clip search (1.0 = abs-max, no clipping).
MSE_SHRINK_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))
# Elements (factors x blocks x block length) the MSE clip search holds at once: 1 MiB of fp32, cache-sized.
_MSE_CHUNK = 1 << 18
# Scales are stored in fp16: keep them inside its positive range.
_FP16_TINY = 2.0**-24
_FP16_MAX = 65504.0


def to_blocks(w: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [n_blocks, block_len], NaN-padded where a last group is short."""
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "channel":
        return w
    assert group_size is not None
    rows, cols = w.shape
    pad = -cols % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad), value=float("nan"))
    return w.reshape(rows * ((cols + pad) // group_size), group_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_blocks` for a matrix of `shape` = (out, in)."""
    rows, cols = shape
    return blocks.reshape(rows, -1)[:, :cols]


def quantize_blocks(
    blocks: torch.Tensor, grid: QuantGrid, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fake-quantize each block onto `grid`; returns dequantized values.

    `blocks` is [n_blocks, block_len] fp32, NaN where nothing is quantized (NaN
    stays NaN). The scale rule (abs-max, MSE clip search, percentile clip)
    picks one range per block; scales and zero points are rounded to fp16, as
    they are stored.
    """
    lo, hi = block_range(blocks, grid)
    return quantize_in_range(blocks, lo, hi, grid, stochastic, generator)


def block_range(blocks: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] (each [n_blocks, 1]) that the grid's scale rule picks per block."""
    if grid.scale_rule == "percentile":
        assert grid.clip_percentile is not None
        return _percentile_range(blocks, grid.clip_percentile / 100.0)
    lo, hi = _absmax_range(blocks)
    if grid.scale_rule == "mse":
        shrink = _mse_shrink(blocks, lo, hi, grid)
        lo, hi = lo * shrink, hi * shrink
    return lo, hi


def _absmax_range(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nan = torch.isnan(blocks)
    lo = blocks.masked_fill(nan, float("inf")).amin(dim=1, keepdim=True)
    hi = blocks.masked_fill(nan, float("-inf")).amax(dim=1, keepdim=True)
    empty = torch.isinf(lo)  # a block with nothing to quantize
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def _percentile_range(blocks: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.nanquantile(blocks, 1.0 - q, dim=1, keepdim=True)
    hi = torch.nanquantile(blocks, q, dim=1, keepdim=True)
    return torch.nan_to_num(lo), torch.nan_to_num(hi)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric INT scale and integer zero point for the range [lo, hi] (as stored).

    Codes are q = round(v / scale + zero) in [0, 2^bits - 1]; 0 maps exactly to `zero`.
    """
    qmin, qmax = int_range(bits, symmetric=False)
    scale = stored_scale((hi - lo) / (qmax - qmin))
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def grid_params(lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block (scale, zero point) of the grid covering [lo, hi] (both [n, 1]), as
    stored: fp16-valued scales; integer zero points for asymmetric INT, else None."""
    lo = lo.clamp(max=0.0)  # keep 0 exactly representable, as GPTQ and torchao do
    hi = hi.clamp(min=0.0)
    if grid.format == "int":
        if not grid.symmetric:
            return affine_params(lo, hi, grid.bits)
        qmin, qmax = int_range(grid.bits, symmetric=True)
        return stored_scale(torch.maximum(-lo, hi) / ((qmax - qmin) / 2)), None
    return stored_scale(torch.maximum(-lo, hi) / grid_max(grid.format, grid.bits)), None


def quantize_in_range(
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: QuantGrid,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize blocks ([n, len], NaN = skip) whose representable range is [lo, hi]
    (both [n, 1], or broadcastable); returns the dequantized values."""
    scale, zero = grid_params(lo, hi, grid)
    if grid.format == "int":
        qmin, qmax = int_range(grid.bits, grid.symmetric)
        if zero is None:
            out = round_to_int(blocks / scale, qmin, qmax, stochastic, generator) * scale
        else:
            out = (round_to_int(blocks / scale + zero, qmin, qmax, stochastic, generator) - zero) * scale
    else:
        levels = float_levels(grid.format, grid.bits).to(blocks.device)
        out = round_to_levels(blocks / scale, levels, stochastic, generator) * scale
    return torch.where(torch.isnan(blocks), blocks, out)


def grid_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: QuantGrid) -> torch.Tensor:
    """The unsigned codes (int64, in [0, 2^bits)) of dequantized grid `values`
    ([n, len] blocks, NaN = not on the grid: code 0), given each block's grid."""
    on_grid = values.nan_to_num(0.0)
    if grid.format == "int":
        qmin, _ = int_range(grid.bits, grid.symmetric)
        q = torch.round(on_grid / scale) if zero is None else torch.round(on_grid / scale + zero)
        codes = q - qmin
    else:
        levels = float_levels(grid.format, grid.bits).to(values.device)  # sorted ascending
        x = (on_grid / scale).contiguous()
        upper = torch.searchsorted(levels, x).clamp(1, len(levels) - 1)
        codes = torch.where((x - levels[upper - 1]).abs() <= (levels[upper] - x).abs(), upper - 1, upper)
    return codes.masked_fill(torch.isnan(values), 0).to(torch.int64)


def grid_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: QuantGrid) -> torch.Tensor:
    """Inverse of `grid_codes`: the dequantized fp32 values of codes ([n, len] blocks),
    computed exactly as quantization computed them."""
    if grid.format == "int":
        qmin, _ = int_range(grid.bits, grid.symmetric)
        q = (codes + qmin).float()
        return q * scale if zero is None else (q - zero) * scale
    levels = float_levels(grid.format, grid.bits).to(codes.device)
    return levels[codes] * scale


def _mse_shrink(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Per block ([n, len] -> [n, 1]), the factor shrinking [lo, hi] that gives the least
    squared error (the first of `MSE_SHRINK_FACTORS` on a tie).

    All factors are tried at once on up to `_MSE_CHUNK` elements per pass (factors x
    blocks x block length), so memory stays bounded on an embedding-sized matrix."""
    factors = torch.tensor(MSE_SHRINK_FACTORS, dtype=blocks.dtype, device=blocks.device).view(-1, 1, 1)
    rows = max(1, _MSE_CHUNK // (len(MSE_SHRINK_FACTORS) * max(1, blocks.shape[1])))
    best = torch.empty(blocks.shape[0], 1, dtype=blocks.dtype, device=blocks.device)
    for start in range(0, blocks.shape[0], rows):
        part = blocks[start : start + rows]
        hat = quantize_in_range(part, lo[start : start + rows] * factors, hi[start : start + rows] * factors, grid)
        err = ((hat - part) ** 2).masked_fill(torch.isnan(part), 0.0).sum(dim=2)  # [factors, rows]
        best[start : start + rows, 0] = factors.view(-1)[err.argmin(dim=0)]
    return best


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """A scale as it is stored: positive and rounded to fp16."""
    return scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(scale.dtype)
