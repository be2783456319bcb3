"""Rounding values (already divided by their scale) onto a grid: nearest or stochastic.

Stochastic rounding picks the upper neighbour with probability equal to the
distance from the lower one, so it is unbiased in expectation; it needs a
`torch.Generator` for reproducibility.
"""

from __future__ import annotations

import torch


def round_to_int(
    v: torch.Tensor, qmin: int, qmax: int, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer codes in [qmin, qmax] for `v` (any shape, fp32)."""
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        q = torch.floor(v + noise)
    else:
        q = torch.round(v)
    return q.clamp(qmin, qmax)


def round_to_levels(
    v: torch.Tensor, levels: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The grid value of `levels` (sorted, 1-D) chosen for each element of `v`.

    Values outside the grid saturate to its ends. NaN elements give
    unspecified values; callers mask them.
    """
    v = v.clamp(levels[0], levels[-1])
    upper_idx = torch.searchsorted(levels, v.contiguous()).clamp(1, len(levels) - 1)
    upper = levels[upper_idx]
    lower = levels[upper_idx - 1]
    frac = (v - lower) / (upper - lower)
    if stochastic:
        take_upper = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype) < frac
    else:
        take_upper = frac > 0.5
    return torch.where(take_upper, upper, lower)
