"""Rounding methods (GPTQ, AWQ, HQQ) against round-to-nearest, each on its own objective,
and on every architecture family."""

from __future__ import annotations

import pytest
import torch

from qopt.bits import layer_cost
from qopt.calibration import collect_activation_stats
from qopt.errors import QoptError
from qopt.quant import fake_quantize_weight, gptq, input_transform
from qopt.quant.awq import output_error
from qopt.quant.gptq import gptq_quantize
from qopt.quant.hqq import hqq_quantize_in_range, optimize_zero
from qopt.quant.outliers import topk_mask
from qopt.quant.scales import affine_params, block_range, from_blocks, to_blocks
from qopt.quantizer import Quantizer
from qopt.strategy import LayerConfig, Strategy, uniform
from tests.conftest import random_split, tiny_model

LAYERS = ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj")


@pytest.fixture(scope="module")
def calibrated():
    """A tiny Llama and its layers' input Hessians on random token windows."""
    lm = tiny_model("llama")
    stats = collect_activation_stats(lm, random_split(n_search=8, seq_len=64).search, hessians=True)
    return lm, stats


def _quantized(lm, stats, name: str, config: LayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    w = lm.unit(name).read_weight().float()
    hessian = stats.hessian[name]
    transform = input_transform(config.quantization(), w, stats.absmax[name], hessian)
    return w, fake_quantize_weight(w, config.quantization(), transform, hessian=hessian)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("genes", [dict(group_size=32), dict(granularity="channel", symmetric=True)])
def test_gptq_reconstructs_layer_outputs_better_than_rtn(calibrated, name, bits, genes):
    lm, stats = calibrated
    rtn = LayerConfig().evolve(bits=bits, **genes)
    w, w_rtn = _quantized(lm, stats, name, rtn)
    _, w_gptq = _quantized(lm, stats, name, rtn.evolve(rounding="gptq"))
    h = stats.hessian[name]
    assert output_error(w, w_gptq, h) < 0.9 * output_error(w, w_rtn, h)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Hessian has nothing to compensate with: every column rounds alone."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(24, 96, generator=generator)
    hessian = torch.diag(torch.rand(96, generator=generator) + 0.5)
    for genes in (dict(group_size=32), dict(granularity="channel"), dict(granularity="tensor", symmetric=True)):
        config = LayerConfig().evolve(bits=3, **genes)
        assert torch.allclose(
            gptq_quantize(w, hessian, config.grid())[0], fake_quantize_weight(w, config.quantization()), atol=1e-6
        )


def test_gptq_reuses_a_hessians_factor_only_for_that_hessian(calibrated):
    """The inverse-Hessian factor is memoised by content: the same Hessian (a new tensor) hits,
    an equal-shaped other one (another layer, or a rotated basis) gets its own, and GPTQ's
    result does not depend on whether the factor came from the memo."""
    lm, stats = calibrated
    name = LAYERS[0]
    w, hessian = lm.unit(name).read_weight().float(), stats.hessian[name]
    grid = LayerConfig().evolve(bits=3, group_size=32).grid()
    gptq._factors.clear()
    fresh = gptq_quantize(w, hessian, grid)[0]
    assert torch.equal(gptq_quantize(w, hessian.clone(), grid)[0], fresh) and len(gptq._factors) == 1
    other = hessian + torch.diag(hessian.diagonal())  # same shape, other content
    assert not torch.equal(gptq.inverse_factor(other)[1], gptq.inverse_factor(hessian)[1])
    assert len(gptq._factors) == 2


def test_gptq_keeps_outliers_in_fp16_and_zeroes_dead_inputs(calibrated):
    lm, stats = calibrated
    name = LAYERS[0]
    hessian = stats.hessian[name].clone()
    hessian[5, :] = hessian[:, 5] = 0.0  # input channel 5 never fires
    w = lm.unit(name).read_weight().float()
    config = LayerConfig().evolve(bits=3, group_size=32, outliers="topk", topk_fraction=0.02, rounding="gptq")
    w_hat = fake_quantize_weight(w, config.quantization(), hessian=hessian)
    kept = topk_mask(w, 0.02)
    kept[:, 5] = False
    # A kept weight is stored as fp16 after the compensation it received.
    assert torch.equal(w_hat[kept], w_hat[kept].half().float())
    assert torch.all(w_hat[:, 5] == 0)
    w_rtn = fake_quantize_weight(w, config.evolve(rounding="nearest").quantization())
    assert output_error(w, w_hat, hessian) < output_error(w, w_rtn, hessian)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bits", [3, 4])
def test_awq_scaling_lowers_output_error_below_rtn(calibrated, name, bits):
    lm, stats = calibrated
    rtn = LayerConfig().evolve(bits=bits, group_size=32)
    w, w_rtn = _quantized(lm, stats, name, rtn)
    _, w_awq = _quantized(lm, stats, name, rtn.evolve(rounding="awq"))
    h = stats.hessian[name]
    assert output_error(w, w_awq, h) < output_error(w, w_rtn, h)


@pytest.mark.parametrize("outliers", ["none", "smooth", "rotate"])
def test_awq_transform_preserves_the_product(calibrated, outliers):
    lm, stats = calibrated
    name = LAYERS[1]
    config = LayerConfig().evolve(bits=3, group_size=32, outliers=outliers, rounding="awq")
    w = lm.unit(name).read_weight().float()
    transform = input_transform(config.quantization(), w, stats.absmax[name], stats.hessian[name])
    assert transform is not None and transform.scale is not None
    x = torch.randn(10, w.shape[1])
    product = transform.input_forward(x) @ transform.weight_forward(w).T
    assert torch.allclose(product, x @ w.T, atol=1e-4)


def _lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float = 0.7) -> float:
    valid = ~torch.isnan(w)
    return float((w - w_hat)[valid].abs().pow(p).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_hqq_lowers_its_lp_error_below_rtn(bits, group_size):
    generator = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 172, generator=generator) * 0.02  # 172 = 2 x 64 + 44: short groups too
    w[3, 7] = 0.3
    config = LayerConfig().evolve(bits=bits, group_size=group_size)
    blocks = to_blocks(w, "group", group_size)
    rtn = from_blocks(to_blocks(fake_quantize_weight(w, config.quantization()), "group", group_size), w.shape)
    hqq = fake_quantize_weight(w, config.evolve(rounding="hqq").quantization())
    assert _lp_error(w, hqq) < 0.97 * _lp_error(w, rtn)
    assert hqq.shape == w.shape and torch.isfinite(hqq).all() and blocks.shape[1] == group_size


def test_hqq_skips_padding_and_kept_outliers():
    w = torch.randn(8, 40) * 0.02
    blocks = to_blocks(w, "group", 32)  # second group of each row: 8 values + 24 NaN
    blocks[0, :4] = float("nan")  # four kept outliers
    config = LayerConfig().evolve(bits=3, group_size=32, rounding="hqq")
    out = hqq_quantize_in_range(blocks, *block_range(blocks, config.grid()), config.grid())
    assert torch.equal(torch.isnan(out), torch.isnan(blocks))
    assert torch.isfinite(out[~torch.isnan(blocks)]).all()


def test_hqq_zero_points_match_the_hqq_package():
    hqq_optimize = pytest.importorskip("hqq.core.optimize")
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randn(96, 64, generator=generator) * 0.02
    for bits in (2, 3, 4):
        qmax = 2**bits - 1
        lo, hi = block_range(blocks, LayerConfig().evolve(bits=bits, group_size=64).grid())
        scale, _ = affine_params(lo, hi, bits)
        inv_scale, zero = 1.0 / scale, -lo / scale
        ours = optimize_zero(blocks, inv_scale, zero, qmax)
        _, _, theirs = hqq_optimize.optimize_weights_proximal_legacy(
            blocks, inv_scale.clone(), zero.clone(), min_max=[0, qmax], axis=1, device="cpu"
        )
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


ROUNDINGS = ("gptq", "awq", "hqq")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_method_runs_on_every_family(arch, rounding):
    lm = tiny_model(arch)
    split = random_split()
    ids = split.eval
    with torch.inference_mode():
        before = lm.model(input_ids=ids).logits
    quantizer = Quantizer(lm, calibrate=lambda hessians: collect_activation_stats(lm, split.search, hessians=hessians))
    with quantizer.applied(uniform(4, group_size=32, rounding=rounding)):
        with torch.inference_mode():
            during = lm.model(input_ids=ids).logits
    with torch.inference_mode():
        after = lm.model(input_ids=ids).logits
    assert torch.isfinite(during).all() and not torch.equal(during, before)
    assert torch.equal(after, before)
    ref, new = torch.log_softmax(before, -1), torch.log_softmax(during, -1)
    assert float((ref.exp() * (ref - new)).sum(-1).mean()) < 0.5


def test_only_awq_stores_side_data():
    base = LayerConfig().evolve(bits=4, group_size=64)
    plain = layer_cost(64, 172, base)
    assert layer_cost(64, 172, base.evolve(rounding="gptq")) == plain
    assert layer_cost(64, 172, base.evolve(rounding="hqq")) == plain
    assert layer_cost(64, 172, base.evolve(rounding="awq")).side == plain.side + 16 * 172


def test_hessian_methods_need_a_matmul_and_calibration():
    lm = tiny_model("llama")
    with pytest.raises(QoptError, match=r"roles\.embed\.rounding: gptq needs a matmul input"):
        Strategy(roles={"embed": LayerConfig().evolve(bits=4, group_size=32, rounding="gptq")}).resolve(lm.units)
    with pytest.raises(QoptError, match="need calibration data"):
        Quantizer(lm).apply(uniform(4, group_size=32, rounding="awq"))
