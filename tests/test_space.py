"""The conditional search space and the variation operators, over many random genomes."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qopt.operators import (
    GenomeVariation,
    VariationConfig,
    broadcast_genes,
    crossover,
    exchange_bits,
    perturb_bits,
    replace_scaling,
    swap_layers,
    toggle_outliers,
)
from qopt.space import SearchConfig, SearchSpace
from qopt.strategy import FP16, LayerConfig, uniform
from tests.conftest import tiny_model

SEEDS = st.integers(0, 2**31 - 1)


@pytest.fixture(scope="module", params=["module", "block", "role"])
def space(request) -> SearchSpace:
    return SearchSpace(tiny_model("llama").units, SearchConfig(resolution=request.param))


def _check_genome(space: SearchSpace, genome) -> None:
    assert set(genome) == {g.name for g in space.groups}
    for group in space.groups:
        config = genome[group.name]
        assert isinstance(config, LayerConfig)  # constructing one validates it
        if config.quantizes_weights and config.group_size is not None:
            assert config.group_size in group.group_sizes
    assert space.decode(space.encode(genome)) == genome
    space.strategy(genome).resolve(space.units)  # executable on the model


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS)
def test_every_operator_keeps_genomes_valid(space, seed):
    rng = np.random.RandomState(seed)
    a, b = space.random_genome(rng), space.random_genome(rng)
    for genome in (
        crossover(a, b, space, rng),
        perturb_bits(a, space, rng, 0.5),
        swap_layers(a, space, rng),
        replace_scaling(a, space, rng, 0.5),
        toggle_outliers(a, space, rng, 0.5),
        broadcast_genes(a, space, rng),
        exchange_bits(a, space, rng),
    ):
        _check_genome(space, genome)


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, budget=st.floats(2.6, 6.0))
def test_children_fit_the_budget(space, seed, budget):
    rng = np.random.RandomState(seed)
    variation = GenomeVariation(space, VariationConfig(), budget, rng)
    parents = [space.random_genome(rng) for _ in range(4)]
    child = variation.child(parents)
    _check_genome(space, child)
    assert space.bpw(child) <= budget


def test_bpw_matches_the_model_cost(space):
    from qopt.bits import model_cost

    genome = space.random_genome(np.random.RandomState(1))
    plan = space.strategy(genome).resolve(space.units)
    assert space.bpw(genome) == pytest.approx(model_cost(space.units, plan).bpw)


def test_entropy_zero_gives_uniform_strategies():
    space = SearchSpace(tiny_model("llama").units, SearchConfig(entropy=0.0))
    for seed in range(5):
        genome = space.random_genome(np.random.RandomState(seed))
        assert len(set(genome.values())) == 1


def test_entropy_one_gives_varied_layers():
    space = SearchSpace(tiny_model("llama").units, SearchConfig(entropy=1.0))
    genome = space.random_genome(np.random.RandomState(0))
    assert len(set(genome.values())) > len(space.groups) // 2


def test_params_are_conditional(space):
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        genome = space.sample(trial)
        for group in space.groups:
            config, params = genome[group.name], trial.params
            prefix = group.name + "."
            assert (prefix + "group_size" in params) == (config.granularity == "group" and config.quantizes_weights)
            assert (prefix + "topk_fraction" in params) == (config.outliers == "topk")
            assert (prefix + "smooth_alpha" in params) == (config.outliers == "smooth")
            assert (prefix + "act_bits" in params) == (config.act_format == "int")
            assert (prefix + "format4" in params) == (config.bits == 4)
            assert (prefix + "symmetric" in params) == (config.quantizes_weights and config.format == "int")
            if config == FP16:
                assert [k for k in params if k.startswith(prefix)] == [prefix + "bits"]
        study.tell(trial, 0.0)


def test_bits_only_space_searches_bits_alone():
    base = FP16.evolve(bits=4, group_size=32)
    space = SearchSpace(tiny_model("llama").units, SearchConfig(families=("bits",), base=base))
    assert {name.rsplit(".", 1)[1] for name in space.distributions()} == {"bits"}
    genome = space.random_genome(np.random.RandomState(0))
    assert all(c == base.evolve(bits=c.bits) or c == FP16 for c in genome.values())


def test_baseline_genome_round_trips():
    space = SearchSpace(tiny_model("llama").units, SearchConfig(base=FP16.evolve(bits=4, group_size=32)))
    strategy = uniform(3, group_size=32)
    genome = space.genome_of(strategy)
    assert space.strategy(space.decode(space.encode(genome))).resolve(space.units) == strategy.resolve(space.units)


def test_min_bpw_is_reachable_and_fit_budget_reaches_it():
    space = SearchSpace(tiny_model("llama").units, SearchConfig())
    floor = space.min_bpw()
    genome = space.fit_budget(space.random_genome(np.random.RandomState(0)), floor, np.random.RandomState(0))
    assert space.bpw(genome) <= floor + 1e-9
