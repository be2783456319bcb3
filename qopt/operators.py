"""Variation operators on genomes, and the NSGA-II sampler that uses them.

Each operator is a small function with one job, taking a genome (one
LayerConfig per gene group) and returning a new, valid one:

- `perturb_bits`: move bit-widths one step up or down the ladder;
- `exchange_bits`: one group one step up, another one step down (EvoPress's
  level switch: roughly budget-neutral);
- `swap_layers`: exchange the configs of two gene groups;
- `replace_scaling`: redraw one part of a group's scaling rule: the scale
  function (abs-max, MSE clip, percentile clip), the granularity, or the
  symmetry; `replace_family` does the same for formats, the rounding method
  (nearest, stochastic, GPTQ, AWQ, HQQ) and arithmetic;
- `toggle_outliers`: switch a group's outlier policy off, or on to a random one;
- `broadcast_genes`: copy one gene unit (say, the scale function) from a
  donor (one of the genome's own layers, or a random config) to every layer,
  so a good local discovery spreads across the model in one step;
- `crossover`: each group's whole config from one parent or the other, so
  genes that work together within a layer stay together;
- `refine`: a few local moves (bit exchanges, one group's scheme, one gene
  unit everywhere) from one strong member, fitted to a target bpw;
- `scheme_sweep`: every value of every gene unit set on all layers of the
  best member at a target, one child each (coordinate search over schemes).

`GenomeVariation` composes them with rates from `VariationConfig` and is
Optuna's `child_generation_strategy`; `GenomeSampler` is NSGA-II whose
relative search space is the whole conditional space (Optuna's default, the
intersection, would drop conditional genes and redraw them at random), and
which, with `refine_prob`, spends trials on refinement at the user's target
bpw instead (the parent and target recorded in the trial's user attributes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import NSGAIISampler
from optuna.trial import FrozenTrial, TrialState

from qopt.errors import QoptError
from qopt.space import Genome, SearchSpace
from qopt.strategy import LayerConfig

#: User attributes of a refinement trial: its parent's trial number, and the target bpw it was fitted to.
REFINED_FROM = "refined_from"
REFINE_TARGET = "refine_target"


@dataclass(frozen=True)
class VariationConfig:
    """Operator rates. `*_rate` are per gene group; the others per child."""

    crossover_prob: float = 0.9
    bits_rate: float = 0.05
    swap_prob: float = 0.1
    exchange_prob: float = 0.3
    broadcast_prob: float = 0.15
    scaling_rate: float = 0.03
    outlier_rate: float = 0.03
    format_rate: float = 0.015
    rounding_rate: float = 0.02
    arithmetic_rate: float = 0.01
    refine_prob: float = 0.0  # per trial: refine a strong member at a target bpw instead

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not 0.0 <= value <= 1.0:
                raise QoptError(f"variation.{name}: {value} is not a probability in [0, 1]")


def perturb_bits(genome: Genome, space: SearchSpace, rng: np.random.RandomState, rate: float) -> Genome:
    """Each group, with probability `rate`, moves one step up or down the bit ladder."""
    if "bits" not in space.config.families:
        return genome
    child = dict(genome)
    for group in space.groups:
        if rng.random_sample() < rate:
            child[group.name] = space.step_bits(child[group.name], group, int(rng.choice([-1, 1])))
    return child


def exchange_bits(genome: Genome, space: SearchSpace, rng: np.random.RandomState) -> Genome:
    """Move one random group one step up the bit ladder and another one step down."""
    if "bits" not in space.config.families or len(space.groups) < 2:
        return genome
    up, down = (space.groups[i] for i in rng.choice(len(space.groups), size=2, replace=False))
    child = dict(genome)
    child[up.name] = space.step_bits(genome[up.name], up, 1)
    child[down.name] = space.step_bits(genome[down.name], down, -1)
    return child


def swap_layers(genome: Genome, space: SearchSpace, rng: np.random.RandomState) -> Genome:
    """Exchange the configs of two random gene groups (repaired to each one's shapes)."""
    if len(space.groups) < 2:
        return genome
    i, j = rng.choice(len(space.groups), size=2, replace=False)
    a, b = space.groups[i], space.groups[j]
    child = dict(genome)
    child[a.name] = space.repair(genome[b.name].to_dict(), a)
    child[b.name] = space.repair(genome[a.name].to_dict(), b)
    return child


def replace_family(genome: Genome, space: SearchSpace, rng: np.random.RandomState, rate: float, family: str) -> Genome:
    """Each group, with probability `rate`, redraws one gene unit of `family` at random."""
    if family not in space.config.families:
        return genome
    units = [u for u, f in space.unit_family.items() if f == family]
    child = dict(genome)
    for group in space.groups:
        if rng.random_sample() < rate:
            unit = units[rng.randint(len(units))]
            donor = space.random_config(group, rng)
            child[group.name] = space.replace_genes(child[group.name], donor, space.gene_units[unit], group)
    return child


def replace_scaling(genome: Genome, space: SearchSpace, rng: np.random.RandomState, rate: float) -> Genome:
    """Each group, with probability `rate`, gets a new scale function, granularity or symmetry."""
    return replace_family(genome, space, rng, rate, "scaling")


def toggle_outliers(genome: Genome, space: SearchSpace, rng: np.random.RandomState, rate: float) -> Genome:
    """Each group, with probability `rate`: outlier handling off if on, else a random policy."""
    if "outliers" not in space.config.families:
        return genome
    child = dict(genome)
    for group in space.groups:
        config = child[group.name]
        if rng.random_sample() >= rate or not config.quantizes_weights:
            continue
        if config.outliers != "none":
            child[group.name] = space.repair({**config.to_dict(), "outliers": "none"}, group)
        else:
            policies = [p for p in space.gene("outliers").values if p != "none"]
            policy = policies[rng.randint(len(policies))]
            child[group.name] = space.repair({**config.to_dict(), "outliers": policy}, group)
    return child


def broadcast_genes(genome: Genome, space: SearchSpace, rng: np.random.RandomState) -> Genome:
    """One searched gene unit, from one donor config, applied to every group."""
    units = [u for u, f in space.unit_family.items() if f in space.config.families]
    if not units:
        return genome
    names = space.gene_units[units[rng.randint(len(units))]]
    source = space.groups[rng.randint(len(space.groups))]
    donor = genome[source.name] if rng.random_sample() < 0.5 else space.random_config(source, rng)
    return {g.name: space.replace_genes(genome[g.name], donor, names, g) for g in space.groups}


def crossover(a: Genome, b: Genome, space: SearchSpace, rng: np.random.RandomState) -> Genome:
    """Uniform crossover at the level of gene groups."""
    return {g.name: (a if rng.random_sample() < 0.5 else b)[g.name] for g in space.groups}


def change_scheme(genome: Genome, space: SearchSpace, rng: np.random.RandomState) -> Genome:
    """One group's one searched gene unit (granularity, rounding, outlier policy...) redrawn."""
    units = [u for u, f in space.unit_family.items() if f in space.config.families]
    if not units:
        return genome
    group = space.groups[rng.randint(len(space.groups))]
    names = space.gene_units[units[rng.randint(len(units))]]
    donor = space.random_config(group, rng)
    return {**genome, group.name: space.replace_genes(genome[group.name], donor, names, group)}


def scheme_sweep(genome: Genome, space: SearchSpace, rng: np.random.RandomState, target_bpw: float) -> list[Genome]:
    """Each searched gene unit set to each of its values on every quantized group at once
    (a human's "try MSE clipping everywhere", "try GPTQ everywhere"), fitted to `target_bpw`;
    the distinct children that differ from `genome`, in gene-table order."""
    children: list[Genome] = []
    for unit, names in space.gene_units.items():
        lead = space.gene(names[0])
        if space.unit_family[unit] not in space.config.families or not lead.categorical:
            continue
        for value in lead.values:
            child = {}
            for group in space.groups:
                config = genome[group.name]
                if config.quantizes_weights:
                    donor = space.repair({**config.to_dict(), lead.name: value}, group)
                    config = space.replace_genes(config, donor, names, group)
                child[group.name] = config
            child = space.fit_budget(child, target_bpw, rng)
            if child != genome and child not in children:
                children.append(child)
    return children


def refine(parent: Genome, space: SearchSpace, rng: np.random.RandomState, target_bpw: float) -> Genome:
    """A local step from a strong member: one to three moves, then fitted to `target_bpw`.

    Moves are EvoPress's budget-neutral level switch (`exchange_bits`), a scheme
    change on one group (`change_scheme`) and one gene unit spread to every
    group (`broadcast_genes`). Never returns `parent` itself.
    """
    moves = (
        lambda g: exchange_bits(g, space, rng),
        lambda g: change_scheme(g, space, rng),
        lambda g: broadcast_genes(g, space, rng),
    )
    weights = np.array([0.35, 0.35, 0.3])
    child = parent
    for _ in range(20):  # a move can be a no-op (a clamped ladder, the same value redrawn)
        child = dict(parent)
        for _ in range(1 + rng.binomial(2, 0.3)):
            child = moves[rng.choice(len(moves), p=weights)](child)
        child = space.fit_budget(child, target_bpw, rng)
        if child != parent:
            break
    return child


class GenomeVariation:
    """NSGA-II child generation: two parents -> crossover -> mutations -> budget fit."""

    def __init__(
        self, space: SearchSpace, config: VariationConfig, budget_bpw: float | None, rng: np.random.RandomState
    ) -> None:
        self.space = space
        self.config = config
        self.budget_bpw = budget_bpw
        self.rng = rng

    def child(self, parents: Sequence[Genome]) -> Genome:
        rng, space, c = self.rng, self.space, self.config
        first, second = (parents[i] for i in rng.choice(len(parents), size=2, replace=len(parents) < 2))
        genome = crossover(first, second, space, rng) if rng.random_sample() < c.crossover_prob else dict(first)
        genome = perturb_bits(genome, space, rng, c.bits_rate)
        if rng.random_sample() < c.exchange_prob:
            genome = exchange_bits(genome, space, rng)
        if rng.random_sample() < c.swap_prob:
            genome = swap_layers(genome, space, rng)
        if rng.random_sample() < c.broadcast_prob:
            genome = broadcast_genes(genome, space, rng)
        genome = replace_scaling(genome, space, rng, c.scaling_rate)
        genome = toggle_outliers(genome, space, rng, c.outlier_rate)
        genome = replace_family(genome, space, rng, c.format_rate, "format")
        genome = replace_family(genome, space, rng, c.rounding_rate, "rounding")
        genome = replace_family(genome, space, rng, c.arithmetic_rate, "arithmetic")
        if any(genome == p for p in parents):  # a clone teaches nothing: force one change
            genome = perturb_bits(genome, space, rng, 1.0 / len(space.groups))
        if self.budget_bpw is not None:
            genome = space.fit_budget(genome, self.budget_bpw, rng)
        return genome

    def __call__(
        self, study: optuna.Study, search_space: dict[str, BaseDistribution], parents: list[FrozenTrial]
    ) -> dict[str, Any]:
        genomes = [self.space.decode(t.params) for t in parents]
        params = self.space.encode(self.child(genomes))
        return {k: v for k, v in params.items() if k in search_space}


class GenomeSampler(NSGAIISampler):
    """NSGA-II over whole qopt genomes.

    Generation 0 is drawn by `SearchSpace.random_genome` (structured, with
    the configured entropy, half of it around the `seeds`: uniform human
    schemes that fit the budget) and fitted to the budget; later generations come
    from `GenomeVariation`. Enqueued trials (baselines) keep their fixed params.
    The bit budget reaches selection as a trial constraint (Optuna 5's
    `Trial.set_constraint`, which replaced `constraints_func`).
    """

    def __init__(
        self,
        space: SearchSpace,
        *,
        population_size: int,
        variation: VariationConfig = VariationConfig(),
        budget_bpw: float | None = None,
        targets: Sequence[float] = (),
        seeds: Sequence[LayerConfig] = (),
        seed: int | None = None,
    ) -> None:
        self._space = space
        self._budget_bpw = budget_bpw
        self._targets = tuple(targets) or ((budget_bpw,) if budget_bpw is not None else ())
        self._refine_prob = variation.refine_prob
        self._refine_targets: dict[int, float] = {}
        self._seeds = tuple(seeds)
        self._genome_rng = np.random.RandomState(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(
                population_size=population_size,
                seed=seed,
                child_generation_strategy=GenomeVariation(space, variation, budget_bpw, self._genome_rng),
            )

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {name: dist for name, dist in self._space.distributions().items() if not dist.single()}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        enqueued = "fixed_params" in trial.system_attrs  # a baseline or seed: its params are given
        if search_space and self._targets and not enqueued and self._genome_rng.random_sample() < self._refine_prob:
            params = self._refined(study, trial)
            if params is not None:
                return {k: v for k, v in params.items() if k in search_space}
        params = super().sample_relative(study, trial, search_space)
        if params:
            return params
        genome = self._space.random_genome(self._genome_rng, self._budget_bpw, self._seeds)
        if self._budget_bpw is not None:
            genome = self._space.fit_budget(genome, self._budget_bpw, self._genome_rng)
        return {k: v for k, v in self._space.encode(genome).items() if k in search_space}

    def _refined(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
        """Params of a refinement child at a random target (None: nothing completed fits it yet).

        Half the time, while the best trial at or under the target has an untried
        `scheme_sweep` child, that child is next (the sweep runs again whenever the best
        changes). Otherwise the parent is one of the five best completed trials at or under
        the target by the first objective (the best most often) and the child is a `refine`
        step; a child that repeats any trial's params is drawn again. The trial records
        `refined_from` (the parent's number) and `refine_target`.
        """
        rng = self._genome_rng
        target = self._targets[rng.randint(len(self._targets))]
        trials = study.get_trials(deepcopy=False)
        fitting = sorted(
            (t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("bpw", np.inf) <= target),
            key=lambda t: t.values[0],
        )[:5]
        if not fitting:
            return None
        seen = {tuple(sorted(t.params.items())) for t in trials}
        params = None
        if rng.random_sample() < 0.5:
            parent = fitting[0]
            for child in scheme_sweep(self._space.decode(parent.params), self._space, rng, target):
                candidate = self._space.encode(child)
                if tuple(sorted(candidate.items())) not in seen:
                    params = candidate
                    break
        if params is None:
            weights = 1.0 / np.arange(1, len(fitting) + 1)
            parent = fitting[rng.choice(len(fitting), p=weights / weights.sum())]
            genome = self._space.decode(parent.params)
            for _ in range(10):
                params = self._space.encode(refine(genome, self._space, rng, target))
                if tuple(sorted(params.items())) not in seen:
                    break
        study._storage.set_trial_user_attr(trial._trial_id, REFINED_FROM, parent.number)
        study._storage.set_trial_user_attr(trial._trial_id, REFINE_TARGET, target)
        self._refine_targets[trial.number] = target
        return params

    def refine_target(self, number: int) -> float | None:
        """The target bpw trial `number` was refined for by this sampler (None: not a refinement).

        The objective asks here: Optuna's Trial caches its user attributes before its
        genes are sampled, so the attributes written above are not in it."""
        return self._refine_targets.get(number)
