"""Studies: a search configuration stored with its trials in an Optuna storage.

`create` stores the `StudyConfig` in the study's user attributes and enqueues
the uniform round-to-nearest baselines as the first trials; `launch` (any
number of times, on any number of machines sharing the storage) loads it back,
loads the model once, and runs NSGA-II trials. Every trial is rebuildable
from the database alone: its params decode to a genome under the stored
config's search space.

Storage (SQLite by default, PostgreSQL for several machines) is `qopt.storage`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from qopt.baselines import label
from qopt.errors import QoptError, first_line
from qopt.evaluate import EvalSettings, Evaluator, Metrics, Rejected, Verdict
from qopt.io import read_document
from qopt.operators import GenomeSampler, VariationConfig
from qopt.space import SearchConfig, SearchSpace
from qopt.storage import count_trials, open_storage, redacted_url, storage_url
from qopt.strategy import FORMAT_BITS, FP16, LayerConfig, Strategy, drop_inactive_genes

#: Recorded on every trial: which machine and process ran it.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
_DB_RETRIES = 4
QUALITY_OBJECTIVES = ("kl", "ppl")
EXTRA_OBJECTIVES = ("total_mib",)
_CONFIG_ATTR = "qopt:config"
_EVAL_ATTR_PREFIX = "qopt:eval:"
#: How the `rejected` user attribute of a trial stopped by the multi-fidelity screen begins.
SCREENED = "screened out"


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study needs besides its storage.

    `objectives` are minimised: a quality (`kl` or `ppl`, on the search part),
    then `bpw`, then optionally `total_mib` (whole-model size, edges included).
    `budget_bpw` is a constraint: trials above it never enter the front.
    `collapse_kl` rejects a trial after one batch when its KL exceeds it.
    `screen_margin` is multi-fidelity screening: after the first batch
    (`eval.screen_windows` windows) a trial stops if some completed trial
    with no more bpw had a first-batch KL `screen_margin` times lower (0: off).
    KL is the screening statistic whichever quality objective is searched.
    `dtype` is what the model's weights are held and computed in (float32,
    bfloat16 or float16). `baselines` are uniform strategies enqueued as the first trials: each
    entry is a bit-width (round-to-nearest) or a mapping of genes laid over the
    search's `base` config (e.g. `{bits: 3, granularity: channel}` or
    `{bits: 3, rounding: gptq}`).
    """

    model: str
    data: str
    budget_bpw: float | None = None
    objectives: tuple[str, ...] = ("kl", "bpw")
    population: int = 24
    seed: int = 0
    collapse_kl: float = 4.0
    screen_margin: float = 1.25
    baselines: tuple[int | Mapping[str, Any], ...] = (2, 3, 4, 8)
    device: str | None = None
    dtype: str = "float32"
    eval: EvalSettings = field(default_factory=EvalSettings)
    search: SearchConfig = field(default_factory=SearchConfig)
    variation: VariationConfig = field(default_factory=VariationConfig)

    def __post_init__(self) -> None:
        objectives = self.objectives
        if len(objectives) not in (2, 3) or objectives[0] not in QUALITY_OBJECTIVES or objectives[1] != "bpw":
            raise QoptError(
                f"objectives: {list(objectives)} must be [kl|ppl, bpw] plus optionally one of {list(EXTRA_OBJECTIVES)}"
            )
        if len(objectives) == 3 and objectives[2] not in EXTRA_OBJECTIVES:
            raise QoptError(f"objectives: third objective {objectives[2]!r} is not one of {list(EXTRA_OBJECTIVES)}")
        if self.population < 2:
            raise QoptError(f"population: {self.population} must be at least 2")
        if self.budget_bpw is not None and self.budget_bpw <= 0:
            raise QoptError(f"budget_bpw: {self.budget_bpw} must be positive")
        if self.screen_margin != 0 and self.screen_margin < 1:
            raise QoptError(f"screen_margin: {self.screen_margin} must be 0 (off) or at least 1")
        baseline_strategies(self)  # reject a malformed baseline now, naming it
        from qopt.model import parse_dtype

        parse_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search"]["base"] = self.search.base.to_dict()
        return _lists(data)

    @classmethod
    def from_dict(cls, data: Any, where: str = "study config") -> StudyConfig:
        if not isinstance(data, Mapping):
            raise QoptError(f"{where}: expected a mapping, got {type(data).__name__}")
        fields = _checked(cls, data, where)
        for key in ("model", "data"):
            if key not in fields:
                raise QoptError(f"{where}: {key} is required")
        if "eval" in fields:
            fields["eval"] = EvalSettings(**_checked(EvalSettings, fields["eval"], "eval"))
        if "search" in fields:
            search = _checked(SearchConfig, fields["search"], "search")
            if "base" in search:
                search["base"] = LayerConfig.from_dict(search["base"], where="search.base")
            fields["search"] = SearchConfig(**_tuples(search))
        if "variation" in fields:
            fields["variation"] = VariationConfig(**_checked(VariationConfig, fields["variation"], "variation"))
        try:
            return cls(**_tuples(fields))
        except TypeError as exc:
            raise QoptError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> StudyConfig:
        """Read a study YAML; relative model/data paths are relative to the file."""
        path = Path(path)
        config = cls.from_dict(read_document(path, "study config"), where=str(path))
        resolved = {}
        for key in ("model", "data"):
            value = getattr(config, key)
            candidate = (path.parent / value).resolve()
            if not Path(value).is_absolute() and not value.startswith("hf:") and candidate.exists():
                resolved[key] = str(candidate)
        return dataclasses.replace(config, **resolved)


def create(name: str, config: StudyConfig, url: str | None = None) -> optuna.Study:
    """Create study `name` (idempotent for the same config) and enqueue baselines."""
    from qopt.model import load_skeleton

    storage = open_storage(url)
    stored, wanted = _stored_config(storage, name), config.to_dict()
    if stored is not None:
        if stored != wanted:
            key = next(k for k in wanted if stored.get(k) != wanted[k])
            raise QoptError(f"study {name!r} already exists with a different config ({key} differs); pick another name")
        return optuna.load_study(study_name=name, storage=storage)
    space = SearchSpace(load_skeleton(config.model).units, config.search)
    floor = space.min_bpw()
    if config.budget_bpw is not None and config.budget_bpw < floor:
        raise QoptError(
            f"budget_bpw: {config.budget_bpw} is below the smallest bpw this search space can reach ({floor:.3f})"
        )
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize"] * len(config.objectives))
    study.set_user_attr(_CONFIG_ATTR, wanted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.objectives))
    for strategy in baseline_strategies(config):
        _enqueue_baseline(study, space, strategy)
    return study


def _enqueue_baseline(study: optuna.Study, space: SearchSpace, strategy: Strategy) -> dict[str, Any] | None:
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
    storage = open_storage(url)
    study, _ = _load_from(storage, name, url)
    all_params = [_enqueue_baseline(study, run.space, strategy) for strategy, _ in measured]
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, _ = _load_from(storage, name, url, sampler=run.sampler(len(study.get_trials(deepcopy=False))))
        study.optimize(run.objective, n_trials=waiting)
    numbers: list[int | None] = []
    for (_, held_out), params in zip(measured, all_params, strict=True):
        match = [t.number for t in completed(study) if "baseline" in t.user_attrs and t.params == params]
        number = match[0] if params is not None and match else None
        if number is not None:
            run.store_held_out(study, number, held_out)
        numbers.append(number)
    return numbers


def baseline_strategies(config: StudyConfig) -> list[Strategy]:
    """The configured uniform strategies: round-to-nearest with no outliers, fp32,
    unless an entry names other genes (e.g. `{bits: 3, rounding: gptq}`)."""
    plain = {"outliers": "none", "act_format": "none", "accumulation": "fp32", "rounding": "nearest"}
    out = []
    for i, entry in enumerate(config.baselines):
        genes = {"bits": entry} if isinstance(entry, int) else dict(entry)
        merged = {**config.search.base.to_dict(), **plain, **genes}
        if merged["bits"] not in FORMAT_BITS[merged.get("format", "int")]:
            merged["format"] = "int"
        try:
            layer = FP16.evolve(**drop_inactive_genes(merged))
        except QoptError as exc:
            raise QoptError(f"baselines[{i}].{exc}") from None
        out.append(Strategy(default=layer, name=label(layer)))
    return out


def load(name: str, url: str | None = None, heartbeat: int | None = None) -> tuple[optuna.Study, StudyConfig]:
    """Load an existing study and its config; a clear error if there is none."""
    return _load_from(open_storage(url, heartbeat), name, url)


def _load_from(
    storage: optuna.storages.BaseStorage, name: str, url: str | None, sampler: optuna.samplers.BaseSampler | None = None
) -> tuple[optuna.Study, StudyConfig]:
    stored = _stored_config(storage, name)
    if stored is None:
        where = redacted_url(storage_url(url))
        raise QoptError(f"no study named {name!r} in {where}; create it with `qopt study create {name} --config FILE`")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler), StudyConfig.from_dict(stored)


# ---- running ----------------------------------------------------------
class SearchRun:
    """One worker's view of a study: the model loaded once, an evaluator, the space."""

    def __init__(self, config: StudyConfig, progress: bool = False) -> None:
        from qopt.data import load_text
        from qopt.model import load_model, parse_dtype

        self.config = config
        self.lm = load_model(config.model, device=config.device, dtype=parse_dtype(config.dtype))
        self.evaluator = Evaluator.from_text(self.lm, load_text(config.data), config.eval, progress=progress)
        self.space = SearchSpace(self.lm.units, config.search)
        #: Context of each evaluation: where a worker's stop signal may interrupt (see `_Stop`).
        self.evaluation: Callable[[], AbstractContextManager[None]] = nullcontext

    def sampler(self, n_existing: int) -> GenomeSampler:
        # The uniform baselines that fit the budget seed the structured first generation.
        budget = self.config.budget_bpw if self.config.budget_bpw is not None else float("inf")
        seeds = []
        for strategy in baseline_strategies(self.config):
            genome = self.space.genome_of(strategy)
            if self.space.bpw(genome) <= budget:
                seeds.append(strategy.default)
        # Offset the seed by the trials already there, so a relaunch does not replay draws.
        return GenomeSampler(
            self.space,
            population_size=self.config.population,
            variation=self.config.variation,
            budget_bpw=self.config.budget_bpw,
            seeds=seeds,
            seed=self.config.seed + n_existing,
        )

    def objective(self, trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr("worker", WORKER_ID)
        # The completed trials (any worker's) this one's first batch is screened against.
        rivals = self._screen_rivals(trial.study) if self.config.screen_margin else []
        genome = self.space.sample(trial)
        bpw = self.space.bpw(genome)
        trial.set_user_attr("bpw", bpw)
        if self.config.budget_bpw is not None:
            trial.set_constraint("bpw_over_budget", bpw - self.config.budget_bpw)
        strategy = self.space.strategy(genome, name=f"trial {trial.number}")
        # Baselines are reference points: measure them in full even when they collapse.
        baseline = "baseline" in trial.user_attrs
        cap = None if baseline else self.config.collapse_kl
        verdict = None if baseline or not self.config.screen_margin else self._screen(rivals, bpw)
        try:
            with self.evaluation():
                metrics = self.evaluator.evaluate(strategy, "search", collapse_kl=cap, verdict=verdict)
        except Rejected as exc:
            trial.set_user_attr("rejected", str(exc))
            trial.set_user_attr("screen_kl", exc.kl)
            trial.set_user_attr("fidelity", exc.tokens)
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("ppl", metrics.ppl)
        trial.set_user_attr("top1", metrics.top1)
        trial.set_user_attr("seconds", metrics.seconds)
        trial.set_user_attr("screen_kl", metrics.screen_kl)
        trial.set_user_attr("fidelity", metrics.tokens)
        return _objective_values(self.config.objectives, metrics)

    @staticmethod
    def _screen_rivals(study: optuna.Study) -> list[tuple[float, float, int]]:
        """(first-batch KL, bpw, number) of every completed trial that recorded one."""
        return [
            (t.user_attrs["screen_kl"], t.user_attrs.get("bpw", float("inf")), t.number)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "screen_kl" in t.user_attrs
        ]

    def _screen(self, rivals: list[tuple[float, float, int]], bpw: float) -> Verdict:
        """Stop a strategy whose first-batch KL is `screen_margin` times that of a completed
        trial of no more bpw: it is clearly dominated. (First-batch KLs of all trials are
        on the same windows, so the comparison is paired.)"""
        best = min(((kl, number) for kl, rival_bpw, number in rivals if rival_bpw <= bpw), default=None)
        margin = self.config.screen_margin

        def verdict(kl: float) -> str | None:
            if best is None or kl <= margin * best[0]:
                return None
            return (
                f"{SCREENED}: first-batch KL {kl:.4g} > {margin:g} x {best[0]:.4g} "
                f"of trial {best[1]}, which has no more bpw"
            )

        return verdict

    def measure_held_out(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, float]:
        """Measure a trial on the evaluation part and store the metrics in the study."""
        m = self.evaluator.evaluate(self.space.strategy(self.space.decode(trial.params)), "eval")
        return self.store_held_out(study, trial.number, m)

    @staticmethod
    def store_held_out(study: optuna.Study, number: int, m: Metrics) -> dict[str, float]:
        """Store a trial's metrics on the evaluation part in the study (read by `front`)."""
        held_out = {"kl": m.kl, "ppl": m.ppl, "top1": m.top1, "fp_ppl": m.fp_ppl}
        study.set_user_attr(f"{_EVAL_ATTR_PREFIX}{number}", held_out)
        return held_out


def launch(
    name: str,
    n_trials: int | None,
    timeout: float | None = None,
    url: str | None = None,
    progress: bool = True,
    workers: int = 1,
    until: int | None = None,
    heartbeat: int = 10,
) -> int:
    """Run trials of an existing study; returns how many completed in this launch.

    `n_trials` are shared among `workers` processes on this machine (each
    loads the model once); `until` stops every worker once the study holds
    that many completed trials, whoever ran them. The same call on other
    machines with the same storage joins the same study.
    """
    if workers < 1:
        raise QoptError(f"--workers must be at least 1, got {workers}")
    study, _ = load(name, url)  # fail fast on a bad name or storage, before any process starts
    before = count_trials(study, TrialState.COMPLETE)
    job = _Job(name, url, n_trials, timeout, until, heartbeat, progress)
    if workers == 1:
        _run_worker(job)
    else:
        shares: list[int | None] = [None] * workers
        if n_trials is not None:
            shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
        threads = max(1, (os.cpu_count() or 1) // workers)  # share the cores instead of oversubscribing
        _run_pool([dataclasses.replace(job, n_trials=s, progress=False, threads=threads) for s in shares], progress)
    return count_trials(study, TrialState.COMPLETE) - before


@dataclass(frozen=True)
class _Job:
    """What one worker is asked to do (picklable: pooled workers are spawned processes)."""

    name: str
    url: str | None
    n_trials: int | None
    timeout: float | None
    until: int | None
    heartbeat: int
    progress: bool
    threads: int | None = None


def _run_worker(job: _Job) -> None:
    """One worker: load the model once, then run trials until told to stop.

    SIGTERM and Ctrl-C stop the worker without leaving a trial RUNNING or half
    written (`_Stop`). Transient database errors are retried with backoff,
    resuming the remaining trials.
    """
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _work(job, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stop:
    """Turns a stop signal into KeyboardInterrupt at a safe point.

    While a trial's strategy is being evaluated (numerics only) the interrupt
    is immediate, and Optuna marks the trial failed. Anywhere else (a database
    write, Optuna's bookkeeping) it waits for the next evaluation or the next
    trial's start, so no trial is left RUNNING or half written.
    """

    def __init__(self) -> None:
        self.interruptible = False
        self.requested = False

    def handle(self, _signum, _frame) -> None:
        if self.interruptible:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Where a stop signal may interrupt at once."""
        if self.requested:
            raise KeyboardInterrupt
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def guard(
        self, objective: Callable[[optuna.Trial], tuple[float, ...]]
    ) -> Callable[[optuna.Trial], tuple[float, ...]]:
        """`objective`, failing at its start if a stop was requested between trials."""

        def guarded(trial: optuna.Trial) -> tuple[float, ...]:
            if self.requested:
                raise KeyboardInterrupt
            return objective(trial)

        return guarded


def _work(job: _Job, stop: _Stop) -> None:
    storage = open_storage(job.url, job.heartbeat)
    study, config = _load_from(storage, job.name, job.url)
    run = SearchRun(config)
    run.evaluation = stop.evaluation
    callbacks = [optuna.study.MaxTrialsCallback(job.until, states=(TrialState.COMPLETE,))] if job.until else []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    ours_before = _finished_by_this_worker(study)
    for attempt in range(_DB_RETRIES + 1):
        done = _finished_by_this_worker(study) - ours_before
        remaining = None if job.n_trials is None else job.n_trials - done
        left = None if job.timeout is None else job.timeout - (time.monotonic() - started)
        if (remaining is not None and remaining <= 0) or (left is not None and left <= 0):
            return
        if job.until is not None and count_trials(study, TrialState.COMPLETE) >= job.until:
            return
        try:
            # A new sampler on the loaded study: loading it again would re-read every trial.
            study.sampler = run.sampler(len(study.get_trials(deepcopy=False)))
            study.optimize(
                stop.guard(run.objective),
                n_trials=remaining,
                timeout=left,
                callbacks=callbacks,
                show_progress_bar=job.progress,
            )
            return
        except sqlalchemy.exc.OperationalError as exc:
            if attempt == _DB_RETRIES:
                raise QoptError(f"database error, gave up after {_DB_RETRIES} retries: {first_line(exc)}") from None
            wait = 2**attempt
            print(f"database error ({first_line(exc)}); retrying in {wait} s", file=sys.stderr)
            time.sleep(wait)


def _pool_worker(job: _Job) -> None:
    """A pooled worker process: user errors are one line and exit 2; Ctrl-C exits 130."""
    try:
        _run_worker(job)
    except QoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_pool(jobs: list[_Job], progress: bool) -> None:
    """Run one worker process per job, with one progress bar; Ctrl-C or SIGTERM stops them all cleanly."""
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    procs = [context.Process(target=_pool_worker, args=(job,)) for job in jobs]
    for proc in procs:
        proc.start()
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    name, url = jobs[0].name, jobs[0].url
    try:
        study, _ = load(name, url)
        start = count_trials(study, TrialState.COMPLETE)
        shares = [job.n_trials for job in jobs]
        total = sum(s for s in shares if s is not None) if None not in shares else None
        with tqdm(total=total, desc=f"{len(procs)} workers", disable=not progress) as bar:
            while any(p.is_alive() for p in procs):
                time.sleep(1.0)
                bar.n = count_trials(study, TrialState.COMPLETE) - start
                bar.refresh()
    except KeyboardInterrupt:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for proc in procs:
            proc.join(timeout=60)
        raise
    finally:
        for proc in procs:
            proc.join()
        signal.signal(signal.SIGTERM, previous_handler)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, 130)]
    if failed:
        raise QoptError(f"{len(failed)} of {len(procs)} workers exited with errors (exit codes {failed})")


# ---- reading results ---------------------------------------------------
@dataclass(frozen=True)
class FrontMember:
    """One strategy on (or beside) the Pareto front, with held-out metrics."""

    trial: int
    bpw: float
    search_kl: float
    search_ppl: float
    eval_kl: float
    eval_ppl: float
    eval_top1: float
    baseline: str | None


def front(name: str, url: str | None = None, with_baselines: bool = True) -> list[FrontMember]:
    """The feasible Pareto front (by search-part objectives), evaluated on the eval part.

    Baseline trials are appended (marked) so a front can be read against them.
    """
    study, config = load(name, url)
    trials = sorted(study.best_trials, key=lambda t: t.user_attrs["bpw"])
    if with_baselines:
        chosen = {t.number for t in trials}
        trials += [t for t in completed(study) if "baseline" in t.user_attrs and t.number not in chosen]
    if not trials:
        return []
    run: SearchRun | None = None  # loaded only if some member's held-out metrics are missing
    members = []
    for trial in trials:
        held_out = study.user_attrs.get(f"{_EVAL_ATTR_PREFIX}{trial.number}")  # measured once, then stored
        if held_out is None:
            run = run or SearchRun(config)
            held_out = run.measure_held_out(study, trial)
        members.append(
            FrontMember(
                trial=trial.number,
                bpw=trial.user_attrs["bpw"],
                search_kl=trial.values[0] if config.objectives[0] == "kl" else float("nan"),
                search_ppl=trial.user_attrs.get("ppl", float("nan")),
                eval_kl=held_out["kl"],
                eval_ppl=held_out["ppl"],
                eval_top1=held_out["top1"],
                baseline=trial.user_attrs.get("baseline"),
            )
        )
    return members


def best(name: str, max_bpw: float, url: str | None = None) -> tuple[FrozenTrial, Strategy]:
    """The feasible trial with the best search-part quality at bpw <= `max_bpw`, as a Strategy."""
    study, config = load(name, url)
    budget = config.budget_bpw if config.budget_bpw is not None else float("inf")
    eligible = [t for t in completed(study) if t.user_attrs["bpw"] <= min(max_bpw, budget)]
    if not eligible:
        raise QoptError(f"no completed trial of study {name!r} has bpw <= {max_bpw}")
    trial = min(eligible, key=lambda t: t.values[0])
    return trial, _strategy_of(name, config, trial)


def trial_strategy(name: str, number: int, url: str | None = None) -> tuple[StudyConfig, FrozenTrial, Strategy]:
    """Trial `number` of study `name` (any state that drew its genes), as a Strategy."""
    study, config = load(name, url)
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        raise QoptError(f"study {name!r} has no trial {number} (it has {len(trials)})")
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise QoptError(f"trial {number} of study {name!r} is {trial.state.name.lower()}, not measured")
    return config, trial, _strategy_of(name, config, trial)


def _strategy_of(name: str, config: StudyConfig, trial: FrozenTrial) -> Strategy:
    from qopt.model import load_skeleton

    space = SearchSpace(load_skeleton(config.model).units, config.search)
    return space.strategy(space.decode(trial.params), name=f"{name} trial {trial.number}")


def structure(name: str, url: str | None = None):
    """The emergent structure of study `name`'s feasible front (`qopt.structure.Structure`)."""
    from qopt.model import load_skeleton
    from qopt.structure import analyse

    study, config = load(name, url)
    space = SearchSpace(load_skeleton(config.model).units, config.search)
    return analyse(space, study.best_trials, completed(study))


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def status(name: str, url: str | None = None) -> dict[str, Any]:
    """Counts by state, the front's size, and timing of a study. `screened` trials
    (pruned after their first batch by the multi-fidelity screen) are among the pruned."""
    study, config = load(name, url)
    trials = study.get_trials(deepcopy=False)
    done = completed(study)
    durations = [t.duration.total_seconds() for t in done if t.duration is not None]
    return {
        "name": name,
        "model": config.model,
        "budget_bpw": config.budget_bpw,
        "objectives": list(config.objectives),
        "trials": len(trials),
        **{state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "front": len(study.best_trials),
        "baselines": sum("baseline" in t.user_attrs for t in done),
        "screened": sum(t.user_attrs.get("rejected", "").startswith(SCREENED) for t in trials),
        "mean_trial_seconds": sum(durations) / len(durations) if durations else None,
        "generation": max((t.system_attrs.get("GenomeSampler:generation", 0) for t in trials), default=0),
    }


# ---- helpers -----------------------------------------------------------
def _objective_values(objectives: tuple[str, ...], m: Metrics) -> tuple[float, ...]:
    table = {"kl": m.kl, "ppl": m.ppl, "bpw": m.bpw, "total_mib": m.total_bytes / 2**20}
    return tuple(table[o] for o in objectives)


def _stored_config(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = storage.get_study_user_attrs(study_id)
    if _CONFIG_ATTR not in attrs:
        raise QoptError(f"study {name!r} exists but was not made by qopt (no stored config)")
    return attrs[_CONFIG_ATTR]


def _finished_by_this_worker(study: optuna.Study) -> int:
    trials = study.get_trials(deepcopy=False)
    return sum(t.user_attrs.get("worker") == WORKER_ID and t.state.is_finished() for t in trials)


def _checked(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise QoptError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise QoptError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(allowed))})")
    return dict(data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _lists(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _lists(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_lists(v) for v in data]
    return data
