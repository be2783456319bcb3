"""The Evaluator on tiny models, and the data split."""

from __future__ import annotations

import math

import pytest
import torch

from qopt.data import TokenSplit, load_text, split_windows
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator
from qopt.strategy import Strategy, uniform
from tests.conftest import random_split, tiny_model


@pytest.fixture
def evaluator():
    return Evaluator(tiny_model("llama"), random_split(), EvalSettings(batch_size=3))


def test_unquantized_strategy_scores_zero_kl(evaluator):
    m = evaluator.evaluate(Strategy(), "eval")
    assert m.kl == 0.0 and m.top1 == 1.0 and m.ppl == m.fp_ppl
    assert m.tokens == 4 * 32 and m.bpw == 16.0


def test_quantization_raises_kl_and_is_deterministic(evaluator):
    m3 = evaluator.evaluate(uniform(3, group_size=32), "search")
    m8 = evaluator.evaluate(uniform(8, group_size=32), "search")
    assert 0 < m8.kl < m3.kl and m3.top1 < 1.0
    again = evaluator.evaluate(uniform(3, group_size=32), "search")
    assert (again.kl, again.ppl, again.top1) == (m3.kl, m3.ppl, m3.top1)


def test_ppl_matches_a_direct_computation(evaluator):
    lm, windows = evaluator.lm, evaluator.split.eval
    with torch.inference_mode():
        loss = lm.model(input_ids=windows, labels=windows).loss  # mean next-token NLL
    m = evaluator.evaluate(Strategy(), "eval")
    assert m.fp_ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_evaluation_leaves_the_model_unquantized(evaluator):
    ids = evaluator.split.eval
    with torch.inference_mode():
        before = evaluator.lm.model(input_ids=ids).logits
        evaluator.evaluate(uniform(2, group_size=32, act_format="int"), "eval")
        assert torch.equal(evaluator.lm.model(input_ids=ids).logits, before)


def test_bad_strategy_is_rejected_before_any_work(evaluator):
    with pytest.raises(QoptError, match="group_size"):
        evaluator.evaluate(uniform(4, group_size=128), "eval")
    assert not evaluator._references


def test_split_is_disjoint_contiguous_and_seeded():
    ids = torch.arange(10_000)
    split = split_windows(ids, seq_len=100, search_fraction=0.3, max_windows=(5, 7), seed=3)
    assert split.search.shape == (5, 100) and split.eval.shape == (7, 100)
    assert split.search.max() < 3000 <= split.eval.min()
    again = split_windows(ids, seq_len=100, search_fraction=0.3, max_windows=(5, 7), seed=3)
    assert torch.equal(split.eval, again.eval)
    other = split_windows(ids, seq_len=100, search_fraction=0.3, max_windows=(5, 7), seed=4)
    assert not torch.equal(split.eval, other.eval)
    with pytest.raises(QoptError, match="too short"):
        split_windows(torch.arange(50), seq_len=100)


def test_text_sources(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text('["a", "", "b"]')
    assert load_text(str(rows)) == "a\n\n\n\nb"
    with pytest.raises(QoptError, match="does not exist"):
        load_text(str(tmp_path / "none.txt"))
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(QoptError, match="list of strings"):
        load_text(str(tmp_path / "bad.json"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(QoptError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))


def test_calibration_windows_apart_are_neither_searched_nor_validating():
    ids = torch.arange(40 * 16)
    split = split_windows(ids, 16, 0.5, (8, 8), seed=1, validation_windows=5, calibration_windows=4)
    before = split_windows(ids, 16, 0.5, (8, 8), seed=1, validation_windows=5)
    assert torch.equal(split.search, before.search) and torch.equal(split.validation, before.validation)
    assert split.calibration.shape == (4, 16)
    taken = {tuple(w.tolist()) for w in (*split.search, *split.validation)}
    for window in split.calibration:
        assert max(window.tolist()) < 20 * 16 and tuple(window.tolist()) not in taken
    short = split_windows(ids, 16, 0.5, (8, 8), seed=1, validation_windows=5, calibration_windows=50)
    assert len(short.calibration) == 20 - 8 - 5  # as many as the search half has left


@pytest.mark.parametrize("source", ["search", "apart"])
def test_calibration_statistics_come_from_the_configured_windows(source):
    from qopt.calibration import collect_activation_stats

    lm = tiny_model("llama")
    split = random_split(n_search=6)
    split = TokenSplit(search=split.search[:3], eval=split.eval, calibration=split.search[3:])
    settings = EvalSettings(batch_size=2, calib_windows=2, calibration=source, calibration_cache=False)
    evaluator = Evaluator(lm, split, settings)
    expected = split.search[:2] if source == "search" else split.calibration[:2]
    assert torch.equal(evaluator.calibration_windows, expected)
    got = evaluator.quantizer.activation_stats(hessians=True)
    direct = collect_activation_stats(lm, expected, batch_size=2, hessians=True)
    name = next(iter(direct.hessian))
    assert torch.allclose(got.hessian[name], direct.hessian[name])


def test_calibration_apart_without_spare_windows_is_refused():
    with pytest.raises(QoptError, match="apart needs 8 search-half windows"):
        Evaluator(tiny_model("llama"), random_split(), EvalSettings(calibration="apart"))
    with pytest.raises(QoptError, match="eval.calibration"):
        EvalSettings(calibration="eval")


def test_validation_windows_come_from_the_search_half_and_are_never_searched():
    ids = torch.arange(40 * 16)
    split = split_windows(ids, 16, 0.5, (8, 8), seed=1, validation_windows=5)
    before = split_windows(ids, 16, 0.5, (8, 8), seed=1)
    assert torch.equal(split.search, before.search) and torch.equal(split.eval, before.eval)  # unchanged
    assert split.validation.shape == (5, 16)
    search_half = set(range(20 * 16))
    seen = {tuple(w.tolist()) for w in split.search}
    for window in split.validation:
        assert set(window.tolist()) <= search_half and tuple(window.tolist()) not in seen
    empty = split_windows(ids, 16, 0.5, (None, None), validation_windows=5)
    with pytest.raises(QoptError, match="no validation windows"):
        empty.part("validation")
