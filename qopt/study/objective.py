"""The objective a worker runs per trial: draw genes, quantize, measure, screen.

`SearchRun` is one worker's view of a study: the model loaded once, the
evaluator on the study's text, the search space. Its `objective` draws a
trial's genome, records its true bpw (and the budget as a constraint), and
measures the strategy on the search part; multi-fidelity screening stops a
trial after its first batch when a completed trial of no more bpw was clearly
better there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from qopt.evaluate import Evaluator, Metrics, Rejected, Verdict
from qopt.operators import GenomeSampler
from qopt.space import SearchSpace
from qopt.study.config import StudyConfig, baseline_strategies
from qopt.study.workers import worker_id

#: How the `rejected` user attribute of a trial stopped by the multi-fidelity screen begins.
SCREENED = "screened out"
#: Study user attribute prefix of a trial's held-out metrics (`EVAL_ATTR_PREFIX` + trial number).
EVAL_ATTR_PREFIX = "qopt:eval:"
#: Likewise for its metrics on the validation part (search-half windows the search never scored).
VALIDATION_ATTR_PREFIX = "qopt:validation:"


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
            targets=self.config.targets,
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
        verdict = None
        target = getattr(trial.study.sampler, "refine_target", lambda _number: None)(trial.number)
        if target is not None and self.config.refine_margin:  # a refinement child: judged at its target
            verdict = self._screen(rivals, target, self.config.refine_margin)
        elif not baseline and self.config.screen_margin:
            verdict = self._screen(rivals, bpw, self.config.screen_margin)
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

    @staticmethod
    def _screen(rivals: list[tuple[float, float, int]], bpw: float, margin: float) -> Verdict:
        """Stop a strategy whose first-batch KL is `margin` times that of a completed
        trial of no more than `bpw`: it is clearly dominated. (First-batch KLs of all
        trials are on the same windows, so the comparison is paired.)"""
        best = min(((kl, number) for kl, rival_bpw, number in rivals if rival_bpw <= bpw), default=None)

        def verdict(kl: float) -> str | None:
            if best is None or kl <= margin * best[0]:
                return None
            return (
                f"{SCREENED}: first-batch KL {kl:.4g} > {margin:g} x {best[0]:.4g} "
                f"of trial {best[1]}, which has no more than {bpw:.4g} bpw"
            )

        return verdict

    def measure_part(self, study: optuna.Study, trial: FrozenTrial, part: str) -> dict[str, float]:
        """Measure a trial on `part` ("eval" or "validation") and store the metrics in the study."""
        m = self.evaluator.evaluate(self.space.strategy(self.space.decode(trial.params)), part)
        return self.store_held_out(study, trial.number, m)

    @staticmethod
    def store_held_out(study: optuna.Study, number: int, m: Metrics) -> dict[str, float]:
        """Store a trial's metrics on the evaluation (or validation) part in the study
        (read by `front` and `best`)."""
        held_out = {"kl": m.kl, "ppl": m.ppl, "top1": m.top1, "fp_ppl": m.fp_ppl}
        prefix = VALIDATION_ATTR_PREFIX if m.part == "validation" else EVAL_ATTR_PREFIX
        study.set_user_attr(f"{prefix}{number}", held_out)
        return held_out


def _objective_values(objectives: tuple[str, ...], m: Metrics) -> tuple[float, ...]:
    table = {"kl": m.kl, "ppl": m.ppl, "bpw": m.bpw, "total_mib": m.total_bytes / 2**20}
    return tuple(table[o] for o in objectives)
