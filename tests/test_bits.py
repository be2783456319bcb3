"""True bits per weight: the known formulas, and model-level sums."""

from __future__ import annotations

import math

import pytest

from qopt.bits import layer_cost, model_cost
from qopt.strategy import FP16, LayerConfig, Strategy, uniform
from tests.conftest import tiny_model


def test_int4_group128_with_fp16_scale_and_zero_is_4_25_bpw():
    cost = layer_cost(4096, 4096, LayerConfig().evolve(bits=4, group_size=128))
    assert cost.bpw == 4.25


@pytest.mark.parametrize(
    "genes, out, inp, expected",
    [
        (dict(bits=4, group_size=128, symmetric=True), 256, 1024, 4 + 16 / 128),
        (dict(bits=3, group_size=64), 256, 1024, 3 + 32 / 64),
        (dict(bits=8, granularity="channel"), 256, 1024, 8 + 32 / 1024),
        (dict(bits=2, granularity="tensor", symmetric=True), 256, 1024, 2 + 16 / (256 * 1024)),
        (dict(bits=4, format="nf4", group_size=64), 256, 1024, 4 + 16 / 64),
        (dict(bits=16), 256, 1024, 16.0),
    ],
)
def test_known_formulas(genes, out, inp, expected):
    assert layer_cost(out, inp, LayerConfig().evolve(**genes)).bpw == pytest.approx(expected, abs=1e-12)


def test_short_last_group_is_counted_as_a_whole_group():
    # 172 inputs in groups of 64: three groups per row (64 + 64 + 44), each with scale and zero.
    cost = layer_cost(64, 172, LayerConfig().evolve(bits=4, group_size=64))
    assert cost.scales == 64 * 3 * 16 and cost.zeros == 64 * 3 * 16
    assert cost.bpw == pytest.approx(4 + 64 * 3 * 32 / (64 * 172))


def test_outliers_cost_value_and_index():
    n = 256 * 1024
    cost = layer_cost(256, 1024, LayerConfig().evolve(bits=4, group_size=128, outliers="topk", topk_fraction=0.01))
    k = math.ceil(n * 0.01)
    assert cost.outliers == k * (16 + 18)  # 2^18 positions need 18 index bits
    assert cost.bpw == pytest.approx(4.25 + k * 34 / n)


def test_smoothing_factors_are_side_data():
    cost = layer_cost(256, 1024, LayerConfig().evolve(bits=4, group_size=128, outliers="smooth"))
    assert cost.side == 1024 * 16
    rotated = layer_cost(256, 1024, LayerConfig().evolve(bits=4, group_size=128, outliers="rotate"))
    assert rotated.side == 0


def test_model_cost_separates_edges_and_counts_tied_weights_once():
    lm = tiny_model("llama")  # tied embedding and head
    strategy = Strategy(
        default=LayerConfig().evolve(bits=4, group_size=32),
        roles={"embed": LayerConfig().evolve(bits=8, group_size=32)},
    )
    cost = model_cost(lm.units, strategy.resolve(lm.units), lm.other_params)
    assert cost.bpw == pytest.approx(4 + 32 / 32)
    assert cost.embed.n_weights == 96 * 64 and cost.embed.bpw == pytest.approx(8 + 32 / 32)
    assert cost.head.n_weights == 0
    n_params = sum(p.numel() for p in lm.model.parameters())  # parameters() yields the tied tensor once
    assert cost.blocks.n_weights + cost.embed.n_weights + lm.other_params == n_params
    fp = model_cost(lm.units, Strategy().resolve(lm.units), lm.other_params)
    assert fp.total_bytes == 2 * n_params


def test_untied_head_is_reported_separately():
    lm = tiny_model("qwen2")
    cost = model_cost(lm.units, uniform(4, group_size=32).resolve(lm.units))
    assert cost.head.n_weights == 96 * 64 and cost.head.bpw == 16.0
    assert cost.embed.bpw == 16.0 and FP16.bits == 16
