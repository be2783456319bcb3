"""The README's claims, measured on the real stories260K model and TinyStories text."""

from __future__ import annotations

import pytest

from qopt.data import load_text
from qopt.evaluate import EvalSettings, Evaluator
from qopt.strategy import Strategy, uniform
from tests.conftest import TINYSTORIES


@pytest.fixture(scope="module")
def evaluator(stories):
    settings = EvalSettings(eval_windows=24)
    return Evaluator.from_text(stories, load_text(str(TINYSTORIES)), settings)


@pytest.fixture(scope="module")
def results(evaluator):
    strategies = {
        "fp16": Strategy(),
        "int8": uniform(8, group_size=64),
        "int4": uniform(4, group_size=64),
        "int3": uniform(3, group_size=64),
        "int4-keep1%": uniform(4, group_size=64, outliers="topk", topk_fraction=0.01),
        "int4-g32": uniform(4, group_size=32),
    }
    return {name: evaluator.evaluate(s, "eval") for name, s in strategies.items()}


def test_fp16_is_the_model_itself(results):
    fp = results["fp16"]
    assert fp.kl == 0.0 and fp.top1 == 1.0 and fp.ppl == fp.fp_ppl and fp.bpw == 16.0


def test_int8_within_one_percent(results):
    assert abs(results["int8"].ppl / results["fp16"].ppl - 1) < 0.01


def test_fewer_bits_degrade_in_order(results):
    assert results["int8"].kl < results["int4"].kl < results["int3"].kl
    assert results["int8"].ppl < results["int4"].ppl < results["int3"].ppl
    assert results["int4"].bpw > results["int3"].bpw


@pytest.mark.parametrize("richer", ["int4-keep1%", "int4-g32"])
def test_outliers_and_finer_groups_buy_quality_with_bits(results, richer):
    assert results[richer].kl < results["int4"].kl
    assert results[richer].bpw > results["int4"].bpw


def test_search_and_eval_parts_are_disjoint(evaluator):
    search = {tuple(w.tolist()) for w in evaluator.split.search}
    assert not search & {tuple(w.tolist()) for w in evaluator.split.eval}
