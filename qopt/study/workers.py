"""Running a study's trials: worker processes, heartbeats, stop signals, database outages.

A worker loads the model once and runs trials one at a time with Optuna's
ask-and-tell interface, so every database call is its own and can be retried:

- **outages**: a call that fails with a transient database error (connection
  refused or reset, server restart; Optuna wraps them as
  `StorageInternalError`) is retried with capped exponential backoff, one line
  per retry, for up to `patience_s` (5 minutes by default). A trial in flight
  finishes its evaluation and writes its result once the database is back;
  if other workers failed it as stale meanwhile, its retry runs elsewhere.
- **killed workers**: a trial's genes reach the database before its
  evaluation starts, and a heartbeat thread records it is alive; a trial
  silent for 3 heartbeats is failed by the next worker to start a trial and
  re-queued once with the same genes.
- **counts**: every trial records the launch that ran it, so "n trials in this
  launch" is counted in the database across all of the launch's workers; a
  pooled worker that dies is replaced, and the survivors run the rest.
- **stop signals**: SIGTERM and Ctrl-C interrupt an evaluation at once (the
  trial is marked failed) and wait during database writes (`Stop`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from qopt.errors import QoptError, first_line
from qopt.storage import connect, count_trials, record_heartbeat, write_params_now

T = TypeVar("T")

#: Errors that mean "the database is away", not "the request is wrong".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    optuna.exceptions.StorageInternalError,
)
#: What a trial records as the launch that ran it.
LAUNCH_ATTR = "launch"
_REPLACEMENTS_PER_SLOT = 3


class Stop:
    """Turns a stop signal into KeyboardInterrupt at a safe point.

    While a trial's strategy is being evaluated (numerics only) the interrupt
    is immediate. Anywhere else (a database write, Optuna's bookkeeping) it
    waits for the next evaluation, the next trial's start, or a retry's wait.
    """

    def __init__(self) -> None:
        self.interruptible = False
        self.requested = False

    def handle(self, _signum, _frame) -> None:
        if self.interruptible:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for."""
        if self.requested:
            raise KeyboardInterrupt

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Where a stop signal may interrupt at once."""
        self.check()
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake (KeyboardInterrupt) on a stop signal."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self.check()


@dataclass
class Retrying:
    """Calls a function until it gets past transient database errors.

    Waits 1, 2, 4... seconds (capped at `cap_s`) between tries, printing one
    line each, and gives up with a `QoptError` after `patience_s` in all.
    """

    stop: Stop = dataclasses.field(default_factory=Stop)
    patience_s: float = 300.0
    cap_s: float = 30.0
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    def __call__(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delay, waited = 1.0, 0.0
        while True:
            try:
                return fn(*args, **kwargs)
            except TRANSIENT_ERRORS as exc:
                if waited >= self.patience_s:
                    raise QoptError(
                        f"the database was unreachable for {waited:.0f} s ({what}): {first_line(_cause(exc))}"
                    ) from None
                self.log(f"database unreachable ({what}: {first_line(_cause(exc))}); retry in {delay:.0f} s")
                self.stop.sleep(delay)
                waited += delay
                delay = min(2 * delay, self.cap_s)


def _cause(exc: BaseException) -> BaseException:
    """The driver's error behind Optuna's and SQLAlchemy's wrappers (says what actually failed)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@dataclass(frozen=True)
class Job:
    """What one worker is asked to do (picklable: pooled workers are spawned processes).

    `n_trials` is this worker's share of the launch (trials it finishes); `until` a
    study-wide count of completed trials. Every trial records `launch_id`.
    """

    name: str
    url: str | None
    n_trials: int | None
    timeout: float | None
    until: int | None
    heartbeat: int
    progress: bool
    launch_id: str
    threads: int | None = None
    patience_s: float = 300.0


@dataclass(frozen=True)
class LaunchCounts:
    """What one launch ran, counted in the database over all of its workers."""

    completed: int
    pruned: int  # stopped after their first batch: screened out, or collapsed
    screened: int
    failed: int

    @property
    def finished(self) -> int:
        return self.completed + self.pruned


def launch(
    name: str,
    n_trials: int | None,
    timeout: float | None = None,
    url: str | None = None,
    progress: bool = True,
    workers: int = 1,
    until: int | None = None,
    heartbeat: int = 10,
    patience_s: float = 300.0,
) -> LaunchCounts:
    """Run trials of an existing study; returns what this launch ran.

    `n_trials` are shared among `workers` processes on this machine (each
    loads the model once); `until` stops every worker once the study holds
    that many completed trials, whoever ran them. The same call on other
    machines with the same storage joins the same study.
    """
    from qopt.study.create import load

    check_launch(n_trials, until, timeout, workers, heartbeat)
    study, config = load(name, url)  # fail fast on a bad name or storage, before any process starts
    job = Job(name, url, n_trials, timeout, until, heartbeat, progress, uuid.uuid4().hex, patience_s=patience_s)
    if workers == 1:
        run_worker(job)
    else:
        _seed_allocations_once(study, config, progress)
        threads = max(1, (os.cpu_count() or 1) // workers)  # share the cores instead of oversubscribing
        shares: list[int | None] = [None] * workers
        if n_trials is not None:
            shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
        jobs = [dataclasses.replace(job, n_trials=share, progress=False, threads=threads) for share in shares]
        _run_pool(jobs, progress)
    return counts(study, job.launch_id)


def counts(study: optuna.Study, launch_id: str) -> LaunchCounts:
    """The trials of launch `launch_id` by outcome."""
    from qopt.study.objective import SCREENED

    attrs = {LAUNCH_ATTR: launch_id}
    return LaunchCounts(
        completed=count_trials(study, TrialState.COMPLETE, user_attrs=attrs),
        pruned=count_trials(study, TrialState.PRUNED, user_attrs=attrs),
        screened=count_trials(study, TrialState.PRUNED, rejected_prefix=SCREENED, user_attrs=attrs),
        failed=count_trials(study, TrialState.FAIL, user_attrs=attrs),
    )


def check_launch(
    n_trials: int | None, until: int | None, timeout: float | None, workers: int = 1, heartbeat: int = 10
) -> None:
    """Refuse launch settings that cannot mean anything, before any model is loaded."""
    counts = {"n-trials": n_trials, "until": until, "workers": workers, "heartbeat": heartbeat}
    for option, value in counts.items():
        if value is not None and value < 1:
            raise QoptError(f"--{option} must be at least 1, got {value}")
    if timeout is not None and timeout <= 0:
        raise QoptError(f"--timeout must be positive, got {timeout}")


def launched(study: optuna.Study, launch_id: str, states: tuple[TrialState, ...]) -> int:
    """Trials of launch `launch_id` in one of `states`, counted by the database."""
    return sum(count_trials(study, state, user_attrs={LAUNCH_ATTR: launch_id}) for state in states)


def run_worker(job: Job) -> None:
    """One worker: load the model once, then run trials until the job is done.

    SIGTERM and Ctrl-C stop the worker without leaving a trial RUNNING or half
    written; they surface as KeyboardInterrupt.
    """
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    stop = Stop()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _work(job, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _work(job: Job, stop: Stop) -> None:
    from qopt.study.allocation import enqueue_seeds
    from qopt.study.create import load_from
    from qopt.study.objective import SearchRun

    retry = Retrying(stop, patience_s=job.patience_s)
    storage = connect(job.url, job.heartbeat)
    study, config = load_from(storage, job.name, job.url)
    run = SearchRun(config, retry=retry)
    run.evaluation = stop.evaluation
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with stop.evaluation():  # measuring the allocator's costs is numerics: a stop ends it at once
        enqueue_seeds(study, run, progress=job.progress)
    # A new sampler on the loaded study: loading it again would re-read every trial.
    study.sampler = run.sampler(count_trials(study))
    bar = tqdm(total=job.n_trials, desc=job.name, disable=not job.progress)
    with warnings.catch_warnings():
        # Optuna flags fail_stale_trials as experimental, and heartbeats outside `optimize`:
        # both are used here on purpose (this loop sends the heartbeats itself).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        _trials(job, study, run, retry, stop, bar)


def _trials(job: Job, study: optuna.Study, run, retry: Retrying, stop: Stop, bar: tqdm) -> None:
    started = time.monotonic()
    stale_checked = -float("inf")
    try:
        while _wanted(job, study, retry, started):
            stop.check()
            if time.monotonic() - stale_checked >= job.heartbeat:  # a stale trial is seen within one heartbeat
                retry("failing stale trials", optuna.storages.fail_stale_trials, study)
                stale_checked = time.monotonic()
            trial = retry("starting a trial", study.ask)
            retry("recording the launch", trial.set_user_attr, LAUNCH_ATTR, job.launch_id)
            _run_trial(job, study, trial, run, retry, stop)
            bar.update(1)
    finally:
        bar.close()


def _wanted(job: Job, study: optuna.Study, retry: Retrying, started: float) -> bool:
    """Whether this worker should start another trial."""
    if job.timeout is not None and time.monotonic() - started >= job.timeout:
        return False
    if job.until is not None and retry("counting", count_trials, study, TrialState.COMPLETE) >= job.until:
        return False
    if job.n_trials is not None:
        return retry("counting", finished_by, study, worker_id(), job.launch_id) < job.n_trials
    return True


def worker_id(pid: int | None = None) -> str:
    """How trials name the process that ran them (`worker` user attribute)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def finished_by(study: optuna.Study, worker: str, launch_id: str) -> int:
    """Trials that worker `worker` finished (completed or pruned) in launch `launch_id`."""
    attrs = {"worker": worker, LAUNCH_ATTR: launch_id}
    return sum(count_trials(study, state, user_attrs=attrs) for state in (TrialState.COMPLETE, TrialState.PRUNED))


def _run_trial(job: Job, study: optuna.Study, trial: optuna.Trial, run, retry: Retrying, stop: Stop) -> None:
    """Evaluate one asked trial and tell its outcome, whatever the database does meanwhile."""
    heartbeat = _Heartbeat(trial, job.heartbeat)
    values: tuple[float, ...] | None = None
    state = TrialState.FAIL
    try:
        with heartbeat:
            values = run.objective(trial, before_evaluation=lambda: write_params_now(trial))
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except optuna.exceptions.UpdateFinishedTrialError:
        _stale_notice(trial)
        return
    except BaseException:
        _tell(study, trial, TrialState.FAIL, None, retry)
        raise
    _tell(study, trial, state, values, retry)


def _tell(study, trial, state: TrialState, values, retry: Retrying) -> None:
    try:
        retry(f"writing trial {trial.number}", study.tell, trial, values if state == TrialState.COMPLETE else None,
              state=state)  # fmt: skip
    except optuna.exceptions.UpdateFinishedTrialError:
        _stale_notice(trial)
    except (RuntimeError, ValueError) as exc:
        # Optuna refuses to tell a finished trial ("Cannot tell a COMPLETE trial."): an earlier
        # try got through before the connection dropped, or another worker failed it as stale.
        message = str(exc)
        if "finished" not in message and "Cannot tell a" not in message:
            raise
        if f"Cannot tell a {TrialState.FAIL.name}" in message and state != TrialState.FAIL:
            _stale_notice(trial)


def _stale_notice(trial: optuna.Trial) -> None:
    print(
        f"trial {trial.number} was failed as stale by another worker while the database was away; "
        "its retry runs as a new trial",
        file=sys.stderr,
        flush=True,
    )


class _Heartbeat:
    """While entered, a thread records every `interval` seconds that the trial is alive.

    A missed heartbeat (the database is away) is not an error: if the outage
    outlasts the grace period, another worker fails the trial as stale.
    """

    def __init__(self, trial: optuna.Trial, interval: int) -> None:
        self.trial = trial
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                record_heartbeat(self.trial)
            except Exception:  # noqa: BLE001 - a heartbeat is best effort by design
                pass
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def _seed_allocations_once(study: optuna.Study, config, progress: bool) -> None:
    """Enqueue missing allocator seeds here, once, before pooled workers start (each
    would otherwise measure the allocator's costs itself)."""
    from qopt.study.allocation import enqueue_seeds, missing_seeds
    from qopt.study.objective import SearchRun

    if missing_seeds(study, config):
        enqueue_seeds(study, SearchRun(config), progress=progress)


def _pool_worker(job: Job) -> None:
    """A pooled worker process: user errors are one line and exit 2; Ctrl-C exits 130."""
    try:
        run_worker(job)
    except QoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_pool(jobs: list[Job], progress: bool) -> None:
    """Run one worker process per job with one progress bar. A worker that dies (killed,
    out of memory) is replaced by one that runs the rest of its share. Ctrl-C or SIGTERM
    stops them all cleanly."""
    from qopt.study.create import load

    context = multiprocessing.get_context("spawn")  # torch and fork do not mix

    def start(job: Job) -> multiprocessing.Process:
        proc = context.Process(target=_pool_worker, args=(job,))
        proc.start()
        return proc

    slots = [(job, start(job)) for job in jobs]
    replaced = [0] * len(jobs)
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    study, _ = load(jobs[0].name, jobs[0].url)
    errors: list[int] = []
    total = None if any(job.n_trials is None for job in jobs) else sum(job.n_trials or 0 for job in jobs)
    try:
        with tqdm(total=total, desc=f"{len(jobs)} workers", disable=not progress) as bar:
            while any(proc is not None for _, proc in slots):
                time.sleep(1.0)
                try:
                    bar.n = launched(study, jobs[0].launch_id, (TrialState.COMPLETE, TrialState.PRUNED))
                    bar.refresh()
                except TRANSIENT_ERRORS:
                    pass  # the workers ride the outage out; the bar catches up after it
                for i, (job, proc) in enumerate(slots):
                    if proc is None or proc.is_alive():
                        continue
                    slots[i] = (job, None)
                    if proc.exitcode in (0, 130):
                        continue
                    rest = _rest_of(job, study, proc.pid) if proc.exitcode < 0 else 0
                    if rest != 0 and replaced[i] < _REPLACEMENTS_PER_SLOT:
                        replaced[i] += 1
                        print(f"worker {proc.pid} died (signal {-proc.exitcode}); a replacement runs the rest of "
                              "its trials", file=sys.stderr, flush=True)  # fmt: skip
                        job = dataclasses.replace(job, n_trials=rest)
                        slots[i] = (job, start(job))
                    elif proc.exitcode > 0 or rest != 0:
                        errors.append(proc.exitcode)
    except KeyboardInterrupt:
        for _, proc in slots:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for _, proc in slots:
            if proc is not None:
                proc.join(timeout=60)
        raise
    finally:
        for _, proc in slots:
            if proc is not None:
                proc.join()
        signal.signal(signal.SIGTERM, previous_handler)
    if errors:
        raise QoptError(f"{len(errors)} of {len(jobs)} workers exited with errors (exit codes {errors})")


def _rest_of(job: Job, study: optuna.Study, pid: int) -> int | None:
    """How many of a dead worker's trials are still to run (None: no fixed share, 0: none)."""
    if job.n_trials is None:
        return None
    return max(0, job.n_trials - finished_by(study, worker_id(pid), job.launch_id))
