"""BatchedParamStorage: one transaction for a trial's parameters, the same rows as Optuna's."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from qopt.storage import TESTED_OPTUNA, BatchedParamStorage, check_optuna_version, connect, count_trials

N_PARAMS = 40


def _objective(trial: optuna.Trial) -> float:
    values = [trial.suggest_categorical(f"g{i}", ["a", "b", "c"]) for i in range(N_PARAMS)]
    trial.set_user_attr("first", values[0])
    x = trial.suggest_float("x", 0.0, 1.0)  # suggested after a flush: waits for the next one
    return x + values.count("a")


def _commits(storage) -> list[int]:
    counter = [0]
    sqlalchemy.event.listen(storage.engine, "commit", lambda _conn: counter.__setitem__(0, counter[0] + 1))
    return counter


def _run(url: str, batched: bool) -> float:
    """Five trials of `_objective`; returns the database commits per trial after the first
    (which also looks up each parameter's earlier distribution)."""
    storage = connect(url, batched=batched, create=True)
    assert isinstance(storage, BatchedParamStorage) == batched
    study = optuna.create_study(study_name=f"batched={batched}", storage=storage)
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    study.optimize(_objective, n_trials=1)
    commits = _commits(storage)
    study.optimize(_objective, n_trials=4)
    return commits[0] / 4


def test_params_stored_as_optuna_stores_them_in_one_transaction(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    batched, plain = _run(url, batched=True), _run(url, batched=False)
    assert plain - batched >= N_PARAMS - 1  # one commit where Optuna makes one per parameter
    # Read back with Optuna's own storage: every parameter, its value and distribution, as Optuna wrote them.
    reader = connect(url, batched=False)
    trials = {
        name: optuna.load_study(study_name=name, storage=reader).trials for name in ("batched=True", "batched=False")
    }
    for ours, optunas in zip(trials["batched=True"], trials["batched=False"], strict=True):
        assert ours.params == optunas.params and ours.distributions == optunas.distributions
        assert len(ours.params) == N_PARAMS + 1 and ours.user_attrs["first"] == ours.params["g0"]
        assert ours.value == optunas.value


def test_an_incompatible_distribution_is_still_refused(tmp_path):
    study = optuna.create_study(storage=connect(f"sqlite:///{tmp_path / 'db.sqlite'}", create=True))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(ValueError, match="[Cc]annot set different distribution"):
        study.optimize(lambda t: float(t.suggest_categorical("x", ["a", "b"]) == "a"), n_trials=1)


def test_count_trials_counts_in_the_database(tmp_path):
    study = optuna.create_study(storage=connect(f"sqlite:///{tmp_path / 'db.sqlite'}", create=True))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        if trial.number % 3 == 0:
            trial.set_user_attr("rejected", f"screened out: trial {trial.number} 100% 'quoted'")
            raise optuna.TrialPruned()
        if trial.number % 3 == 1:
            trial.set_user_attr("rejected", "screened_out look-alike")
            raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=9)
    assert count_trials(study) == 9
    assert count_trials(study, TrialState.COMPLETE) == 3 and count_trials(study, TrialState.PRUNED) == 6
    assert count_trials(study, rejected_prefix="screened out") == 3  # `_` is not a LIKE wildcard here


def test_a_running_trial_reads_its_waiting_params_without_writing_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    storage = connect(url, create=True)
    study = optuna.create_study(storage=storage)
    seen = {}

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        seen["own read"] = storage.get_trial(trial._trial_id).params
        seen["own param"] = storage.get_trial_param(trial._trial_id, "x")
        seen["other reader"] = connect(url, batched=False).get_trial(trial._trial_id).params
        return x

    study.optimize(objective, n_trials=1)
    x = study.trials[0].params["x"]
    assert seen == {"own read": {"x": x}, "own param": x, "other reader": {}}


def test_an_untested_optuna_release_is_refused_with_the_fix():
    assert optuna.__version__.rsplit(".", 1)[0] in TESTED_OPTUNA  # the installed one was tested
    check_optuna_version("5.0.7")
    with pytest.raises(ImportError, match=r"optuna 5\.1\.0 is installed.*pip install 'optuna>=5\.0,<5\.1'"):
        check_optuna_version("5.1.0")
    with pytest.warns(UserWarning, match="optuna 6.0.0"):
        check_optuna_version("6.0.0", allow_untested=True)
