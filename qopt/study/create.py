"""Making and opening studies: create (with its baselines enqueued), load, add measured baselines.

`create` stores the `StudyConfig` in the study's user attributes and enqueues
the uniform baselines as the first trials; `load` reads both back. Every trial
is rebuildable from the database alone: its params decode to a genome under
the stored config's search space.

Storage (SQLite by default, PostgreSQL for several machines) is `qopt.storage`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from qopt.errors import QoptError
from qopt.evaluate import Metrics
from qopt.space import SearchSpace
from qopt.storage import connect, count_trials, redacted_url, storage_url
from qopt.strategy import Strategy
from qopt.study.config import CONFIG_ATTR, StudyConfig, baseline_strategies, stored_config

if TYPE_CHECKING:
    from qopt.study.objective import SearchRun


def create(name: str, config: StudyConfig, url: str | None = None) -> optuna.Study:
    """Create study `name` (idempotent for the same config) and enqueue baselines."""
    from qopt.data import load_text
    from qopt.model import load_skeleton

    storage = connect(url, create=True)
    wanted = config.to_dict()
    if stored_config(storage, name) is not None:
        study = _same_study(storage, name, wanted)
        # An earlier create may have stopped before enqueuing every baseline: enqueue what is missing.
        missing = [s for s in baseline_strategies(config) if not count_trials(study, user_attrs={"baseline": s.name})]
        if missing:
            space = SearchSpace(load_skeleton(config.model).units, config.search)
            for strategy in missing:
                enqueue_baseline(study, space, strategy)
        return study
    if not config.data.startswith("hf:"):
        load_text(config.data)  # an unreadable text fails here, not in every worker
    space = SearchSpace(load_skeleton(config.model).units, config.search)
    floor = space.min_bpw()
    for key, bpw in [("budget_bpw", config.budget_bpw), *(("targets", t) for t in config.targets)]:
        if bpw is not None and bpw < floor:
            raise QoptError(f"{key}: {bpw} is below the smallest bpw this search space can reach ({floor:.3f})")
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=["minimize"] * len(config.objectives))
    except optuna.exceptions.DuplicatedStudyError:  # another `create` of the same name got there first
        return _same_study(storage, name, wanted, wait_s=10.0)
    study.set_user_attr(CONFIG_ATTR, wanted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.objectives))
    for strategy in baseline_strategies(config):
        enqueue_baseline(study, space, strategy)
    return study


def _same_study(storage, name: str, wanted: dict[str, Any], wait_s: float = 0.0) -> optuna.Study:
    """The existing study `name` if its config is `wanted`; else a one-line error. Waits up to
    `wait_s` for a concurrent `create` to store its config."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stored = stored_config(storage, name)
            break
        except QoptError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if stored != wanted:
        key = next(k for k in wanted if stored.get(k) != wanted[k])
        raise QoptError(f"study {name!r} already exists with a different config ({key} differs); pick another name")
    return optuna.load_study(study_name=name, storage=storage)


def enqueue_baseline(study: optuna.Study, space: SearchSpace, strategy: Strategy) -> dict[str, Any] | None:
    """Enqueue `strategy` as a baseline trial unless the study holds it already.

    Returns its params, or None when the space cannot express it exactly.
    """
    params = space.encode(space.genome_of(strategy))
    # Compare what the stored params decode to: genes of families the space does not search come from its base.
    if space.strategy(space.decode(params)).resolve(space.units) != strategy.resolve(space.units):
        return None
    if not any(t.params == params and "baseline" in t.user_attrs for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(params, user_attrs={"baseline": strategy.name})
    return params


def add_baselines(
    name: str, run: SearchRun, measured: Sequence[tuple[Strategy, Metrics]], url: str | None = None
) -> list[int | None]:
    """Add measured baselines to study `name`: seeds for its search, points on its plots.

    Each strategy the study's space can express is enqueued (once) and then
    run, with any other waiting baseline, through the study's own objective,
    so its trial values are exactly what a worker would record. Its held-out
    metrics (`measured`, from `run.evaluator`, the study's own split) are
    stored with it. Returns each strategy's trial number, or None where the
    space cannot express it.
    """
    storage = connect(url)
    study, _ = load_from(storage, name, url)
    all_params = [enqueue_baseline(study, run.space, strategy) for strategy, _ in measured]
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, _ = load_from(storage, name, url, sampler=run.sampler(len(study.get_trials(deepcopy=False))))
        study.optimize(run.objective, n_trials=waiting)
    numbers: list[int | None] = []
    for (_, held_out), params in zip(measured, all_params, strict=True):
        match = [t.number for t in completed(study) if "baseline" in t.user_attrs and t.params == params]
        number = match[0] if params is not None and match else None
        if number is not None:
            run.store_held_out(study, number, held_out)
        numbers.append(number)
    return numbers


def load(name: str, url: str | None = None, heartbeat: int | None = None) -> tuple[optuna.Study, StudyConfig]:
    """Load an existing study and its config; a clear error if there is none."""
    return load_from(connect(url, heartbeat), name, url)


def load_from(
    storage: optuna.storages.BaseStorage, name: str, url: str | None, sampler: optuna.samplers.BaseSampler | None = None
) -> tuple[optuna.Study, StudyConfig]:
    stored = stored_config(storage, name)
    if stored is None:
        where = redacted_url(storage_url(url))
        raise QoptError(f"no study named {name!r} in {where}; create it with `qopt study create {name} --config FILE`")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler), StudyConfig.from_dict(stored)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's completed trials (no copies)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
