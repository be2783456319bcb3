"""The numerics, one function at a time, on random matrices."""

from __future__ import annotations

import math

import pytest
import torch

from qopt.quant import fake_quantize_activations, fake_quantize_weight, input_transform, lowprec_linear, scales
from qopt.quant.formats import e4m3_round, float_levels
from qopt.quant.outliers import rotation_matrix, topk_mask
from qopt.quant.rounding import round_to_levels
from qopt.quant.scales import from_blocks, quantize_blocks, to_blocks
from qopt.strategy import LayerConfig


def _weight(rows: int = 48, cols: int = 172, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 0.02
    w[min(3, rows - 1), 7] = 0.4  # an outlier, as real LLM weights have
    return w


def _mse(w: torch.Tensor, config: LayerConfig) -> float:
    recipe = config.quantization()
    return float(((fake_quantize_weight(w, recipe, input_transform(recipe, w)) - w) ** 2).mean())


FAMILIES = [
    dict(),
    dict(symmetric=True),
    dict(granularity="channel"),
    dict(granularity="tensor"),
    dict(group_size=32, scale="mse"),
    dict(group_size=32, scale="percentile"),
    dict(group_size=32, outliers="topk"),
    dict(group_size=32, outliers="rotate"),
]


@pytest.mark.parametrize("genes", FAMILIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()) or "int-asym-g128")
def test_error_falls_as_bits_rise(genes):
    w = _weight()
    errors = [_mse(w, LayerConfig().evolve(bits=b, **genes)) for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_float_formats_error_falls_with_bits():
    w = _weight()
    fp4 = _mse(w, LayerConfig().evolve(bits=4, format="fp", group_size=32))
    nf4 = _mse(w, LayerConfig().evolve(bits=4, format="nf4", group_size=32))
    fp8 = _mse(w, LayerConfig().evolve(bits=8, format="fp", group_size=32))
    assert fp8 < fp4 and fp8 < nf4
    # NF4 is built for normally distributed weights: it beats e2m1 on them.
    assert nf4 < fp4


def test_sixteen_bit_is_exact():
    w = _weight()
    assert fake_quantize_weight(w, LayerConfig(bits=16).quantization()) is w


def test_non_divisible_groups_quantize_each_group_alone():
    """172 = 2 x 64 + 44: the short last group gets its own scale from its own values."""
    config = LayerConfig().evolve(bits=3, group_size=64)
    w = _weight(rows=4, cols=172)
    out = fake_quantize_weight(w, config.quantization())
    assert out.shape == w.shape and torch.isfinite(out).all()
    bigger_head = w.clone()
    bigger_head[:, :128] *= 50  # changes only the first two groups
    out2 = fake_quantize_weight(bigger_head, config.quantization())
    assert torch.equal(out[:, 128:], out2[:, 128:])
    # and the last group alone is quantized exactly like a 44-wide matrix per channel
    alone = fake_quantize_weight(
        w[:, 128:].contiguous(), LayerConfig().evolve(bits=3, granularity="channel").quantization()
    )
    assert torch.equal(out[:, 128:], alone)


def test_blocks_round_trip_with_padding():
    w = _weight(rows=5, cols=172)
    blocks = to_blocks(w, "group", 64)
    assert blocks.shape == (5 * 3, 64)
    assert torch.isnan(blocks).sum() == 5 * 20
    assert torch.equal(from_blocks(blocks, w.shape), w)


def _reference_int_asym(x: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's asymmetric quantizer, one row at a time, written independently."""
    out = torch.empty_like(x)
    qmax = 2**bits - 1
    for i, row in enumerate(x):
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        scale = float(torch.tensor((hi - lo) / qmax).half().float())
        zero = round(-lo / scale)
        q = torch.clamp(torch.round(row / scale) + zero, 0, qmax)
        out[i] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_asym_matches_reference_formula(bits):
    w = _weight(rows=16, cols=128)
    config = LayerConfig().evolve(bits=bits, group_size=32)
    expected = _reference_int_asym(w.reshape(-1, 32), bits).reshape(w.shape)
    assert torch.allclose(fake_quantize_weight(w, config.quantization()), expected, atol=1e-7)


def test_symmetric_int_uses_signed_codes():
    w = _weight(rows=8, cols=64)
    out = fake_quantize_weight(w, LayerConfig().evolve(bits=4, symmetric=True, granularity="channel").quantization())
    scale = w.abs().amax(dim=1, keepdim=True) / 7.5
    codes = out / scale.half().float()
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -8 and codes.max() <= 7
    assert len(torch.unique(codes.round())) <= 16


def test_mse_scale_never_worse_than_absmax_per_block():
    w = _weight()
    base = LayerConfig().evolve(bits=3, group_size=32)
    blocks = to_blocks(w, "group", 32)
    err_absmax = ((quantize_blocks(blocks, base.grid()) - blocks) ** 2).nansum(dim=1)
    err_mse = ((quantize_blocks(blocks, base.evolve(scale="mse").grid()) - blocks) ** 2).nansum(dim=1)
    assert (err_mse <= err_absmax + 1e-12).all()
    assert err_mse.sum() < err_absmax.sum()


def test_mse_scale_search_is_the_same_in_any_chunking(monkeypatch):
    """The clip search tries all factors per pass over a bounded chunk of blocks; the chunk
    size must not change a single scale (NaN padding and a short last group included)."""
    w = _weight()
    w[0, :5] = float("nan")
    grid = LayerConfig().evolve(bits=3, group_size=24, scale="mse").grid()
    blocks = to_blocks(w, "group", 24)
    whole = quantize_blocks(blocks, grid)
    monkeypatch.setattr(scales, "_MSE_CHUNK", 11 * 24 * 3)  # three blocks per pass, a ragged last pass
    assert torch.equal(quantize_blocks(blocks, grid).nan_to_num(7.0), whole.nan_to_num(7.0))


def test_grids():
    nf4 = float_levels("nf4", 4)
    assert len(nf4) == 16 and nf4[0] == -1 and nf4[-1] == 1 and (nf4 == 0).any()
    e2m1 = float_levels("fp", 4)
    assert len(e2m1) == 15 and float(e2m1.max()) == 6.0
    e4m3 = float_levels("fp", 8)
    assert float(e4m3.max()) == 448.0 and len(e4m3) == 253  # 256 codes - 2 NaN - one duplicate zero


def test_e4m3_cast_and_grid_rounding_agree():
    x = torch.randn(10_000) * 100
    assert torch.equal(e4m3_round(x), round_to_levels(x, float_levels("fp", 8)))


def test_stochastic_rounding_is_unbiased_and_seeded():
    w = _weight(rows=1, cols=64).repeat(4000, 1)
    config = LayerConfig().evolve(bits=3, granularity="channel", rounding="stochastic")
    out = fake_quantize_weight(w, config.quantization(), generator=torch.Generator().manual_seed(1))
    nearest = fake_quantize_weight(w, config.evolve(rounding="nearest").quantization())
    bias_stochastic = float((out.mean(dim=0) - w[0]).abs().mean())
    bias_nearest = float((nearest.mean(dim=0) - w[0]).abs().mean())
    assert bias_stochastic < bias_nearest / 5
    again = fake_quantize_weight(w, config.quantization(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_topk_keeps_largest_weights_in_fp16():
    w = _weight()
    config = LayerConfig().evolve(bits=2, group_size=32, outliers="topk", topk_fraction=0.01)
    mask = topk_mask(w, 0.01)
    assert mask.sum() == math.ceil(w.numel() * 0.01)
    assert mask[3, 7]  # the planted outlier
    out = fake_quantize_weight(w, config.quantization())
    assert torch.equal(out[mask], w[mask].half().float())


@pytest.mark.parametrize("n", [64, 96, 172, 768])
def test_rotation_is_orthogonal(n):
    r = rotation_matrix(n).double()
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("outliers", ["smooth", "rotate"])
def test_input_transforms_preserve_the_product(outliers):
    w = _weight(rows=32, cols=96)
    x = torch.randn(10, 96)
    x[:, 5] *= 30  # an activation outlier channel
    config = LayerConfig().evolve(bits=4, group_size=32, outliers=outliers)
    transform = input_transform(config.quantization(), w, act_absmax=x.abs().amax(dim=0))
    product = transform.input_forward(x) @ transform.weight_forward(w).T
    assert torch.allclose(product, x @ w.T, atol=1e-5)
    assert torch.allclose(transform.weight_inverse(transform.weight_forward(w)), w, atol=1e-6)


def test_smoothing_needs_statistics():
    config = LayerConfig().evolve(bits=4, group_size=32, outliers="smooth")
    with pytest.raises(ValueError, match="activation statistics"):
        input_transform(config.quantization(), _weight())


@pytest.mark.parametrize("fmt,bits", [("int", 8), ("int", 4), ("fp", 8)])
def test_activation_quantization_is_per_token(fmt, bits):
    x = torch.randn(6, 64)
    x[0] *= 1000  # one loud token must not wreck the others
    out = fake_quantize_activations(x, fmt, bits)
    rel = (out - x).norm(dim=1) / x.norm(dim=1)
    assert (rel < {4: 0.2, 8: 0.05}[bits]).all()


def test_lowprec_accumulation_rounds_partial_sums():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 512, generator=generator)
    w = torch.randn(32, 512, generator=generator)
    exact = x @ w.T
    fp16 = lowprec_linear(x, w, None, "fp16")
    bf16 = lowprec_linear(x, w, None, "bf16")
    err16 = float((fp16 - exact).abs().max())
    errbf = float((bf16 - exact).abs().max())
    assert 0 < err16 < errbf < 1.0
    bias = torch.randn(32)
    assert torch.allclose(lowprec_linear(x, w, bias, "fp16") - bias, fp16)
