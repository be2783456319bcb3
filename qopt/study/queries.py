"""Reading a study: its Pareto front with held-out metrics, the best trial under a bpw, status.

Queries read what they need with targeted storage calls (`storage.trial_summaries`,
`storage.load_trial`), so they stay fast at thousands of trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from qopt.errors import QoptError
from qopt.space import SearchSpace
from qopt.storage import TrialSummary, load_trial, trial_summaries
from qopt.strategy import Strategy
from qopt.study.config import StudyConfig
from qopt.study.create import completed, load
from qopt.study.objective import EVAL_ATTR_PREFIX, SCREENED, VALIDATION_ATTR_PREFIX, SearchRun


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


class PartMetrics:
    """Trials' metrics on one part of the text no trial was scored on: "eval" (held out) or
    "validation" (spare search-half windows); each a dict of kl, ppl, top1, fp_ppl.

    A trial measured before is read from the study's user attributes; one that was
    not is measured once (the model loaded on first need, by a `SearchRun`) and
    stored at once, so an interrupted query keeps what it measured.
    """

    def __init__(self, study: optuna.Study, config: StudyConfig, part: str, run: SearchRun | None = None) -> None:
        if part not in ("eval", "validation"):
            raise ValueError(f"part must be 'eval' or 'validation', got {part!r}")
        self.study, self.config, self.part, self.run = study, config, part, run
        self._prefix = EVAL_ATTR_PREFIX if part == "eval" else VALIDATION_ATTR_PREFIX
        self._stored = study.user_attrs

    def stored(self, number: int) -> dict[str, float] | None:
        """Trial `number`'s metrics if the study holds them (no model loaded)."""
        return self._stored.get(f"{self._prefix}{number}")

    def __call__(self, trial: FrozenTrial | TrialSummary) -> dict[str, float] | None:
        """`trial`'s metrics (measured and stored if missing); None when the study's text
        has no such part (a study without validation windows)."""
        held = self.stored(trial.number)
        if held is not None:
            return held
        self.run = self.run or SearchRun(self.config)
        windows = getattr(self.run.evaluator.split, self.part)
        if windows is None or not len(windows):
            return None
        if isinstance(trial, TrialSummary):
            trial = load_trial(self.study, trial.trial_id)
        return self.run.measure_part(self.study, trial, self.part)


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
    held_out = PartMetrics(study, config, "eval")
    missing = sum(held_out.stored(t.number) is None for t in trials)
    members = []
    with tqdm(total=missing, desc="measuring on held-out text", disable=not progress or not missing) as bar:
        for trial in trials:
            metrics = held_out.stored(trial.number)
            if metrics is None:
                metrics = held_out(trial)
                bar.update(1)
            assert metrics is not None  # every study has an eval part
            members.append(
                FrontMember(
                    trial=trial.number,
                    bpw=trial.user_attrs["bpw"],
                    search_kl=trial.values[0] if config.objectives[0] == "kl" else float("nan"),
                    search_ppl=trial.user_attrs.get("ppl", float("nan")),
                    eval_kl=metrics["kl"],
                    eval_ppl=metrics["ppl"],
                    eval_top1=metrics["top1"],
                    baseline=trial.user_attrs.get("baseline"),
                )
            )
    return members


@dataclass(frozen=True)
class Candidate:
    """One of the best trials under a bpw: its search-part quality (the first objective)
    and, when the study's text has a validation part, its KL there (nats/token)."""

    trial: int  # the trial's number in its study
    bpw: float
    search: float
    validation_kl: float | None
    trial_id: int  # its storage id (what `load_trial` reads)


def best(
    name: str, max_bpw: float, url: str | None = None, candidates: int = 1, progress: bool = False
) -> tuple[FrozenTrial, Strategy]:
    """The best feasible trial at bpw <= `max_bpw`, as a Strategy.

    With `candidates` = 1 it is the best by search-part quality (reads the trials'
    values and bpw only). With more, the `candidates` best by search-part quality
    are measured on the validation part (search-half text the search never scored;
    stored in the study, so once) and the best there is chosen: a guard against a
    strategy that only fits the search windows. See `shortlist`.
    """
    study, config = load(name, url)
    ranked = shortlist(name, max_bpw, url, candidates, progress)
    chosen = min(ranked, key=lambda c: c.validation_kl if c.validation_kl is not None else c.search)
    trial = load_trial(study, chosen.trial_id)
    return trial, _strategy_of(name, config, trial)


def shortlist(
    name: str, max_bpw: float, url: str | None = None, candidates: int = 5, progress: bool = False
) -> list[Candidate]:
    """The `candidates` best feasible trials at bpw <= `max_bpw` by search-part quality,
    each with its validation KL when there are more than one and the text has a
    validation part (measured once per trial, then read from the study)."""
    if candidates < 1:
        raise QoptError(f"--candidates must be at least 1, got {candidates}")
    study, config = load(name, url)
    budget = config.budget_bpw if config.budget_bpw is not None else float("inf")
    eligible = [
        t
        for t in trial_summaries(study, user_keys=("bpw",))
        if t.values is not None and t.user_attrs.get("bpw", float("inf")) <= min(max_bpw, budget)
    ]
    if not eligible:
        raise QoptError(f"no completed trial of study {name!r} has bpw <= {max_bpw}")
    top = sorted(eligible, key=lambda t: t.values[0])[:candidates]
    validation = PartMetrics(study, config, "validation")
    out = []
    for t in tqdm(top, desc="measuring on validation text", disable=not progress or len(top) < 2):
        metrics = validation(t) if len(top) > 1 else validation.stored(t.number)
        if metrics is None and len(top) > 1:
            break  # no validation part: rank by search-part quality alone
        kl = metrics["kl"] if metrics is not None else None
        out.append(Candidate(t.number, t.user_attrs["bpw"], t.values[0], kl, t.trial_id))
    if len(out) < len(top):
        out = [Candidate(t.number, t.user_attrs["bpw"], t.values[0], None, t.trial_id) for t in top]
    return out


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
