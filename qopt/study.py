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
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from qopt.baselines import label
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator, Metrics, Rejected, Verdict
from qopt.io import read_document
from qopt.operators import GenomeSampler, VariationConfig
from qopt.space import SearchConfig, SearchSpace
from qopt.storage import count_trials, load_trial, open_storage, redacted_url, storage_url, trial_summaries
from qopt.strategy import FORMAT_BITS, FP16, LayerConfig, Strategy, drop_inactive_genes
from qopt.workers import worker_id

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
    from qopt.data import load_text
    from qopt.model import load_skeleton

    storage = open_storage(url, create=True)
    wanted = config.to_dict()
    if _stored_config(storage, name) is not None:
        study = _same_study(storage, name, wanted)
        # An earlier create may have stopped before enqueuing every baseline: enqueue what is missing.
        missing = [s for s in baseline_strategies(config) if not count_trials(study, user_attrs={"baseline": s.name})]
        if missing:
            space = SearchSpace(load_skeleton(config.model).units, config.search)
            for strategy in missing:
                _enqueue_baseline(study, space, strategy)
        return study
    if not config.data.startswith("hf:"):
        load_text(config.data)  # an unreadable text fails here, not in every worker
    space = SearchSpace(load_skeleton(config.model).units, config.search)
    floor = space.min_bpw()
    if config.budget_bpw is not None and config.budget_bpw < floor:
        raise QoptError(
            f"budget_bpw: {config.budget_bpw} is below the smallest bpw this search space can reach ({floor:.3f})"
        )
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=["minimize"] * len(config.objectives))
    except optuna.exceptions.DuplicatedStudyError:  # another `create` of the same name got there first
        return _same_study(storage, name, wanted, wait_s=10.0)
    study.set_user_attr(_CONFIG_ATTR, wanted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.objectives))
    for strategy in baseline_strategies(config):
        _enqueue_baseline(study, space, strategy)
    return study


def _same_study(storage, name: str, wanted: dict[str, Any], wait_s: float = 0.0) -> optuna.Study:
    """The existing study `name` if its config is `wanted`; else a one-line error. Waits up to
    `wait_s` for a concurrent `create` to store its config."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stored = _stored_config(storage, name)
            break
        except QoptError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if stored != wanted:
        key = next(k for k in wanted if stored.get(k) != wanted[k])
        raise QoptError(f"study {name!r} already exists with a different config ({key} differs); pick another name")
    return optuna.load_study(study_name=name, storage=storage)


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

    def __init__(self, config: StudyConfig, progress: bool = False, retry: Callable[..., Any] | None = None) -> None:
        from qopt.data import load_text
        from qopt.model import load_model, parse_dtype

        self.config = config
        #: retry(what, fn, *args) calls fn(*args), riding out database outages (`qopt.workers.Retrying`).
        self.db = retry or (lambda _what, fn, *args, **kwargs: fn(*args, **kwargs))
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

    def objective(self, trial: optuna.Trial, before_evaluation: Callable[[], None] | None = None) -> tuple[float, ...]:
        """Draw trial's genes, measure the strategy on the search part, return its objective values.

        `before_evaluation` runs once the genes are drawn (a worker writes them to the
        database there, so a retry of a killed trial has the same genes). Every database
        call goes through `self.db`, so a worker rides out an outage mid-trial.
        """
        db = self.db
        db("recording the worker", trial.set_user_attr, "worker", worker_id())
        # The completed trials (any worker's) this one's first batch is screened against.
        rivals = db("reading rivals", self._screen_rivals, trial.study) if self.config.screen_margin else []
        genome = db("drawing genes", self.space.sample, trial)
        bpw = self.space.bpw(genome)
        db("recording bpw", trial.set_user_attr, "bpw", bpw)
        if self.config.budget_bpw is not None:
            db("recording the budget", trial.set_constraint, "bpw_over_budget", bpw - self.config.budget_bpw)
        if before_evaluation is not None:
            db("writing genes", before_evaluation)
        strategy = self.space.strategy(genome, name=f"trial {trial.number}")
        # Baselines are reference points: measure them in full even when they collapse.
        baseline = "baseline" in trial.user_attrs
        cap = None if baseline else self.config.collapse_kl
        verdict = None if baseline or not self.config.screen_margin else self._screen(rivals, bpw)
        try:
            with self.evaluation():
                metrics = self.evaluator.evaluate(strategy, "search", collapse_kl=cap, verdict=verdict)
        except Rejected as exc:
            attrs = {"rejected": str(exc), "screen_kl": exc.kl, "fidelity": exc.tokens}
            for key, value in attrs.items():
                db("recording the result", trial.set_user_attr, key, value)
            raise optuna.TrialPruned(str(exc)) from None
        attrs = {
            "ppl": metrics.ppl,
            "top1": metrics.top1,
            "seconds": metrics.seconds,
            "screen_kl": metrics.screen_kl,
            "fidelity": metrics.tokens,
        }
        for key, value in attrs.items():
            db("recording the result", trial.set_user_attr, key, value)
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


def launch(name: str, n_trials: int | None, **options: Any) -> int:
    """Run trials of an existing study; returns how many completed in this launch.

    `options` are `qopt.workers.launch`'s (timeout, url, progress, workers, until, heartbeat)."""
    from qopt.workers import launch as run_trials

    return run_trials(name, n_trials, **options).completed


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


def front(name: str, url: str | None = None, with_baselines: bool = True, progress: bool = False) -> list[FrontMember]:
    """The feasible Pareto front (by search-part objectives), evaluated on the eval part.

    Baseline trials are appended (marked) so a front can be read against them.
    Members not yet measured on the held-out part are measured (with a progress
    bar if `progress`), each stored as soon as it is, so an interrupted call keeps them.
    """
    study, config = load(name, url)
    trials = sorted(study.best_trials, key=lambda t: t.user_attrs["bpw"])
    if with_baselines:
        chosen = {t.number for t in trials}
        trials += [t for t in completed(study) if "baseline" in t.user_attrs and t.number not in chosen]
    if not trials:
        return []
    run: SearchRun | None = None  # loaded only if some member's held-out metrics are missing
    stored = study.user_attrs
    missing = sum(f"{_EVAL_ATTR_PREFIX}{t.number}" not in stored for t in trials)
    bar = tqdm(total=missing, desc="measuring on held-out text", disable=not progress or not missing)
    members = []
    for trial in trials:
        held_out = stored.get(f"{_EVAL_ATTR_PREFIX}{trial.number}")  # measured once, then stored
        if held_out is None:
            run = run or SearchRun(config)
            held_out = run.measure_held_out(study, trial)
            bar.update(1)
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
    bar.close()
    return members


def best(name: str, max_bpw: float, url: str | None = None) -> tuple[FrozenTrial, Strategy]:
    """The feasible trial with the best search-part quality at bpw <= `max_bpw`, as a Strategy.

    Reads the trials' values and bpw only, then the chosen trial's parameters."""
    study, config = load(name, url)
    budget = config.budget_bpw if config.budget_bpw is not None else float("inf")
    eligible = [
        t
        for t in trial_summaries(study, user_keys=("bpw",))
        if t.values is not None and t.user_attrs.get("bpw", float("inf")) <= min(max_bpw, budget)
    ]
    if not eligible:
        raise QoptError(f"no completed trial of study {name!r} has bpw <= {max_bpw}")
    trial = load_trial(study, min(eligible, key=lambda t: t.values[0]).trial_id)
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
    (pruned after their first batch by the multi-fidelity screen) are among the pruned.

    Reads values and a few attributes of each trial, never their parameters: under two
    seconds at thousands of trials."""
    study, config = load(name, url)
    trials = trial_summaries(
        study, user_keys=("bpw", "baseline", "rejected"), system_keys=("GenomeSampler:generation",)
    )
    done = [t for t in trials if t.values is not None]
    durations = [t.seconds for t in done if t.seconds is not None]
    budget = config.budget_bpw if config.budget_bpw is not None else float("inf")
    feasible = [t for t in done if t.user_attrs.get("bpw", float("inf")) <= budget]
    return {
        "name": name,
        "model": config.model,
        "budget_bpw": config.budget_bpw,
        "objectives": list(config.objectives),
        "trials": len(trials),
        **{state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "front": int(non_dominated([t.values for t in feasible]).sum()) if feasible else 0,
        "baselines": sum("baseline" in t.user_attrs for t in done),
        "screened": sum(str(t.user_attrs.get("rejected", "")).startswith(SCREENED) for t in trials),
        "mean_trial_seconds": sum(durations) / len(durations) if durations else None,
        "generation": max((t.system_attrs.get("GenomeSampler:generation", 0) for t in trials), default=0),
    }


def non_dominated(values: Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean mask of the points (rows of objective values, all minimised) that no other
    point dominates (no worse in every objective, better in one). Equal points all stay."""
    points = np.asarray(values, dtype=float)
    if points.ndim == 2 and points.shape[1] == 2:
        return _non_dominated_2d(points)
    keep = np.ones(len(points), dtype=bool)
    for start in range(0, len(points), 256):  # [256, n, objectives] comparisons at a time
        block = points[start : start + 256, None, :]
        dominated = ((points[None] <= block).all(-1) & (points[None] < block).any(-1)).any(-1)
        keep[start : start + 256] = ~dominated
    return keep


# ---- helpers -----------------------------------------------------------
def _non_dominated_2d(points: np.ndarray) -> np.ndarray:
    """`non_dominated` for two objectives in O(n log n): sweep by the first, then the second."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    keep = np.zeros(len(points), dtype=bool)
    best_before = np.inf  # least second objective among points with a smaller first objective
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and points[order[j], 0] == points[order[i], 0]:
            j += 1
        group = order[i:j]  # equal first objective, sorted by the second
        least = points[group[0], 1]
        if least < best_before:
            keep[group[points[group, 1] == least]] = True
        best_before = min(best_before, least)
        i = j
    return keep


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
