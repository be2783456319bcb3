"""Number grids that weights and activations are rounded onto.

Integer grids are handled arithmetically (round and clamp); the non-uniform
grids (FP e2m1, FP e4m3, NF4) are sorted tensors of every representable value,
in units of the scale. Each grid's largest magnitude is what abs-max maps to.
"""

from __future__ import annotations

import math
from functools import cache

import torch

# OCP Microscaling spec, FP4 E2M1: every non-negative value.
_E2M1_POSITIVE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes [qmin, qmax] of a `bits`-wide grid.

    Symmetric grids are signed two's-complement ranges (-8..7 at 4 bits), as
    in GPTQ and torchao; asymmetric grids are unsigned (0..15) with a zero point.
    """
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@cache
def float_levels(format: str, bits: int) -> torch.Tensor:
    """All representable values of a non-uniform grid, sorted ascending (fp32)."""
    if format == "nf4" and bits == 4:
        return _nf4_levels()
    if format == "fp" and bits == 4:
        pos = torch.tensor(_E2M1_POSITIVE)
        return torch.cat([-pos.flip(0)[:-1], pos])
    if format == "fp" and bits == 8:
        codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        return torch.unique(codes[torch.isfinite(codes)])
    raise ValueError(f"no {bits}-bit {format} grid")


def _nf4_levels() -> torch.Tensor:
    """NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), scaled to [-1, 1].

    Eight positive and seven negative quantiles plus an exact zero, so the grid
    is asymmetric by one level; 0.9677 is the paper's offset that keeps the
    outermost quantile finite.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    levels = levels / levels.abs().max()
    return levels.sort().values.float()


def grid_max(format: str, bits: int) -> float:
    """The largest magnitude of a symmetric non-uniform grid (what abs-max maps to)."""
    return float(float_levels(format, bits).abs().max())


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP8 e4m3 value, saturating at ±448 (fp32 in, fp32 out)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def index_bits(n: int) -> int:
    """Bits to address one of `n` positions."""
    return max(1, math.ceil(math.log2(n)))
