"""GPTQ: quantize a weight matrix column by column, compensating each column's
rounding error on the columns not yet quantized.

Frantar et al. (2023), "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1, read beside the reference
implementation (IST-DASLab/gptq): the inverse Hessian's upper Cholesky factor,
lazy batch updates over blocks of columns, 1% dampening, dead inputs zeroed,
no activation reordering. Group parameters are chosen when the sweep reaches a
group, from the weights as updated so far; per-channel and per-tensor
parameters from the whole matrix first. Any of qopt's grids and scale rules
works, since a column is quantized by the same `quantize_in_range` as
round-to-nearest.

The inverse Hessian's factor depends only on the Hessian, so it is memoised by
content for the last few Hessians: the allocator quantizes each layer in every
config of its menu, and the configs that share a basis share the factor.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable

import torch

from qopt.quant.formats import float_levels, int_range
from qopt.quant.grid import QuantGrid
from qopt.quant.rounding import round_to_levels
from qopt.quant.scales import block_range, grid_params, to_blocks

DAMP = 0.01
BLOCK_COLUMNS = 128
# Inverse-Hessian factors kept (by Hessian content): 4 of SmolLM2's widest ([1536, 1536]) are 36 MiB.
_FACTORS_KEPT = 4
_factors: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    kept: torch.Tensor | None = None,
    damp: float = DAMP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake-quantized [out, in] weight GPTQ stores for `w` ([out, in], fp32), and
    the range [lo, hi] each block's grid was built from (each [n_blocks, 1], in
    `to_blocks` order: GPTQ reads a group's range from the updated weights, so
    it cannot be recomputed from `w`).

    `hessian` is the layer-input second moment X^T X / n ([in, in]) in the same
    basis as `w`; `kept` ([out, in] bool) marks weights kept in fp16: each is
    stored as fp16 with the compensation it received from earlier columns, and
    passes on only its fp16 rounding error.
    """
    w = w.clone().float()
    n_cols = w.shape[1]
    dead, h_inv = inverse_factor(hessian.to(w.device), damp)
    w[:, dead] = 0.0

    group = grid.group_size if grid.granularity == "group" else None
    if group is None:  # one range per row or for the whole tensor, from the matrix as it is
        lo, hi = block_range(to_blocks(_masked(w, kept), grid.granularity, None), grid)
        ranges = [(lo, hi)]
        lo, hi = (lo, hi) if grid.granularity == "channel" else (lo.expand(w.shape[0], 1), hi.expand(w.shape[0], 1))
    else:
        ranges = []
    rounder = None if group else _column_rounder(lo, hi, grid)
    # Blocks of whole groups, so a group's range is always read from up-to-date weights.
    step = group * math.ceil(BLOCK_COLUMNS / group) if group else BLOCK_COLUMNS
    q_all = torch.zeros_like(w)
    for start in range(0, n_cols, step):
        end = min(start + step, n_cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            if group and i % group == 0:
                segment = w_block[:, i : i + group]
                lo, hi = block_range(
                    _masked(segment, None if kept is None else kept[:, start + i : start + i + group]), grid
                )
                ranges.append((lo, hi))
                rounder = _column_rounder(lo, hi, grid)
            column = w_block[:, i : i + 1]
            q = rounder(column)
            if kept is not None:
                q = torch.where(kept[:, start + i : start + i + 1], column.half().float(), q)
            q_all[:, start + i] = q[:, 0]
            err = (column - q) / h_inv_block[i, i]
            w_block[:, i:] -= err @ h_inv_block[i : i + 1, i:]
            err_block[:, i] = err[:, 0]
        w[:, end:] -= err_block @ h_inv[start:end, end:]
    lo_all = torch.cat([lo for lo, _ in ranges], dim=1).reshape(-1, 1)  # [out, n_groups] row-major = to_blocks
    hi_all = torch.cat([hi for _, hi in ranges], dim=1).reshape(-1, 1)
    return q_all, lo_all, hi_all


def inverse_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The dead inputs ([in] bool: zero diagonal) and the upper Cholesky factor of the
    dampened inverse Hessian ([in, in] fp32) that GPTQ sweeps with; memoised by the
    Hessian's bytes, so a layer quantized again in another grid reuses it exactly."""
    h = hessian.float()
    key = (hashlib.blake2b(h.cpu().numpy().tobytes(), digest_size=16).digest(), h.shape, str(h.device), damp)
    if key in _factors:
        _factors.move_to_end(key)
        return _factors[key]
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    _factors[key] = (dead, factor)
    if len(_factors) > _FACTORS_KEPT:
        _factors.popitem(last=False)
    return dead, factor


def _column_rounder(lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round-to-nearest of an [out, 1] column onto the grid of the range [lo, hi] ([out, 1]).

    The same arithmetic as `scales.quantize_in_range`, with the grid resolved once
    per group instead of once per column: the sweep calls this for every column.
    """
    scale, zero = grid_params(lo, hi, grid)
    if grid.format != "int":
        levels = float_levels(grid.format, grid.bits).to(lo.device)
        return lambda column: round_to_levels(column / scale, levels) * scale
    qmin, qmax = int_range(grid.bits, grid.symmetric)
    if zero is None:
        return lambda column: torch.round(column / scale).clamp_(qmin, qmax).mul_(scale)
    return lambda column: torch.round(column / scale + zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


def _masked(w: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """`w` with kept outliers as NaN, so they do not move a range."""
    return w if kept is None else w.masked_fill(kept, float("nan"))
