"""qopt's numerics against independent references: the GPTQ algorithm written out
here from the paper, the published NF4 / FP4 / FP8 grids, and the objectives AWQ
and HQQ define (each method's error no worse than a plain search over its own knob).

The references below are deliberately written from the papers and specs, not from
qopt's code: float64 where qopt works in float32, full-matrix updates where qopt
batches, explicit formulas where qopt uses lookup tables.
"""

from __future__ import annotations

import math

import pytest
import torch

from qopt.quant.awq import awq_scale, output_error
from qopt.quant.formats import e4m3_round, float_levels
from qopt.quant.gptq import gptq_quantize
from qopt.quant.grid import QuantGrid
from qopt.quant.hqq import optimize_zero, quantize_on_grid
from qopt.quant.scales import affine_params, block_range, from_blocks, quantize_blocks, to_blocks

# ---- GPTQ ---------------------------------------------------------------


def _rtn_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the min-max grid, as the GPTQ reference's `Quantizer.find_params`
    computes them, with the scale rounded to fp16 as qopt stores it."""
    maxq = 2**bits - 1
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = ((hi - lo) / maxq).half().to(w.dtype)
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def _rtn(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero)


def reference_gptq(
    w: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool, group: int | None, block: int
) -> torch.Tensor:
    """Algorithm 1 of Frantar et al. (2023), in float64: dampen H by 1% of its mean
    diagonal, take the upper Cholesky factor U of H^-1, sweep the columns in blocks
    of `block`, quantize each column, spread its error (w - q) / U[i, i] over the
    block's later columns at once, and over the remaining columns once per block
    (lazy batch update). With `group`, a group's grid is read from the weights as
    updated when the sweep reaches it (the IST-DASLab code reads it from the
    block-start weights instead, which differs inside a block when group < block)."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    h += 0.01 * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    scale, zero = _rtn_params(w, bits, symmetric)
    q = torch.zeros_like(w)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errors = torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype)
        for j in range(b0, b1):
            if group and j % group == 0:
                scale, zero = _rtn_params(w[:, j : j + group], bits, symmetric)
            q[:, j] = _rtn(w[:, j : j + 1], scale, zero, bits)[:, 0]
            err = (w[:, j] - q[:, j]) / u[j, j]
            w[:, j:b1] -= err[:, None] * u[j, j:b1][None, :]
            errors[:, j - b0] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return q


def _correlated_inputs(n_tokens: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Layer inputs with correlated channels and a few loud ones, like an LLM's."""
    mix = torch.randn(dim, dim, generator=generator) / math.sqrt(dim) + torch.eye(dim)
    x = torch.randn(n_tokens, dim, generator=generator) @ mix
    x[:, :4] *= 8.0
    return x


@pytest.mark.parametrize(
    ("bits", "symmetric", "granularity", "group"),
    [(3, False, "channel", None), (4, True, "channel", None), (3, False, "group", 32), (2, False, "group", 128)],
)
@pytest.mark.parametrize("block", [32, 256])
def test_gptq_equals_the_papers_algorithm(bits, symmetric, granularity, group, block):
    generator = torch.Generator().manual_seed(bits * 100 + (group or 0))
    w = torch.randn(48, 256, generator=generator) * 0.05
    x = _correlated_inputs(1024, 256, generator)
    h = x.T @ x / x.shape[0]
    grid = QuantGrid("int", bits, symmetric, granularity, group, "absmax", None)
    ours = gptq_quantize(w, h, grid)[0]
    reference = reference_gptq(w, h, bits, symmetric, group, block).float()
    # float32 vs float64 may flip a rounding tie now and then; everything else is equal.
    close = torch.isclose(ours, reference, atol=1e-6, rtol=1e-5)
    assert close.float().mean() > 0.999, f"{(~close).sum()} of {close.numel()} weights differ"
    assert output_error(w, ours, h) == pytest.approx(output_error(w, reference, h), rel=1e-3)


# ---- grids ----------------------------------------------------------------

#: NF4 as published with QLoRA (Dettmers et al. 2023, Appendix E; bitsandbytes' table).
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


def test_nf4_is_the_published_table():
    assert torch.allclose(float_levels("nf4", 4), torch.tensor(NF4_PUBLISHED), atol=1e-6, rtol=0)


def _minifloat_values(exponent_bits: int, mantissa_bits: int, bias: int) -> set[float]:
    """Every finite value of a sign/exponent/mantissa format with subnormals and no
    infinities, from the formula (OCP MX spec): exponent field 0 is subnormal."""
    values = set()
    for e in range(2**exponent_bits):
        for m in range(2**mantissa_bits):
            magnitude = (
                (m / 2**mantissa_bits) * 2 ** (1 - bias) if e == 0 else (1 + m / 2**mantissa_bits) * 2 ** (e - bias)
            )
            values |= {magnitude, -magnitude}
    return values


def test_fp4_e2m1_is_the_ocp_grid():
    expected = sorted(_minifloat_values(exponent_bits=2, mantissa_bits=1, bias=1))
    assert float_levels("fp", 4).tolist() == expected
    assert expected[-8:] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_fp8_e4m3_is_the_ocp_grid():
    values = _minifloat_values(exponent_bits=4, mantissa_bits=3, bias=7)
    values -= {480.0, -480.0}  # S.1111.111 (1.875 x 2^8) is NaN in e4m3fn: the largest value is 448
    expected = sorted(values)
    levels = float_levels("fp", 8)
    assert levels.tolist() == expected
    assert len(expected) == 253 and expected[-1] == 448.0  # 256 codes - 2 NaNs - the second zero
    positive = levels[levels > 0]
    assert positive[0] == 2.0**-9 and positive[positive >= 2.0**-6][0] == 2.0**-6  # smallest subnormal, normal
    assert e4m3_round(torch.tensor([1000.0, -1000.0, 2.0**-11])).tolist() == [448.0, -448.0, 0.0]


# ---- AWQ and HQQ against their own objectives --------------------------------


def test_awq_scale_is_the_best_of_a_grid_search_on_its_objective():
    """AWQ's objective: the layer-output error of Q(W diag(s)) diag(s)^-1 over s = a^alpha.
    A fresh grid search over alpha (finer than AWQ's own) finds nothing much better,
    and alpha = 0 (round-to-nearest) is never better."""
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=generator) * 0.05
    x = _correlated_inputs(512, 128, generator)
    h = x.T @ x / x.shape[0]
    grid = QuantGrid("int", 3, False, "group", 32, "absmax", None)

    def quantize(s: torch.Tensor) -> torch.Tensor:
        scaled = w * s
        return from_blocks(quantize_blocks(to_blocks(scaled, "group", 32), grid), w.shape) / s

    chosen = output_error(w, quantize(awq_scale(w, h, quantize)), h)
    rms = torch.diag(h).sqrt()
    searched = min(output_error(w, quantize((rms**alpha).half().float()), h) for alpha in torch.linspace(0, 1, 81))
    assert chosen <= output_error(w, quantize(torch.ones(128)), h)
    assert chosen <= 1.02 * searched


def test_hqq_zero_points_beat_a_search_over_stored_zero_points():
    """HQQ's objective: sum |W - dequant(quant(W))|^0.7 with the scale fixed. Its
    fractional zero points do no worse than the best integer zero point of each
    block, found by trying every one."""
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(256, 64, generator=generator) * 0.02
    w[torch.rand(w.shape, generator=generator) < 0.01] *= 10  # heavy tails, where the lp norm matters
    grid = QuantGrid("int", 3, False, "group", 64, "absmax", None)
    lo, hi = block_range(w, grid)
    scale, rtn_zero = affine_params(lo, hi, grid.bits)
    hqq_zero = optimize_zero(w, 1.0 / scale, rtn_zero, qmax=7).half().float()

    def lp(zero: torch.Tensor) -> torch.Tensor:  # per block
        return (w - quantize_on_grid(w, scale, zero, grid)).abs().pow(0.7).sum(dim=1)

    best_integer = torch.stack([lp(torch.full_like(rtn_zero, z)) for z in range(8)]).min(dim=0).values
    assert lp(hqq_zero).sum() <= best_integer.sum()
    assert lp(hqq_zero).sum() < lp(rtn_zero).sum()
