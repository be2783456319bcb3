"""Multi-fidelity screening: a hopeless strategy costs its first batch, not the whole part."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from qopt import study as qstudy
from qopt.evaluate import EvalSettings, Evaluator, Rejected
from qopt.space import SearchConfig
from qopt.strategy import FP16, uniform
from tests.conftest import random_split, tiny_model

SEQ_LEN = 32


def _evaluator(screen_windows: int) -> Evaluator:
    settings = EvalSettings(batch_size=2, screen_windows=screen_windows)
    return Evaluator(tiny_model("llama"), random_split(seq_len=SEQ_LEN), settings)


def test_a_verdict_stops_a_strategy_after_the_first_batch():
    evaluator = _evaluator(screen_windows=1)
    full = evaluator.evaluate(uniform(3, group_size=32))
    seen = []

    def verdict(kl: float) -> str | None:
        seen.append(kl)
        return "hopeless" if kl > 0 else None

    with pytest.raises(Rejected, match="hopeless") as stopped:
        evaluator.evaluate(uniform(3, group_size=32), verdict=verdict)
    assert stopped.value.tokens == SEQ_LEN and stopped.value.kl == seen[0] == full.screen_kl
    passed = evaluator.evaluate(uniform(3, group_size=32), verdict=lambda kl: None)
    assert (passed.kl, passed.ppl, passed.top1, passed.tokens) == (full.kl, full.ppl, full.top1, full.tokens)


def test_no_verdict_when_the_first_batch_is_the_whole_part():
    evaluator = _evaluator(screen_windows=4)  # the search part has 4 windows
    m = evaluator.evaluate(uniform(3, group_size=32), verdict=lambda kl: "would stop")
    assert m.tokens == 4 * SEQ_LEN and m.screen_kl == m.kl


def test_a_study_screens_dominated_trials_and_records_fidelity(tiny_llama_dir, small_text, tmp_path):
    config = qstudy.StudyConfig(
        model=str(tiny_llama_dir),
        data=str(small_text),
        population=6,
        seed=1,
        screen_margin=1.0,  # strict, so that some trials are screened out
        baselines=(3, 4),
        eval=EvalSettings(
            seq_len=64, search_windows=6, eval_windows=2, calib_windows=2, batch_size=4, screen_windows=2
        ),
        search=SearchConfig(group_sizes=(16, 32), base=FP16.evolve(bits=4, group_size=32)),
    )
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    qstudy.create("s", config, url)
    qstudy.launch("s", n_trials=30, url=url, progress=False)
    trials = optuna.load_study(study_name="s", storage=url).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    screened = [t for t in trials if "screened out" in t.user_attrs.get("rejected", "")]
    assert screened and len(done) >= 2
    assert all(t.user_attrs["fidelity"] == 6 * 64 for t in done)
    assert all(t.state == TrialState.PRUNED and t.user_attrs["fidelity"] == 2 * 64 for t in screened)
    assert not any("baseline" in t.user_attrs for t in screened)
    for t in screened:  # some trial finished before it, with no more bpw, was better on the same windows
        rivals = [
            r.user_attrs["screen_kl"]
            for r in done
            if r.datetime_complete < t.datetime_start and r.user_attrs["bpw"] <= t.user_attrs["bpw"]
        ]
        assert rivals and t.user_attrs["screen_kl"] > min(rivals)
