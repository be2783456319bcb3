"""Where studies live: an Optuna RDB storage behind an SQLAlchemy URL.

A SQLite file by default (`runs/qopt.db`, or `$QOPT_STORAGE`), PostgreSQL for
several workers on several machines (`postgresql+psycopg://user@host/db`).

Optuna writes every suggested parameter in a transaction of its own, and a
full-genome trial suggests hundreds (about 300 on stories260K). On a small
model those commits, not the numerics, were most of a trial's time, and over
a network each is a round trip. `BatchedParamStorage` collects a running
trial's parameters and writes them in one transaction, before anything else
touches that trial.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from qopt.errors import QoptError, first_line

#: The Optuna minor versions whose RDB internals this module was tested against
#: (keep in step with pyproject's pin; tests/test_storage.py exercises them).
TESTED_OPTUNA = ("5.0",)
UNTESTED_OPTUNA_ENV = "QOPT_ALLOW_UNTESTED_OPTUNA"


def check_optuna_version(version: str, allow_untested: bool = False) -> None:
    """Refuse an Optuna release whose internals this module was not tested against.

    This module is qopt's only user of Optuna internals (the RDB models, the
    scoped session, a study's storage); a minor release may change them. With
    `allow_untested` (set $QOPT_ALLOW_UNTESTED_OPTUNA=1, e.g. to run the tests
    on a new release) it only warns.
    """
    if ".".join(version.split(".")[:2]) in TESTED_OPTUNA:
        return
    message = (
        f"qopt's study storage was tested with optuna {', '.join(TESTED_OPTUNA)}.x and reads its internal "
        f"RDB schema; optuna {version} is installed. Install a tested one: pip install 'optuna>=5.0,<5.1' "
        f"(or set {UNTESTED_OPTUNA_ENV}=1 to try this one)"
    )
    if not allow_untested:
        raise ImportError(message)
    warnings.warn(message, stacklevel=2)


check_optuna_version(optuna.__version__, allow_untested=os.environ.get(UNTESTED_OPTUNA_ENV) == "1")

# Checked above: the internals this module relies on.
from optuna.storages._rdb import models  # noqa: E402
from optuna.storages._rdb.storage import _create_scoped_session  # noqa: E402  (commit once, roll back on error)

DEFAULT_STORAGE = "sqlite:///runs/qopt.db"


def storage_url(url: str | None = None) -> str:
    """The URL to use: given, else $QOPT_STORAGE, else the SQLite default."""
    return url or os.environ.get("QOPT_STORAGE") or DEFAULT_STORAGE


def redacted_url(url: str) -> str:
    """`url` with any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def connect(
    url: str | None = None, heartbeat: int | None = None, batched: bool = True, create: bool = False
) -> RDBStorage:
    """An Optuna RDB storage for `url`. A SQLite file (and its folder) is made only with
    `create`; otherwise a missing one is an error, not a new empty database.

    With `heartbeat` (seconds), running trials send heartbeats; a trial
    silent for 3 heartbeats (its worker died) is failed by the next worker to
    start a trial and re-queued once with the same params. `batched=False`
    gives Optuna's plain storage (one transaction per parameter).
    """
    url = storage_url(url)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise QoptError(f"no study database at {path}; create a study first (`qopt study create NAME --config F`)")
    # pre-ping replaces connections a database restart or a proxy closed; recycle ages them out
    engine_kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True, "pool_recycle": 300}
    kind = BatchedParamStorage if batched else RDBStorage
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            liveness: dict[str, Any] = {}
            if heartbeat is not None:
                retry_once = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                liveness = dict(
                    heartbeat_interval=heartbeat, grace_period=3 * heartbeat, heartbeat_stale_trial_callback=retry_once
                )
            storage = kind(url, engine_kwargs=engine_kwargs, **liveness)
    except Exception as exc:  # sqlalchemy raises many types for a bad or unreachable URL
        raise QoptError(f"cannot open storage {redacted_url(url)}: {first_line(exc)}") from None
    if url.startswith("sqlite"):
        _speed_up_sqlite(storage.engine)
    return storage


class BatchedParamStorage(RDBStorage):
    """An RDBStorage that writes a running trial's parameters in one transaction.

    Suggested parameters wait in memory until `flush` (a worker calls it, through
    `write_params_now`, once a trial's genes are drawn and before its evaluation,
    so a killed worker's trial is retried with the same genes) or until the trial
    ends, and go to the database together. Until then this process's reads of
    the trial (`get_trial`) see them from memory; other readers see the trial
    without them, which costs nothing: the sampler reads finished trials only.
    Hooks into Optuna's `_set_trial_param` (the method
    its cached storage calls for every suggestion): checks a distribution
    against the study's at once, as Optuna does, and writes the same rows as
    Optuna's per-parameter path, with one trial lookup.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, list[tuple[str, float, BaseDistribution]]] = {}
        self._pending_lock = threading.Lock()

    def __getstate__(self) -> dict[Any, Any]:
        self.flush()
        state = super().__getstate__()
        state.pop("_pending_lock", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._pending_lock = threading.Lock()

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        # Checked now, as Optuna does, so a bad suggestion fails inside the objective.
        previous = previous_distribution or self._stored_distribution(trial_id, param_name)
        if previous is not None:
            check_distribution_compatibility(previous, distribution)
        with self._pending_lock:
            self._pending.setdefault(trial_id, []).append((param_name, param_value_internal, distribution))

    def flush(self, trial_id: int | None = None) -> None:
        """Write the waiting parameters of `trial_id` (of every trial if None).

        They leave memory only once written: after a failed write (the database is
        away) the same call can be made again."""
        with self._pending_lock:
            ids = list(self._pending) if trial_id is None else [trial_id]
            batches = [(i, list(self._pending[i])) for i in ids if i in self._pending]
        for tid, params in batches:
            with _create_scoped_session(self.scoped_session, True) as session:
                trial = models.TrialModel.find_or_raise_by_id(tid, session)
                self.check_trial_is_updatable(tid, trial.state)
                rows = [
                    {"trial_id": tid, "param_name": n, "param_value": v, "distribution_json": distribution_to_json(d)}
                    for n, v, d in params
                ]
                session.execute(sqlalchemy.insert(models.TrialParamModel), rows)  # one executemany
            with self._pending_lock:
                waiting = self._pending.get(tid, [])
                del waiting[: len(params)]  # parameters drawn meanwhile stay waiting
                if not waiting:
                    self._pending.pop(tid, None)

    def _waiting(self, trial_id: int) -> list[tuple[str, float, BaseDistribution]]:
        with self._pending_lock:
            return list(self._pending.get(trial_id, ()))

    def _stored_distribution(self, trial_id: int, name: str) -> BaseDistribution | None:
        """The distribution an earlier trial of the same study stored for parameter `name`, if any.
        (Asked once per parameter name per process: Optuna's cache passes it afterwards.)"""
        with _create_scoped_session(self.scoped_session) as session:
            study_id = models.TrialModel.find_or_raise_by_id(trial_id, session).study_id
            record = (
                session.query(models.TrialParamModel)
                .join(models.TrialModel)
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialParamModel.param_name == name)
                .first()
            )
            return None if record is None else json_to_distribution(record.distribution_json)

    # Reads of one trial see its waiting parameters (from memory); its end writes them first.
    def get_trial(self, trial_id: int) -> FrozenTrial:
        trial = super().get_trial(trial_id)
        for name, value, distribution in self._waiting(trial_id):
            trial.params[name] = distribution.to_external_repr(value)
            trial.distributions[name] = distribution
        return trial

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        for name, value, _ in self._waiting(trial_id):
            if name == param_name:
                return value
        return super().get_trial_param(trial_id, param_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        self.flush(trial_id)
        return super().set_trial_state_values(trial_id, state, values)


def write_params_now(trial: optuna.Trial) -> None:
    """Write a running trial's drawn parameters to the database now, not when it ends: a
    worker killed during the evaluation then leaves them for the trial's retry."""
    backend = _backend(trial.study)
    if isinstance(backend, BatchedParamStorage):
        backend.flush(trial._trial_id)


def record_heartbeat(trial: optuna.Trial) -> None:
    """Record in the database that `trial`'s worker is alive (Optuna's heartbeat row)."""
    trial.study._storage.record_heartbeat(trial._trial_id)


def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    storage = study._storage
    return getattr(storage, "_backend", storage)  # Optuna wraps RDB storages in a cache


def count_trials(
    study: optuna.Study,
    state: TrialState | None = None,
    rejected_prefix: str | None = None,
    user_attrs: Mapping[str, str] | None = None,
) -> int:
    """How many trials of `study` (in `state`; whose `rejected` user attribute starts with
    `rejected_prefix`; whose user attributes include the strings `user_attrs`), counted by
    the database: reading the trials themselves would load every parameter of every trial,
    seconds per thousand trials."""
    backend = _backend(study)
    if not isinstance(backend, RDBStorage):  # e.g. in-memory: count what is there
        trials = study.get_trials(deepcopy=False, states=None if state is None else (state,))
        return sum(
            (rejected_prefix is None or t.user_attrs.get("rejected", "").startswith(rejected_prefix))
            and all(t.user_attrs.get(k) == v for k, v in (user_attrs or {}).items())
            for t in trials
        )
    with _create_scoped_session(backend.scoped_session) as session:
        query = session.query(sqlalchemy.func.count(models.TrialModel.trial_id)).filter(
            models.TrialModel.study_id == study._study_id
        )
        if state is not None:
            query = query.filter(models.TrialModel.state == state)
        for key, value in (user_attrs or {}).items():
            attr = sqlalchemy.orm.aliased(models.TrialUserAttributeModel)
            query = query.join(attr, attr.trial_id == models.TrialModel.trial_id).filter(
                attr.key == key, attr.value_json == json.dumps(value)
            )
        if rejected_prefix is not None:
            prefix = json.dumps(rejected_prefix)[:-1]  # the JSON string, without its closing quote
            query = query.join(models.TrialUserAttributeModel).filter(
                models.TrialUserAttributeModel.key == "rejected",
                models.TrialUserAttributeModel.value_json.startswith(prefix, autoescape=True),
            )
        return int(query.scalar())


@dataclass(frozen=True)
class TrialSummary:
    """What queries need of a trial, without its parameters: `values` (None unless
    complete), `seconds` of wall time (None while running), and the user and system
    attributes that were asked for."""

    trial_id: int
    number: int
    state: TrialState
    values: tuple[float, ...] | None
    seconds: float | None
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]


def trial_summaries(
    study: optuna.Study, user_keys: Sequence[str] = (), system_keys: Sequence[str] = ()
) -> list[TrialSummary]:
    """Every trial of `study`, summarised with a few targeted queries: a trial's hundreds of
    parameters are never read (`study.get_trials` reads them all: seconds per thousand trials)."""
    backend = _backend(study)
    if not isinstance(backend, RDBStorage):
        return [_summary(t, user_keys, system_keys) for t in study.get_trials(deepcopy=False)]
    with _create_scoped_session(backend.scoped_session) as session:
        columns = models.TrialModel.__table__.c  # the schema's columns (Optuna's ORM wraps some in properties)
        rows = session.execute(
            sqlalchemy.select(
                columns.trial_id, columns.number, columns.state, columns.datetime_start, columns.datetime_complete
            ).where(columns.study_id == study._study_id)
        ).all()
        ids = sqlalchemy.select(models.TrialModel.trial_id).where(models.TrialModel.study_id == study._study_id)
        values: dict[int, dict[int, float]] = {}
        value_columns = models.TrialValueModel.__table__.c
        for trial_id, objective, value, kind in session.execute(
            sqlalchemy.select(
                value_columns.trial_id, value_columns.objective, value_columns.value, value_columns.value_type
            ).where(value_columns.trial_id.in_(ids))
        ):
            values.setdefault(trial_id, {})[objective] = models.TrialValueModel.stored_repr_to_value(value, kind)
        user = _attrs(session, models.TrialUserAttributeModel, user_keys, ids)
        system = _attrs(session, models.TrialSystemAttributeModel, system_keys, ids)
    out = []
    for trial_id, number, state, start, complete in rows:
        state = TrialState[state] if isinstance(state, str) else TrialState(state)
        by_objective = values.get(trial_id)
        out.append(
            TrialSummary(
                trial_id=trial_id,
                number=number,
                state=state,
                values=tuple(by_objective[k] for k in sorted(by_objective))
                if by_objective and state == TrialState.COMPLETE
                else None,
                seconds=(complete - start).total_seconds() if start and complete else None,
                user_attrs=user.get(trial_id, {}),
                system_attrs=system.get(trial_id, {}),
            )
        )
    return sorted(out, key=lambda t: t.number)


def load_trial(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """One trial with its parameters (one trial's rows, not the study's)."""
    return study._storage.get_trial(trial_id)


def _attrs(session, model, keys: Sequence[str], trial_ids) -> dict[int, dict[str, Any]]:
    if not keys:
        return {}
    found: dict[int, dict[str, Any]] = {}
    query = session.query(model.trial_id, model.key, model.value_json).filter(
        model.trial_id.in_(trial_ids), model.key.in_(list(keys))
    )
    for trial_id, key, value_json in query:
        found.setdefault(trial_id, {})[key] = json.loads(value_json)
    return found


def _summary(trial: FrozenTrial, user_keys: Sequence[str], system_keys: Sequence[str]) -> TrialSummary:
    return TrialSummary(
        trial_id=trial._trial_id,
        number=trial.number,
        state=trial.state,
        values=tuple(trial.values) if trial.values is not None and trial.state == TrialState.COMPLETE else None,
        seconds=trial.duration.total_seconds() if trial.duration is not None else None,
        user_attrs={k: trial.user_attrs[k] for k in user_keys if k in trial.user_attrs},
        system_attrs={k: trial.system_attrs[k] for k in system_keys if k in trial.system_attrs},
    )


def _speed_up_sqlite(engine) -> None:
    """WAL journal (concurrent readers and writers), and fsync at checkpoints only."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # connections opened before the listener reconnect with it
