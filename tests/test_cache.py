"""Caches change how fast strategies are judged, never what they score."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qopt import evaluate as qevaluate
from qopt.cache import CalibrationCache, WeightCache, model_fingerprint
from qopt.evaluate import EvalSettings, Evaluator, Metrics
from qopt.strategy import FP16, Strategy, uniform
from tests.conftest import random_split, tiny_model

BASE = FP16.evolve(bits=3, group_size=32)
LAYER = "model.layers.1.mlp.down_proj"


def _strategies() -> list[Strategy]:
    """A parent, children differing in one layer (each numerics path), and the parent again."""
    children = [
        {"rounding": "gptq"},
        {"rounding": "awq"},
        {"rounding": "stochastic"},
        {"outliers": "smooth", "smooth_alpha": 0.5, "act_format": "int", "act_bits": 8},
        {"outliers": "rotate", "accumulation": "fp16"},
        {"outliers": "topk", "topk_fraction": 0.01, "scale": "mse"},
    ]
    parent = Strategy(default=BASE)
    return [parent] + [Strategy(default=BASE, layers={LAYER: BASE.evolve(**c)}) for c in children] + [parent]


def _scores(m: Metrics) -> Metrics:
    return dataclasses.replace(m, seconds=0.0, quantize_seconds=0.0)


def _evaluator(cache_mib: int, calibration_cache: bool = False) -> Evaluator:
    settings = EvalSettings(
        batch_size=2, screen_windows=1, weight_cache_mib=cache_mib, calibration_cache=calibration_cache
    )
    return Evaluator(tiny_model("llama"), random_split(), settings)


def test_cached_and_uncached_evaluation_give_identical_metrics():
    cached, uncached = _evaluator(64), _evaluator(0)
    for strategy in _strategies():
        for part in ("search", "eval"):
            assert _scores(cached.evaluate(strategy, part)) == _scores(uncached.evaluate(strategy, part))
    assert cached.quantizer.cache.hits > 0 and uncached.quantizer.cache.hits == 0


def test_a_child_requantizes_only_the_layers_that_changed():
    evaluator = _evaluator(64)
    parent, child = _strategies()[0], _strategies()[3]  # child: stochastic rounding on one layer
    evaluator.evaluate(parent)
    cache = evaluator.quantizer.cache
    misses = cache.misses
    evaluator.evaluate(child)
    assert cache.misses - misses == 1
    evaluator.evaluate(parent)
    assert cache.misses - misses == 1  # the parent again: all hits


def test_weight_cache_evicts_least_recently_used_within_its_bound():
    cache = WeightCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100), 400)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100), 400)
    assert cache.get("b") is None and cache.get("a") is not None and cache.bytes == 1200
    cache.put("huge", torch.zeros(1000), 4000)  # larger than the bound: not kept
    assert cache.get("huge") is None and cache.get("c") is not None


def test_calibration_statistics_are_read_back_from_disk(monkeypatch):
    gptq = Strategy(default=BASE.evolve(rounding="gptq"))
    first = _evaluator(0, calibration_cache=True)
    expected = first.evaluate(gptq)
    stats = first.quantizer.activation_stats(hessians=True)

    def no_collection(*args, **kwargs):
        raise AssertionError("statistics were collected again instead of read from the cache")

    monkeypatch.setattr(qevaluate, "collect_activation_stats", no_collection)
    second = _evaluator(0, calibration_cache=True)
    assert _scores(second.evaluate(gptq)) == _scores(expected)
    again = second.quantizer.activation_stats(hessians=True)
    assert again.n_tokens == stats.n_tokens
    for name, h in stats.hessian.items():
        assert torch.equal(again.hessian[name], h) and torch.equal(again.absmax[name], stats.absmax[name])


def test_calibration_cache_key_follows_the_weights_and_the_tokens(tmp_path):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert model_fingerprint(a.model) == model_fingerprint(tiny_model("llama", seed=0).model)
    assert model_fingerprint(a.model) != model_fingerprint(b.model)
    cache = CalibrationCache(tmp_path)
    assert cache.path("m", "t", True) != cache.path("m", "t", False) != cache.path("m", "u", False)
    path = cache.path("m", "t", False)
    path.mkdir(parents=True)
    (path / "stats.json").write_text('{"n_tokens": 4, "hessians": false}')
    (path / "absmax.safetensors").write_bytes(b"not a safetensors file")  # e.g. a damaged disk
    assert cache.load(path) is None
    assert cache.load(cache.path("m", "u", True)) is None  # never written


@pytest.mark.parametrize("bad", [{"screen_windows": 0}, {"weight_cache_mib": -1}, {"batch_size": 0}])
def test_bad_eval_settings_are_refused(bad):
    with pytest.raises(Exception, match=next(iter(bad))):
        EvalSettings(**bad)


def test_uniform_strategy_unchanged_by_the_cache_after_eviction():
    """A cache too small for one model's weights still gives the same scores."""
    tiny = _evaluator(0)
    small = Evaluator(tiny_model("llama"), random_split(), dataclasses.replace(tiny.settings, weight_cache_mib=1))
    small.quantizer.cache.max_bytes = 20_000  # about one 64x64 fp32 layer
    for strategy in (uniform(4, group_size=32), uniform(3, group_size=32), uniform(4, group_size=32)):
        assert _scores(small.evaluate(strategy)) == _scores(tiny.evaluate(strategy))
