"""Studies end to end on a tiny saved model: create, launch, resume, front, best, errors."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState

from qopt import study as qstudy
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings
from qopt.space import SearchConfig
from qopt.storage import connect
from qopt.strategy import FP16, Strategy

BUDGET = 3.5


@pytest.fixture
def config(tiny_llama_dir, small_text) -> qstudy.StudyConfig:
    return qstudy.StudyConfig(
        model=str(tiny_llama_dir),
        data=str(small_text),
        budget_bpw=BUDGET,
        population=6,
        seed=3,
        baselines=(2, 3, 4, 8),
        eval=EvalSettings(seq_len=64, search_windows=2, eval_windows=2, calib_windows=2, batch_size=2),
        search=SearchConfig(group_sizes=(16, 32, 64), base=FP16.evolve(bits=4, group_size=32)),
    )


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _pareto_ok(trials) -> bool:
    values = [t.values for t in trials]
    return not any(all(a <= b for a, b in zip(u, v, strict=True)) and u != v for u in values for v in values)


def test_twenty_trials_give_a_feasible_non_dominated_front(config, url):
    qstudy.create("s", config, url)
    assert qstudy.launch("s", n_trials=20, url=url, progress=False).completed > 0
    study, _ = qstudy.load("s", url)
    assert len(study.trials) == 20
    front = study.best_trials
    assert front and _pareto_ok(front)
    assert all(t.user_attrs["bpw"] <= BUDGET for t in front)
    baselines = [t for t in study.trials if "baseline" in t.user_attrs]
    assert [t.user_attrs["baseline"] for t in baselines][:4] == [
        "RTN int2 g32 asym", "RTN int3 g32 asym", "RTN int4 g32 asym", "RTN int8 g32 asym",
    ]  # fmt: skip
    assert all(t.state == TrialState.COMPLETE for t in baselines)  # never cut by the collapse cap
    # generated trials (not the over-budget baselines) all fit the budget
    assert all(t.user_attrs["bpw"] <= BUDGET for t in study.trials if "baseline" not in t.user_attrs)


def test_relaunch_adds_trials_and_survives_an_interrupt(config, url, monkeypatch):
    qstudy.create("s", config, url)
    qstudy.launch("s", n_trials=6, url=url, progress=False)
    original = qstudy.SearchRun.objective
    calls = {"n": 0}

    def interrupting(self, trial, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, trial, **kwargs)

    monkeypatch.setattr(qstudy.SearchRun, "objective", interrupting)
    with pytest.raises(KeyboardInterrupt):
        qstudy.launch("s", n_trials=6, url=url, progress=False)
    monkeypatch.setattr(qstudy.SearchRun, "objective", original)
    qstudy.launch("s", n_trials=6, url=url, progress=False)
    study, _ = qstudy.load("s", url)
    states = [t.state for t in study.trials]
    assert len(states) == 6 + 3 + 6  # the interrupted launch ran 2 trials and failed the 3rd
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states


def test_same_seed_same_trials(config, tmp_path):
    params = []
    for name in ("a", "b"):
        url = f"sqlite:///{tmp_path / name}.db"
        qstudy.create("s", config, url)
        qstudy.launch("s", n_trials=14, url=url, progress=False)
        params.append([t.params for t in qstudy.load("s", url)[0].trials])
    assert params[0] == params[1]


def test_create_is_idempotent_and_guards_its_config(config, url):
    qstudy.create("s", config, url)
    qstudy.create("s", config, url)  # same config: fine, nothing enqueued twice
    study, stored = qstudy.load("s", url)
    assert len(study.trials) == 4 and stored == config
    with pytest.raises(QoptError, match=r"already exists with a different config \(budget_bpw differs\)"):
        qstudy.create("s", dataclasses.replace(config, budget_bpw=3.0), url)


def test_bad_inputs(config, url, tmp_path):
    with pytest.raises(QoptError, match="no study database at .*studies.db; create a study first"):
        qstudy.load("missing", url)
    qstudy.create("s", config, url)
    with pytest.raises(QoptError, match="no study named 'missing'"):
        qstudy.load("missing", url)
    with pytest.raises(QoptError, match=r"budget_bpw: 1.0 is below the smallest bpw this search space can reach"):
        qstudy.create("low", dataclasses.replace(config, budget_bpw=1.0), url)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ndata: [1\n")
    with pytest.raises(QoptError, match="not valid YAML"):
        qstudy.StudyConfig.load(bad)
    bad.write_text("model: x\ndata: y\npopulaton: 3\n")
    with pytest.raises(QoptError, match="unknown key 'populaton'"):
        qstudy.StudyConfig.load(bad)
    bad.write_text("model: x\ndata: y\nobjectives: [bpw, kl]\n")
    with pytest.raises(QoptError, match="objectives"):
        qstudy.StudyConfig.load(bad)
    with pytest.raises(QoptError, match=r"baselines\[0\]\.bits"):
        dataclasses.replace(config, baselines=({"bits": 7},))


def test_front_and_best_rebuild_strategies_from_the_database(config, url, tiny_llama_dir):
    qstudy.create("s", config, url)
    qstudy.launch("s", n_trials=12, url=url, progress=False)
    members = qstudy.front("s", url)
    assert members and all(m.eval_kl >= 0 and m.eval_ppl > 0 for m in members)
    assert any(m.baseline for m in members)
    study, _ = qstudy.load("s", url)
    assert any(key.startswith("qopt:eval:") for key in study.user_attrs)  # computed once, stored
    trial, strategy = qstudy.best("s", max_bpw=BUDGET, url=url)
    assert trial.user_attrs["bpw"] <= BUDGET
    # the exported strategy reproduces the trial's search-part metrics exactly
    from qopt.data import load_text
    from qopt.evaluate import Evaluator
    from qopt.model import load_model

    evaluator = Evaluator.from_text(load_model(str(tiny_llama_dir)), load_text(config.data), config.eval)
    assert evaluator.evaluate(Strategy.from_dict(strategy.to_dict()), "search").kl == trial.values[0]


def test_storage_errors_name_the_url_without_password():
    with pytest.raises(QoptError) as info:
        connect("postgresql+psycopg://qopt:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert optuna.__version__.startswith("5")


def test_status_and_best_read_no_parameters_on_a_2000_trial_study(config, url, monkeypatch):
    """(Timings at 5,000 trials: scripts/bench_queries.py.)"""
    import numpy as np

    qstudy.create("big", config, url)
    qstudy.launch("big", n_trials=5, url=url, progress=False)
    study, _ = qstudy.load("big", url)
    real = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    rng = np.random.default_rng(0)
    trials = []
    for i in range(2000):
        kl, bpw = float(rng.random()), float(2 + 3 * rng.random())
        if i == 1000:  # the one best under 3 bpw: genes of a real trial, so it decodes to a strategy
            kl, bpw = -1.0, 2.5
        genes = dict(params=real.params, distributions=real.distributions) if i == 1000 else {}
        trials.append(optuna.trial.create_trial(values=[kl, bpw], user_attrs={"bpw": bpw}, **genes))
    study.add_trials(trials)
    done = [t for t in study.get_trials(states=(TrialState.COMPLETE,))]
    expected_front = int(qstudy.non_dominated([t.values for t in done if t.user_attrs["bpw"] <= BUDGET]).sum())

    def no_full_read(*_args, **_kwargs):
        raise AssertionError("a query read every trial with its parameters")

    monkeypatch.setattr(optuna.Study, "get_trials", no_full_read)
    monkeypatch.setattr(optuna.Study, "best_trials", property(no_full_read))
    info = qstudy.status("big", url)
    assert info["complete"] == len(done) and info["trials"] == 2005
    assert info["front"] == expected_front
    trial, strategy = qstudy.best("big", 3.0, url)
    assert trial.values[0] == -1.0 and trial.params == real.params and strategy.name


@pytest.mark.parametrize("objectives", [2, 3])
def test_non_dominated_equals_brute_force_with_ties(objectives):
    import numpy as np

    def brute(points):
        return np.array([not any((q <= p).all() and (q < p).any() for q in points) for p in points])

    for seed in range(10):
        points = np.round(np.random.default_rng(seed).random((120, objectives)) * 4)  # many ties
        assert (qstudy.non_dominated(points) == brute(points)).all()


def test_telling_a_trial_an_earlier_try_already_told_is_not_an_error(capsys):
    """A database restart can drop the connection after `tell` committed: the retry finds the
    trial finished. Told COMPLETE by us: nothing to do; failed as stale by another worker: say so."""
    from qopt.study.workers import Retrying, _tell

    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    study.tell(trial, [1.0, 2.0])
    _tell(study, trial, TrialState.COMPLETE, [1.0, 2.0], Retrying())
    assert study.trials[0].state == TrialState.COMPLETE and capsys.readouterr().err == ""
    stale = study.ask()
    study.tell(stale, state=TrialState.FAIL)
    _tell(study, stale, TrialState.COMPLETE, [1.0, 2.0], Retrying())
    assert "failed as stale" in capsys.readouterr().err


def test_refinement_trials_stay_within_their_target(config, url):
    from qopt.operators import REFINE_TARGET, REFINED_FROM, VariationConfig

    refining = dataclasses.replace(
        config,
        targets=(3.0, BUDGET),
        refine_margin=1.0,  # any child worse than the best at its target on the first batch stops there
        eval=dataclasses.replace(config.eval, search_windows=4),  # windows left after the first batch
        variation=VariationConfig(refine_prob=1.0),
    )
    qstudy.create("r", refining, url)
    qstudy.launch("r", n_trials=16, url=url, progress=False)
    study, _ = qstudy.load("r", url)
    refined = [t for t in study.trials if REFINED_FROM in t.user_attrs]
    assert len(refined) >= 8  # every trial but the baselines, once something fits a target
    numbers = {t.number: t for t in study.trials}
    for t in refined:
        parent = numbers[t.user_attrs[REFINED_FROM]]
        target = t.user_attrs[REFINE_TARGET]
        assert parent.number < t.number and parent.user_attrs["bpw"] <= target
        assert t.user_attrs["bpw"] <= target and t.params != parent.params
        if t.state == TrialState.PRUNED and "screened" in t.user_attrs.get("rejected", ""):
            assert f"no more than {target:.4g} bpw" in t.user_attrs["rejected"]  # judged at its target
    assert any("screened" in t.user_attrs.get("rejected", "") for t in refined)
    trial, _ = qstudy.best("r", 3.0, url)
    assert trial.user_attrs["bpw"] <= 3.0
    with pytest.raises(QoptError, match="above budget_bpw"):
        dataclasses.replace(config, targets=(BUDGET + 1,))


def test_best_reranks_its_candidates_on_validation_text(config, url):
    from qopt.study.objective import VALIDATION_ATTR_PREFIX

    wide = dataclasses.replace(config, eval=dataclasses.replace(config.eval, validation_windows=2))
    qstudy.create("v", wide, url)
    qstudy.launch("v", n_trials=12, url=url, progress=False)
    shortlist = qstudy.shortlist("v", BUDGET, url, candidates=4)
    assert len(shortlist) == 4 and [c.search for c in shortlist] == sorted(c.search for c in shortlist)
    assert all(c.validation_kl is not None and c.bpw <= BUDGET for c in shortlist)
    trial, _ = qstudy.best("v", BUDGET, url, candidates=4)
    assert trial.number == min(shortlist, key=lambda c: c.validation_kl).trial
    study, _ = qstudy.load("v", url)
    assert all(f"{VALIDATION_ATTR_PREFIX}{c.trial}" in study.user_attrs for c in shortlist)  # measured once
    assert qstudy.best("v", BUDGET, url, candidates=1)[0].values[0] == shortlist[0].search


def test_part_metrics_are_measured_once_and_a_missing_part_is_none(config, url):
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, validation_windows=0))
    qstudy.create("p", config, url)
    qstudy.launch("p", n_trials=4, url=url, progress=False)
    study, _ = qstudy.load("p", url)
    trial = qstudy.completed(study)[0]
    held_out = qstudy.PartMetrics(study, config, "eval")
    first = held_out(trial)
    assert first is not None and first["kl"] >= 0 and held_out.run is not None  # measured: the model loaded
    again = qstudy.PartMetrics(qstudy.load("p", url)[0], config, "eval")
    assert again(trial) == first and again.run is None  # read back from the study, nothing loaded
    assert qstudy.PartMetrics(study, config, "validation", run=held_out.run)(trial) is None
    with pytest.raises(ValueError, match="'eval' or 'validation'"):
        qstudy.PartMetrics(study, config, "search")
