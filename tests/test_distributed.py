"""Several workers on one PostgreSQL study: concurrency, a killed worker, SIGTERM, bad input.

Needs PostgreSQL (CI has it on 127.0.0.1:5432, trust auth, database `test`; set
QOPT_TEST_POSTGRES to use another). Skipped with the reason when none answers.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from qopt import study as qstudy
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings
from qopt.space import SearchConfig
from qopt.storage import redacted_url
from qopt.strategy import FP16

POSTGRES = os.environ.get("QOPT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def postgres() -> str:
    try:
        with sqlalchemy.create_engine(POSTGRES).connect():
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {redacted_url(POSTGRES)}: {str(exc).splitlines()[0]}")
    return POSTGRES


@pytest.fixture
def name(postgres):
    study_name = f"test-{uuid.uuid4().hex[:10]}"
    yield study_name
    try:
        optuna.delete_study(study_name=study_name, storage=postgres)
    except KeyError:
        pass


def _config(tiny_llama_dir, small_text, search_windows=2) -> qstudy.StudyConfig:
    return qstudy.StudyConfig(
        model=str(tiny_llama_dir),
        data=str(small_text),
        budget_bpw=3.5,
        population=8,
        collapse_kl=1e9,  # count every trial as completed, so counts are exact
        screen_margin=0,
        eval=EvalSettings(seq_len=64, search_windows=search_windows, eval_windows=2, calib_windows=2, batch_size=2),
        search=SearchConfig(group_sizes=(16, 32), base=FP16.evolve(bits=4, group_size=32)),
    )


def _states(postgres, name) -> list[TrialState]:
    return [t.state for t in optuna.load_study(study_name=name, storage=postgres).trials]


def test_four_workers_share_one_study(postgres, name, tiny_llama_dir, small_text):
    qstudy.create(name, _config(tiny_llama_dir, small_text), postgres)
    qstudy.launch(name, n_trials=100, url=postgres, progress=False, workers=4, heartbeat=2)
    study = optuna.load_study(study_name=name, storage=postgres)
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 100
    assert sorted(t.number for t in study.trials) == list(range(100))  # no duplicates, none lost
    per_worker = collections.Counter(t.user_attrs["worker"] for t in study.trials)
    assert len(per_worker) == 4 and sum(per_worker.values()) == 100  # shared dynamically, none idle
    assert sum("baseline" in t.user_attrs for t in study.trials) == 4  # each enqueued baseline ran once


def _launch_cli(name, postgres, *args, via_env=False) -> subprocess.Popen:
    """`qopt study launch NAME ...` as a user types it; the storage by flag or by $QOPT_STORAGE."""
    command = [sys.executable, "-m", "qopt", "study", "launch", name, *args]
    env = dict(os.environ)
    if via_env:
        env["QOPT_STORAGE"] = postgres  # as docker-compose.yml passes it
    else:
        command += ["--storage", postgres]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _freeze_in_trial(proc, postgres, name, timeout=120.0, evaluating=False) -> int:
    """Stop `proc` (SIGSTOP) in the middle of a trial, after it completed two; return that
    trial's number. Trials take milliseconds, so the process is frozen before each look
    and let run only briefly between looks. With `evaluating`, only a trial whose genes
    are drawn (and written) counts: it is in its evaluation."""

    def ours():
        trials = optuna.load_study(study_name=name, storage=postgres).trials
        return [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{proc.pid}")]

    deadline = time.monotonic() + timeout
    while sum(t.state == TrialState.COMPLETE for t in ours()) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never completed two trials"
        time.sleep(0.05)
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        running = [t for t in ours() if t.state == TrialState.RUNNING and (t.params or not evaluating)]
        if running:
            return running[0].number
        proc.send_signal(signal.SIGCONT)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("never caught the worker inside a trial")


def test_killed_worker_trial_fails_and_is_retried(postgres, name, tiny_llama_dir, small_text):
    qstudy.create(name, _config(tiny_llama_dir, small_text, search_windows=8), postgres)
    victim = _launch_cli(name, postgres, "--until", "40", "--heartbeat", "1")
    survivor = None
    try:
        killed_trial = _freeze_in_trial(victim, postgres, name, evaluating=True)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        # Trials take milliseconds: start the next worker once the dead one's heartbeat is stale
        # (3 heartbeats), so that its first trial finds the stale trial, fails and re-queues it.
        time.sleep(4)
        survivor = _launch_cli(name, postgres, "--until", "40", "--heartbeat", "1", via_env=True)
        _, err = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, err
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.poll() is None:
                proc.kill()
    study = optuna.load_study(study_name=name, storage=postgres)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed_trial].state == TrialState.FAIL  # by the survivor, at its first trial
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    # the genes reached the database before the evaluation: the retry has every one of them
    assert by_number[killed_trial].params and by_number[killed_trial].params == retries[0].params
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 40 and TrialState.RUNNING not in states


def test_sigterm_stops_a_worker_cleanly(postgres, name, tiny_llama_dir, small_text):
    qstudy.create(name, _config(tiny_llama_dir, small_text, search_windows=8), postgres)
    worker = _launch_cli(name, postgres, "--n-trials", "500", "--heartbeat", "1")
    try:
        _freeze_in_trial(worker, postgres, name)
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGCONT)
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    states = _states(postgres, name)
    assert TrialState.RUNNING not in states and states.count(TrialState.FAIL) == 1


def test_bad_input_leaves_the_study_intact(postgres, name, tiny_llama_dir, small_text, tmp_path):
    config = _config(tiny_llama_dir, small_text)
    qstudy.create(name, config, postgres)
    qstudy.launch(name, n_trials=6, url=postgres, progress=False)
    before = _states(postgres, name)
    user = sqlalchemy.engine.make_url(postgres)
    cases = [
        (lambda: qstudy.load(name, user.set(password="s3cret", port=1).render_as_string(hide_password=False)),
         "cannot open storage"),
        (lambda: qstudy.load(name, user.set(database="qopt_no_such_db").render_as_string(hide_password=False)),
         "cannot open storage"),
        (lambda: qstudy.load("no-such-study", postgres), "no study named 'no-such-study'"),
        (lambda: qstudy.create(name, dataclasses.replace(config, population=9), postgres), "population differs"),
        (lambda: qstudy.create(f"{name}-m", dataclasses.replace(config, model="/no/model"), postgres),
         "model path /no/model does not exist"),
        (lambda: qstudy.create(f"{name}-b", dataclasses.replace(config, budget_bpw=1.5), postgres),
         "below the smallest bpw"),
        (lambda: qstudy.best(name, 3.5, postgres)[1].save("/dev/full"), "No space left on device"),
    ]  # fmt: skip
    for action, message in cases:
        with pytest.raises(QoptError, match=message) as info:
            action()
        assert "s3cret" not in str(info.value)
    assert _states(postgres, name) == before
    names = {s.study_name for s in optuna.get_all_study_summaries(postgres)}
    assert f"{name}-m" not in names and f"{name}-b" not in names


def _pg_cluster(action: str) -> None:
    """Stop or start the local PostgreSQL cluster (Debian's pg_ctlcluster), or skip the test."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        pytest.skip("no local PostgreSQL cluster this test can stop and start (pg_ctlcluster)")
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action]
    if action == "stop":
        command += ["-m", "fast"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot {action} the local PostgreSQL cluster: {done.stderr.strip()[:200]}")


def _local(url: str) -> bool:
    return sqlalchemy.engine.make_url(url).host in ("127.0.0.1", "localhost", None)


def test_launch_rides_out_a_database_restart(postgres, name, tiny_llama_dir, small_text):
    if not _local(postgres):
        pytest.skip("the database is not on this machine: cannot restart it")
    qstudy.create(name, _config(tiny_llama_dir, small_text, search_windows=8), postgres)
    launch = _launch_cli(name, postgres, "--n-trials", "40", "--workers", "2", "--heartbeat", "1")
    stopped = False
    try:
        deadline = time.monotonic() + 120
        while sum(s == TrialState.COMPLETE for s in _states(postgres, name)) < 8:
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        _pg_cluster("stop")
        stopped = True
        time.sleep(8)  # longer than the grace period (3 heartbeats): running trials look stale
        _pg_cluster("start")
        stopped = False
        _, err = launch.communicate(timeout=300)
    finally:
        if stopped:
            _pg_cluster("start")
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, err[-3000:]
    assert "database unreachable" in err and "Traceback" not in err, err[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres)
    launches = collections.Counter(t.user_attrs.get("launch") for t in study.trials if t.state == TrialState.COMPLETE)
    assert max(launches.values()) == 40  # the requested count, all in the one launch
    assert TrialState.RUNNING not in [t.state for t in study.trials]
