"""HQQ: half-quadratic optimisation of zero points, calibration-free.

Badri & Shaji (2023), "Half-Quadratic Quantization of Large Machine Learning
Models". With the scale fixed, HQQ minimises ||W - dequant(quant(W))||_p^p
(p = 0.7, a sparsity-promoting norm that lets a few large errors stand) by
alternating a generalised soft-threshold of the error with a closed-form
zero-point update. This follows the `hqq` package's default solver
(`hqq.core.optimize.optimize_weights_proximal_legacy`) step for step; ours
also skips NaN entries (short last groups, kept outliers), which the package's
dense, equal-length groups cannot express. The package is the reference the
tests compare against.
"""

from __future__ import annotations

import torch

from qopt.quant.formats import int_range
from qopt.quant.grid import QuantGrid
from qopt.quant.scales import stored_scale

LP_NORM = 0.7
BETA = 10.0
ITERS = 20


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The proximal operator of |x|^p / beta: soft-thresholding with an |x|^(p-1) weight."""
    magnitude = x.abs()
    return torch.sign(x) * (magnitude - magnitude.pow(p - 1) / beta).clamp_min(0.0)


def optimize_zero(
    v: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, qmax: int, beta: float = BETA, iters: int = ITERS
) -> torch.Tensor:
    """HQQ's zero points for blocks `v` ([n, len], NaN = skip) with codes round(v * inv_scale + zero).

    `inv_scale` and `zero` are [n, 1]; returns the refined (fractional) zero
    points [n, 1]. Stops at the first iteration whose mean |error| does not
    improve, as the reference does.
    """
    valid = ~torch.isnan(v)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    w = torch.nan_to_num(v)
    best = float("inf")
    for _ in range(iters):
        q = torch.round(w * inv_scale + zero).clamp(0, qmax)
        w_r = (q - zero) / inv_scale
        err = shrink_lp(w - w_r, beta)
        zero = (q - (w - err) * inv_scale).masked_fill(~valid, 0.0).sum(dim=1, keepdim=True) / count
        current = float((w - w_r).abs().masked_fill(~valid, 0.0).sum() / valid.sum().clamp_min(1))
        if current >= best:
            break
        best = current
    return zero


def hqq_grid(
    blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (scale, zero point) of HQQ for `blocks` ([n, len], NaN = skip) whose
    initial range is [lo, hi] ([n, 1]): the range's scale, an optimised fractional zero.

    Both stored in fp16, like every scale and zero point qopt counts.
    """
    assert grid.format == "int" and not grid.symmetric
    _, qmax = int_range(grid.bits, symmetric=False)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = stored_scale((hi - lo) / qmax)
    zero = optimize_zero(blocks, 1.0 / scale, -lo / scale, qmax)
    return scale, zero.to(torch.float16).to(blocks.dtype)


def hqq_quantize_in_range(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Asymmetric INT fake quantization of `blocks` ([n, len], NaN = skip) on the HQQ grid
    (`hqq_grid`); returns the dequantized values."""
    return quantize_on_grid(blocks, *hqq_grid(blocks, lo, hi, grid), grid)


def quantize_on_grid(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Round `blocks` to the nearest point of an asymmetric INT grid with a fractional zero."""
    _, qmax = int_range(grid.bits, symmetric=False)
    q = torch.round(blocks / scale + zero).clamp(0, qmax)
    return torch.where(torch.isnan(blocks), blocks, (q - zero) * scale)
