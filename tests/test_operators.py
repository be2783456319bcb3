"""Each variation operator does what its name says; and a gene added to the table is
searched, validated, labelled and serialised with no other edit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna
import pytest

from qopt.errors import QoptError
from qopt.genes import gene, only_with, schema
from qopt.operators import (
    broadcast_genes,
    change_scheme,
    crossover,
    exchange_bits,
    perturb_bits,
    refine,
    replace_family,
    scheme_sweep,
    swap_layers,
    toggle_outliers,
)
from qopt.space import SearchConfig, SearchSpace
from qopt.strategy import LayerConfig
from tests.conftest import tiny_model

SEEDS = range(40)


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(tiny_model("llama").units, SearchConfig(entropy=0.5))


def _genome(space: SearchSpace, seed: int):
    return space.random_genome(np.random.RandomState(seed))


def _rung(space: SearchSpace, bits: int) -> int:
    return sorted(space.config.bits).index(bits)


def _changed(a, b) -> list[str]:
    return [name for name in a if a[name] != b[name]]


@pytest.mark.parametrize("seed", SEEDS)
def test_perturb_bits_moves_each_chosen_layer_one_rung(space, seed):
    genome = _genome(space, seed)
    child = perturb_bits(genome, space, np.random.RandomState(seed), rate=1.0)
    top = len(space.config.bits) - 1
    for name in genome:
        before, after = _rung(space, genome[name].bits), _rung(space, child[name].bits)
        assert abs(after - before) == 1 or (after == before and before in (0, top))
        if genome[name].quantizes_weights and child[name].quantizes_weights and genome[name].format == "int":
            assert genome[name].evolve(bits=child[name].bits) == child[name]  # only the width moved


@pytest.mark.parametrize("seed", SEEDS)
def test_exchange_bits_moves_one_layer_up_and_another_down(space, seed):
    genome = {g.name: LayerConfig().evolve(bits=4, group_size=32) for g in space.groups}
    child = exchange_bits(genome, space, np.random.RandomState(seed))
    moves = sorted(_rung(space, child[n].bits) - _rung(space, genome[n].bits) for n in _changed(genome, child))
    assert moves == [-1, 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_swap_layers_exchanges_two_configs(space, seed):
    genome = _genome(space, seed)
    child = swap_layers(genome, space, np.random.RandomState(seed))
    changed = _changed(genome, child)
    assert len(changed) in (0, 2)  # 0: the two had the same config
    if changed:
        a, b = changed
        assert (child[a], child[b]) == (genome[b], genome[a])  # every group here allows every group size


@pytest.mark.parametrize("seed", SEEDS)
def test_toggle_outliers_switches_each_chosen_layer(space, seed):
    genome = _genome(space, seed)
    child = toggle_outliers(genome, space, np.random.RandomState(seed), rate=1.0)
    for name, config in genome.items():
        if not config.quantizes_weights:
            assert child[name] == config
            continue
        assert (config.outliers == "none") != (child[name].outliers == "none")
        assert child[name].evolve(outliers="none") == config.evolve(outliers="none")  # nothing else moved


@pytest.mark.parametrize("seed", SEEDS)
def test_replace_family_redraws_only_that_family(space, seed):
    genome = _genome(space, seed)
    family = ("scaling", "outliers", "rounding", "arithmetic")[seed % 4]
    child = replace_family(genome, space, np.random.RandomState(seed), rate=1.0, family=family)
    other = [n for n, genes in space.family_genes.items() if n != family for n in genes]
    for name, config in genome.items():
        if family == "scaling" and (config.format != "int" or config.rounding == "hqq"):
            continue  # a float grid's symmetry follows its format; HQQ needs an asymmetric grid
        if config.quantizes_weights:
            assert {g: getattr(child[name], g) for g in other} == {g: getattr(config, g) for g in other}


@pytest.mark.parametrize("seed", SEEDS)
def test_broadcast_copies_one_gene_unit_to_every_layer(space, seed):
    genome = _genome(space, seed)
    child = broadcast_genes(genome, space, np.random.RandomState(seed))
    assert [c.bits for c in child.values()] == [c.bits for c in genome.values()]
    if child == genome:
        return  # the donor was a 16-bit config: it has no genes to give
    # Every INT layer can take any unit's values (a float grid's symmetry follows its format).
    int_layers = [c for c in child.values() if c.quantizes_weights and c.format == "int"]
    shared = [
        unit
        for unit, names in space.gene_units.items()
        if len({tuple(getattr(c, n) for n in names) for c in int_layers}) == 1
    ]
    assert shared, "no gene unit is the same on every INT layer"


@pytest.mark.parametrize("seed", SEEDS)
def test_crossover_takes_each_layer_whole_from_a_parent(space, seed):
    a, b = _genome(space, seed), _genome(space, seed + 1000)
    child = crossover(a, b, space, np.random.RandomState(seed))
    assert all(child[n] in (a[n], b[n]) for n in child)


# ---- adding a gene is one table entry ------------------------------------------


@dataclass(frozen=True)
class DitherConfig(LayerConfig):
    """LayerConfig plus one toy gene: a dither amplitude, only with stochastic rounding."""

    dither: float | None = gene(
        "rounding",
        default=0.5,
        bounds=(0.0, 1.0),
        search=(0.1, 0.9, False),
        unit="rounding",
        **only_with("rounding", "stochastic"),
        label=lambda v, g: f"dither{v:.1f}",
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_change_scheme_edits_one_layer(space, seed):
    genome = _genome(space, seed)
    assert len(_changed(genome, change_scheme(genome, space, np.random.RandomState(seed)))) <= 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [3.25, 4.25])
def test_refine_makes_a_new_child_within_the_target(space, seed, target):
    rng = np.random.RandomState(seed)
    parent = space.fit_budget(_genome(space, seed), target, rng)
    child = refine(parent, space, rng, target)
    assert child != parent
    assert space.bpw(child) <= target
    assert space.decode(space.encode(child)) == child  # a valid, storable genome


@pytest.mark.parametrize("seed", range(5))
def test_scheme_sweep_sets_one_unit_everywhere_within_the_target(space, seed):
    rng = np.random.RandomState(seed)
    genome = space.fit_budget(_genome(space, seed), 4.25, rng)
    children = scheme_sweep(genome, space, rng, 4.25)
    assert children and all(c != genome for c in children)
    assert len({tuple(sorted(space.encode(c).items())) for c in children}) == len(children)  # distinct
    for child in children:
        assert space.bpw(child) <= 4.25
    # somewhere in the sweep, every quantized layer uses GPTQ (the whole-model scheme a human tries)
    assert any(all(c.rounding == "gptq" for c in child.values() if c.quantizes_weights) for child in children)


def test_a_new_gene_is_validated_labelled_serialised_and_searched():
    assert schema(DitherConfig)[-1].name == "dither"
    config = DitherConfig().evolve(bits=4, rounding="stochastic")
    assert config.dither == 0.5 and config.describe().endswith("stochastic dither0.5")
    assert DitherConfig.from_dict(config.to_dict()) == config
    assert config.evolve(rounding="nearest").dither is None  # gone with its condition
    with pytest.raises(QoptError, match=r"^dither: 2 is not a number in \[0.0, 1.0\]"):
        config.evolve(dither=2)
    with pytest.raises(QoptError, match="^dither: only allowed with rounding: stochastic"):
        DitherConfig().evolve(bits=4, dither=0.3)

    space = SearchSpace(tiny_model("llama").units, SearchConfig(base=DitherConfig().evolve(bits=4, group_size=32)))
    group = space.groups[0].name
    assert f"{group}.dither" in space.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        genome = space.sample(study.ask())
        seen |= {c.dither for c in genome.values() if isinstance(c, DitherConfig) and c.dither is not None}
        assert space.decode(space.encode(genome)) == genome
    assert seen and all(0.1 <= d <= 0.9 for d in seen)
    assert "dither" in space.gene_units["rounding"]  # mutations redraw it with the rounding method
