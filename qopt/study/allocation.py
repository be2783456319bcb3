"""Allocator seeds: the sensitivity-based allocator's strategies as a study's first trials.

A `{allocate: B}` entry in a study config's `baselines` asks for the
allocator's strategy at B true bits per weight (`qopt.allocate`), measured in
the study's own harness and enqueued like the uniform baselines, so the
search starts from the strongest non-search answer at the user's budget.

The allocator chooses among the menu configs this search space can express
(`space_menu`), one per gene group (a group's cost is the sum of its layers'),
so its strategy decodes exactly from trial params. The per-layer costs are
measured once per study, by the first launch that finds a seed missing, and
stored in the study's user attributes (`costs_key`): later launches,
other workers and other machines read them instead of measuring again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import optuna

from qopt.allocate import ALLOCATOR_BITS, ALLOCATOR_OUTLIERS, ALLOCATOR_SCALES, LayerCosts, measure_costs, menu, solve
from qopt.space import SearchSpace
from qopt.strategy import LayerConfig
from qopt.study.config import AllocatorSeed, StudyConfig, allocator_seeds

#: Study user attribute prefix of the stored per-layer costs (+ the number of windows, or "all").
COSTS_ATTR_PREFIX = "qopt:allocator-costs:"


def space_menu(
    space: SearchSpace, candidates: Sequence[LayerConfig] | None = None, **menu_options: Sequence[str]
) -> list[LayerConfig]:
    """The allocator's menu (`qopt.allocate.menu` with `menu_options`, or `candidates`) as
    this space expresses it.

    By default bit-widths are those the space searches; the group size is the
    base's (or the largest every gene group allows). Each candidate is replaced
    by what the space would store for it (genes of families it does not search
    come from its base), kept only if every group stores the same config, and
    listed once: a space without the outliers family has no rotated configs.
    """
    if candidates is None:
        base = space.config.base
        allowed = set.intersection(*(set(g.group_sizes) for g in space.groups))
        group_size = base.group_size if base.granularity == "group" and base.group_size in allowed else None
        if group_size is None and allowed:
            group_size = max(allowed)
        bits = [b for b in ALLOCATOR_BITS if b in space.config.bits] or [space.config.base.bits]
        candidates = menu(group_size, bits=bits, **menu_options)
    configs: list[LayerConfig] = []
    for candidate in candidates:
        stored = _stored(space, candidate, space.groups[0].name)
        if stored not in configs and all(_stored(space, stored, g.name) == stored for g in space.groups):
            configs.append(stored)
    return configs


def _stored(space: SearchSpace, config: LayerConfig, group_name: str) -> LayerConfig:
    """What a trial's params decode to when every group is given `config`."""
    genome = {g.name: space.repair(config.to_dict(), g) for g in space.groups}
    return space.decode(space.encode(genome))[group_name]


def missing_seeds(study: optuna.Study, config: StudyConfig) -> list[AllocatorSeed]:
    """The config's allocator seeds that have no trial in the study yet."""
    seeds = allocator_seeds(config)
    if not seeds:
        return []
    present = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    return [s for s in seeds if s.name not in present]


def enqueue_seeds(study: optuna.Study, run, progress: bool = True) -> list[str]:
    """Enqueue the allocator's strategy for every seed the study lacks; returns their names.

    `run` is the worker's `SearchRun`: its evaluator measures the costs (on the
    search part) when the study has none stored for the seed's windows.
    """
    from qopt.study.create import enqueue_baseline

    space = run.space
    names = []
    for seed in missing_seeds(study, run.config):
        costs = _costs(study, run, seed, progress)
        grouped = costs.merged({g.name: [u.name for u in g.units] for g in space.groups})
        choice = solve(grouped.bits, grouped.error, int(seed.budget_bpw * grouped.n_weights))
        genome = {g.name: grouped.menu[c] for g, c in zip(space.groups, choice, strict=True)}
        run.db("enqueuing the allocator's strategy", enqueue_baseline, study, space, space.strategy(genome, seed.name))
        names.append(seed.name)
    return names


def costs_key(seed: AllocatorSeed) -> str:
    """The study user attribute holding the costs `seed` is solved from (shared by
    seeds with the same proxy, windows and menu)."""
    proxy = "" if seed.proxy == "kl" else f"{seed.proxy}:"
    full = (seed.scales, seed.outliers) == (ALLOCATOR_SCALES, ALLOCATOR_OUTLIERS)
    menu = "" if full else ":" + "+".join((*seed.scales, *seed.outliers))
    return f"{COSTS_ATTR_PREFIX}{proxy}{seed.windows or 'all'}{menu}"


def _costs(study: optuna.Study, run, seed: AllocatorSeed, progress: bool) -> LayerCosts:
    key, windows = costs_key(seed), seed.windows
    stored = run.db("reading the allocator's costs", lambda: study.user_attrs.get(key))
    if stored is not None:
        return LayerCosts.from_dict(stored, run.space.config_class)
    configs = space_menu(run.space, **seed.menu_options)
    n_layers = len(run.space.units)
    print(
        f"allocator: measuring {n_layers} layers x {len(configs) - 1} configs ({seed.proxy} proxy) on "
        f"{windows or 'all'} search windows (once per study)",
        file=sys.stderr,
        flush=True,
    )
    costs = measure_costs(run.evaluator, configs, windows=windows, proxy=seed.proxy, progress=progress)
    run.db("storing the allocator's costs", study.set_user_attr, key, costs.to_dict())
    return costs
