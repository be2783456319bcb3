"""The search space: Optuna parameters <-> a Strategy, with conditional genes.

A search assigns one `LayerConfig` per *gene group*. The `resolution` decides
what a group is: one module, one transformer block, or one role (all `down`
projections share a config). Within a group, genes are Optuna parameters named
``{group}.{gene}``, and some exist only under a condition:

    bits                      always (2..8, 16 = leave unquantized)
    format4 / format8         only at 4 / 8 bits (int|fp|nf4, int|fp)
    granularity               only when quantized
      group_size              only with granularity = group (sizes <= the group's input dim)
    symmetric                 only for int
    scale                     abs-max | mse | percentile
      clip_percentile         only with scale = percentile
    outliers                  none | topk | smooth | rotate
      topk_fraction           only with topk;  smooth_alpha only with smooth
    act_format                none | int | fp
      act_bits                only with int activations (4 | 8)
    rounding                  nearest | stochastic | gptq | awq | hqq (hqq only on asymmetric int)
    accumulation

Gene *families* (bits, scaling, format, outliers, rounding, arithmetic) can be left out
of a search; their genes then come from the config's `base` layer config. The
walk over this structure is written once (`_walk`) and drives sampling from a
trial, decoding stored params, encoding a genome, and random generation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from qopt.bits import layer_cost
from qopt.errors import QoptError
from qopt.genes import FAMILIES, Gene, family_genes, schema, unit_families
from qopt.genes import units as gene_units
from qopt.model import QuantUnit
from qopt.strategy import EDGE_ROLES, FORMAT_BITS, FP16, GRANULARITIES, LayerConfig, Strategy

RESOLUTIONS = ("module", "block", "role")
UNQUANTIZED_BITS = 16

Genome = dict[str, LayerConfig]
"""One LayerConfig per gene group, in group order."""


@dataclass(frozen=True)
class SearchConfig:
    """What is searched, and how the first generation is drawn.

    `entropy` controls the initial population: each genome starts from one
    random default config; every (group, family) pair is redrawn independently
    with probability `entropy` (0 = uniform strategies, 1 = independent layers).
    `deploy` (e.g. "llamacpp") keeps every gene to what that serving target
    stores exactly (`qopt.deploy`), so the whole front is exportable to it.
    `fused_groups: auto` gives the layers an engine fuses into one matrix (a
    block's q/k/v, its gate/up; vLLM needs one scheme for each) one gene set.
    """

    resolution: str = "module"
    families: tuple[str, ...] = FAMILIES
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16)
    group_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    base: LayerConfig = field(default_factory=lambda: FP16.evolve(bits=4, group_size=64))
    entropy: float = 0.3
    deploy: str | None = None
    fused_groups: str | None = None

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise QoptError(f"search.resolution: {self.resolution!r} is not one of {', '.join(RESOLUTIONS)}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise QoptError(f"search.families: unknown {', '.join(sorted(unknown))} (families: {', '.join(FAMILIES)})")
        bad_bits = set(self.bits) - set(FORMAT_BITS["int"])
        if bad_bits or not self.bits:
            raise QoptError(f"search.bits: {sorted(bad_bits) or 'empty'} not among {FORMAT_BITS['int']}")
        if not 0.0 <= self.entropy <= 1.0:
            raise QoptError(f"search.entropy: {self.entropy} is not in [0, 1]")
        if any(not 16 <= g <= 256 for g in self.group_sizes):
            raise QoptError(f"search.group_sizes: {list(self.group_sizes)} must lie in [16, 256]")
        if self.fused_groups not in (None, "auto"):
            raise QoptError(f"search.fused_groups: {self.fused_groups!r} must be auto or absent")
        if self.deploy is not None:
            from qopt import deploy

            if self.deploy not in deploy.TARGETS:
                raise QoptError(f"search.deploy: {self.deploy!r} is not one of {', '.join(deploy.TARGETS)}")
            stored = deploy.limits(self.deploy, [], {})
            if not set(self.bits) & (set(stored["bits"]) - {UNQUANTIZED_BITS}):
                widths = ", ".join(map(str, stored["bits"]))
                raise QoptError(
                    f"search.bits: {list(self.bits)} has none of the widths {self.deploy} stores ({widths})"
                )
            if not set(self.group_sizes) & set(stored["group_size"]):
                raise QoptError(
                    f"search.group_sizes: {list(self.group_sizes)} lacks {stored['group_size'][0]}, "
                    f"which {self.deploy} needs"
                )


@dataclass(frozen=True)
class GeneGroup:
    """Modules sharing one LayerConfig, and the group sizes their shapes allow."""

    name: str
    units: tuple[QuantUnit, ...]
    group_sizes: tuple[int, ...]

    @property
    def n_weights(self) -> int:
        return sum(u.out_features * u.in_features for u in self.units)


class SearchSpace:
    """The conditional space over one model's block linear layers."""

    def __init__(self, units: Sequence[QuantUnit], config: SearchConfig = SearchConfig()) -> None:
        self.config = config
        # The gene table is the base config's class's: a LayerConfig subclass with more genes searches them too.
        self.config_class = type(config.base)
        self.genes = schema(self.config_class)
        #: The genes of each family (what a family-level deviation or replacement redraws).
        self.family_genes = family_genes(self.genes)
        #: Genes that change together, the smallest unit a mutation or broadcast edits
        #: (bit-widths are moved by the bit operators, never redrawn).
        self.gene_units = {unit: names for unit, names in gene_units(self.genes).items() if unit != "bits"}
        #: Mutation unit -> its family.
        self.unit_family = {u: f for u, f in unit_families(self.genes).items() if u in self.gene_units}
        self.unquantized = self.config_class()
        self.units = [u for u in units if u.role not in EDGE_ROLES]
        self.groups = _make_groups(self.units, config)
        self._n_weights = sum(g.n_weights for g in self.groups)
        # Each group's parameter table depends only on the space: built once, read by every walk.
        self._tables = {g.name: self._group_table(g) for g in self.groups}

    def gene(self, name: str) -> Gene:
        """The gene called `name` in this space's gene table."""
        return next(g for g in self.genes if g.name == name)

    # ---- the conditional structure -------------------------------------
    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter any genome can have, with its distribution."""
        return {name: dist for table in self._tables.values() for name, dist in table.items()}

    def _limits(self, group: GeneGroup, genes: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, ...]]:
        """What this search allows a group beyond each gene's own values: the bit
        ladder, the group sizes that fit the group's layers (none: no groups), and
        a deployment target's limits given the genes chosen so far (`genes`)."""
        limits = {
            "bits": tuple(self.config.bits),
            "group_size": group.group_sizes,
            "granularity": GRANULARITIES if group.group_sizes else tuple(g for g in GRANULARITIES if g != "group"),
        }
        if self.config.deploy is not None:
            from qopt import deploy

            target = deploy.limits(self.config.deploy, [u.in_features for u in group.units], genes or {})
            if not set(target["group_size"]) & set(group.group_sizes):
                target["bits"] = (UNQUANTIZED_BITS,)
            for name, allowed in target.items():
                limits[name] = tuple(v for v in limits[name] if v in allowed) if name in limits else allowed
        return limits

    def _group_table(self, group: GeneGroup) -> dict[str, BaseDistribution]:
        """The Optuna parameters of one group's searched genes (`{group}.{param}` -> distribution)."""
        limits = self._limits(group)
        table: dict[str, BaseDistribution] = {}
        for gene in self.genes:
            if gene.family not in self.config.families:
                continue
            if gene.param_key:  # choices depend on an earlier gene: one parameter per value of it
                for key_value in limits.get(gene.param_key, ()):
                    choices = gene.choices({gene.param_key: key_value})
                    choices = tuple(c for c in choices if c in limits.get(gene.name, choices))
                    if key_value != UNQUANTIZED_BITS and len(choices) > 1:
                        table[gene.param({gene.param_key: key_value})] = CategoricalDistribution(choices)
            elif gene.categorical:
                choices = tuple(c for c in gene.values if c in limits.get(gene.name, gene.values))
                if len(choices) > 1:
                    table[gene.name] = CategoricalDistribution(choices)
            elif gene.search is not None:
                low, high, log = gene.search
                table[gene.name] = FloatDistribution(low, high, log=log)
            elif limits.get(gene.name):
                table[gene.name] = CategoricalDistribution(limits[gene.name])
        return {f"{group.name}.{param}": dist for param, dist in table.items()}

    def _walk(self, group: GeneGroup, pick) -> LayerConfig:
        """Build a group's config gene by gene, in the gene table's order: ask
        `pick(param, distribution)` for each searched gene that exists given the
        genes chosen before it and has a choice; take the base config's value
        (or the gene's default) for the others. A 16-bit layer has no other genes."""
        table = self._tables[group.name]
        base = self.config.base.genes()
        genes: dict[str, Any] = {}
        for gene in self.genes:
            if not gene.exists(genes):
                continue
            param = f"{group.name}.{gene.param(genes)}"
            forced = gene.categorical and len(gene.choices(genes)) == 1
            if param in table and not forced:
                genes[gene.name] = pick(param, table[param])
            else:
                genes[gene.name] = base[gene.name] if base[gene.name] is not None else gene.default
            if gene.name == "bits" and genes["bits"] == UNQUANTIZED_BITS:
                return self.unquantized
        return self.repair(genes, group)

    def repair(self, genes: Mapping[str, Any], group: GeneGroup) -> LayerConfig:
        """The nearest valid config to a (possibly inconsistent) set of genes.

        Fixes what operators can break, gene by gene in table order: a value
        the genes before it do not allow (a format the bit-width lacks, an
        asymmetric float grid, HQQ on a grid without zero points) becomes the
        gene's fallback or default; a bit-width or group size outside this
        search becomes the nearest one; a float gene is clamped to its searched
        range. Missing genes take their defaults; a 16-bit config has no others.
        """
        given = {k: v for k, v in genes.items() if v is not None}
        limits = self._limits(group)
        values: dict[str, Any] = {}
        for gene in self.genes:
            if not gene.exists(values):
                continue
            if self.config.deploy is not None:  # a target's limits may depend on the genes before
                limits = self._limits(group, values)
            values[gene.name] = _nearest_allowed(gene, given.get(gene.name, gene.default), values, limits)
            if gene.name == "bits" and values["bits"] == UNQUANTIZED_BITS:
                return self.unquantized
        return self.config_class(**values)

    # ---- genomes <-> trials, params, strategies -----------------------
    def sample(self, trial) -> Genome:
        """Define-by-run: ask an Optuna trial for every existing gene."""

        def pick(name: str, dist: BaseDistribution) -> Any:
            if isinstance(dist, CategoricalDistribution):
                return trial.suggest_categorical(name, dist.choices)
            assert isinstance(dist, FloatDistribution)
            return trial.suggest_float(name, dist.low, dist.high, log=dist.log)

        return {g.name: self._walk(g, pick) for g in self.groups}

    def decode(self, params: Mapping[str, Any]) -> Genome:
        """A genome from stored trial params (as `sample` recorded them)."""

        def pick(name: str, _dist: BaseDistribution) -> Any:
            if name not in params:
                raise QoptError(f"trial params lack {name!r}: the study was made with another search space")
            return params[name]

        return {g.name: self._walk(g, pick) for g in self.groups}

    def encode(self, genome: Mapping[str, LayerConfig]) -> dict[str, Any]:
        """The params `sample` would record for `genome` (which must be repaired)."""
        params: dict[str, Any] = {}
        for group in self.groups:
            config = genome[group.name]
            values = {**config.to_dict(), f"format{config.bits}": config.format}

            def pick(name: str, _dist: BaseDistribution, values=values) -> Any:
                params[name] = values[name.rsplit(".", 1)[1]]
                return params[name]

            self._walk(group, pick)
        return params

    def random_genome(
        self, rng: np.random.RandomState, budget_bpw: float | None = None, defaults: Sequence[LayerConfig] = ()
    ) -> Genome:
        """Structured random genome: one global default, then per-(group, family)
        deviations drawn with probability `entropy`.

        Half the time (when `defaults` are given, e.g. the human schemes that
        fit the budget) the default is one of them. Otherwise it is the base
        config at a random bit-width (with a budget: one of the widths up to
        the first above it), half the time with a random scaling rule and a
        quarter of the time a random outlier policy. Activations and
        arithmetic stay as in the base there, which keeps the first generation
        out of regions that collapse the model (e.g. INT4 activations
        everywhere). A bit-width deviation is one step along the ladder;
        other families are redrawn.
        """
        ladder = sorted(self.config.bits)
        if budget_bpw is not None:
            above = [b for b in ladder if b > budget_bpw]
            ladder = [b for b in ladder if b <= budget_bpw] + above[:1]
        default = self.repair(self.config.base.to_dict(), self.groups[0])
        if defaults and rng.random_sample() < 0.5:
            default = defaults[rng.randint(len(defaults))]
        elif "bits" in self.config.families:
            default = self.repair({**default.to_dict(), "bits": ladder[rng.randint(len(ladder))]}, self.groups[0])
            for family, chance in (("scaling", 0.5), ("outliers", 0.25)):
                if family in self.config.families and rng.random_sample() < chance:
                    donor = self.random_config(self.groups[0], rng)
                    default = self.replace_family(default, donor, family, self.groups[0])
        genome = {}
        for group in self.groups:
            config = self.repair(default.to_dict(), group)
            for family in self.config.families:
                if rng.random_sample() >= self.config.entropy:
                    continue
                if family == "bits":
                    config = self.step_bits(config, group, int(rng.choice([-1, 1])))
                else:
                    config = self.replace_family(config, self.random_config(group, rng), family, group)
            genome[group.name] = config
        return genome

    def step_bits(self, config: LayerConfig, group: GeneGroup, step: int) -> LayerConfig:
        """`config` moved `step` places along the bit ladder (clamped at its ends)."""
        ladder = sorted(self.config.bits)
        position = min(range(len(ladder)), key=lambda i: abs(ladder[i] - config.bits))
        new_bits = ladder[min(max(position + step, 0), len(ladder) - 1)]
        return self.repair({**self._editable_genes(config), "bits": new_bits}, group)

    def _editable_genes(self, config: LayerConfig) -> dict[str, Any]:
        """`config`'s genes, to edit. A 16-bit config has none of its own: it
        takes the base's, so an edit that quantizes it starts from the base."""
        return config.to_dict() if config.quantizes_weights else {**self.config.base.to_dict(), "bits": 16}

    def random_config(self, group: GeneGroup, rng: np.random.RandomState) -> LayerConfig:
        def pick(_name: str, dist: BaseDistribution) -> Any:
            if isinstance(dist, CategoricalDistribution):
                return dist.choices[rng.randint(len(dist.choices))]
            assert isinstance(dist, FloatDistribution)
            if dist.log:
                return float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
            return float(rng.uniform(dist.low, dist.high))

        return self._walk(group, pick)

    def replace_family(self, config: LayerConfig, donor: LayerConfig, family: str, group: GeneGroup) -> LayerConfig:
        """`config` with one gene family taken from `donor`, repaired."""
        return self.replace_genes(config, donor, self.family_genes[family], group)

    def replace_genes(
        self, config: LayerConfig, donor: LayerConfig, names: Sequence[str], group: GeneGroup
    ) -> LayerConfig:
        """`config` with the genes `names` taken from `donor`, repaired."""
        if not donor.quantizes_weights and "bits" not in names:
            return config  # a 16-bit donor has none of these genes to give
        genes = self._editable_genes(config)
        for name in names:
            genes.pop(name, None)
            value = getattr(donor, name)
            if value is not None:
                genes[name] = value
        return self.repair(genes, group)

    def strategy(self, genome: Mapping[str, LayerConfig], name: str = "") -> Strategy:
        """The executable Strategy a genome stands for."""
        if self.config.resolution == "role":  # a fused group (q+k+v) gives each of its roles its config
            return Strategy(roles={u.role: genome[g.name] for g in self.groups for u in g.units}, name=name)
        layers = {u.name: genome[g.name] for g in self.groups for u in g.units}
        return Strategy(layers=layers, name=name)

    def genome_of(self, strategy: Strategy) -> Genome:
        """The (repaired) genome closest to a strategy, e.g. a baseline to seed."""
        plan = strategy.resolve(self.units)
        return {g.name: self.repair(plan[g.units[0].name].to_dict(), g) for g in self.groups}

    # ---- cost ---------------------------------------------------------
    def bpw(self, genome: Mapping[str, LayerConfig]) -> float:
        """True bits per weight of the block linear layers, without touching a tensor."""
        return sum(self._group_bits(genome[g.name], g) for g in self.groups) / self._n_weights

    def min_bpw(self) -> float:
        """The smallest bpw any genome of this space can reach."""
        searched = set(self.config.families)
        bits = min(self.config.bits) if "bits" in searched else self.config.base.bits
        genes = {"bits": bits, "granularity": "tensor", "symmetric": True}
        if "scaling" not in searched:
            genes = {**self.config.base.to_dict(), "bits": bits}
        return self.bpw({g.name: self.repair(genes, g) for g in self.groups})

    def fit_budget(self, genome: Genome, budget_bpw: float, rng: np.random.RandomState) -> Genome:
        """Make a genome fit the bit budget with the cheapest edits a quantizer knows.

        Repeatedly make one edit, drawn over all groups (larger groups more
        likely): lower a bit-width one step, or coarsen a scaling rule (group
        size up, then per-channel, then per-tensor; asymmetric to symmetric),
        which saves side data instead of payload. Every edit moves down, so
        this ends. Then, if still over, drop side data (kept outliers, smoothing
        factors, AWQ scales). Returns the genome unchanged if it already fits.
        """
        genome = dict(genome)
        weights = np.array([g.n_weights for g in self.groups], dtype=float)
        # Costs and options are kept per group and refreshed only for the group just edited.
        bits = {g.name: self._group_bits(genome[g.name], g) for g in self.groups}
        options = {g.name: self._cheaper(genome[g.name], g) for g in self.groups}
        total = sum(bits.values())
        while total / self._n_weights > budget_bpw:
            edits = [(i, edit) for i, g in enumerate(self.groups) for edit in options[g.name]]
            if not edits:
                break
            p = np.array([weights[i] for i, _ in edits])
            i, edit = edits[rng.choice(len(edits), p=p / p.sum())]
            group = self.groups[i]
            genome[group.name] = edit
            new_bits = self._group_bits(edit, group)
            total += new_bits - bits[group.name]
            bits[group.name] = new_bits
            options[group.name] = self._cheaper(genome[group.name], group)
        for group in self.groups:
            if self.bpw(genome) <= budget_bpw:
                break
            genome[group.name] = self.repair(_without_side_data(genome[group.name]), group)
        return genome

    def _group_bits(self, config: LayerConfig, group: GeneGroup) -> int:
        return sum(layer_cost(u.out_features, u.in_features, config).total for u in group.units)

    def _cheaper(self, config: LayerConfig, group: GeneGroup) -> list[LayerConfig]:
        """Configs one edit cheaper than `config` within this space."""
        searched = set(self.config.families)
        genes = self._editable_genes(config)
        options = []
        lower = [b for b in self.config.bits if b < config.bits]
        if "bits" in searched and lower:
            options.append({**genes, "bits": max(lower)})
        if "scaling" in searched and config.quantizes_weights:
            if config.granularity == "group":
                larger = [s for s in group.group_sizes if s > (config.group_size or 0)]
                options.append({**genes, "group_size": min(larger)} if larger else {**genes, "granularity": "channel"})
            elif config.granularity == "channel":
                options.append({**genes, "granularity": "tensor"})
            if config.format == "int" and not config.symmetric:
                options.append({**genes, "symmetric": True})
        repaired = [self.repair(o, group) for o in options]
        return [o for o in repaired if o != config]  # a deploy target's limits may undo an edit


def _without_side_data(config: LayerConfig) -> dict[str, Any]:
    """`config`'s genes without what stores per-channel side data: outlier
    handling goes, AWQ becomes GPTQ (same calibration, no stored scales)."""
    genes = {**config.to_dict(), "outliers": "none"}
    if config.rounding == "awq":
        genes["rounding"] = "gptq"
    return genes


def _nearest_allowed(gene: Gene, value: Any, genes: Mapping[str, Any], limits: Mapping[str, tuple[Any, ...]]) -> Any:
    """`value` if `gene` may take it after `genes` within `limits`, else the closest value that it may."""
    if gene.search is not None:
        low, high, _ = gene.search
        return min(max(float(value), low), high)
    allowed = gene.choices(genes) if gene.categorical else limits.get(gene.name, ())
    if gene.name in limits and gene.categorical:
        allowed = tuple(v for v in allowed if v in limits[gene.name])
    if not allowed or value in allowed:
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # a width or size: the nearest, ties downward
        return min(allowed, key=lambda v: (abs(v - value), v))
    for candidate in (gene.fallback, gene.default):
        if candidate in allowed:
            return candidate
    return allowed[0]


#: The block number in a layer's name: `model.layers.15.mlp.up_proj` -> "15".
_BLOCK_NUMBER = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a layer belongs to, from its name (`model.layers.15.mlp.up_proj` -> 15;
    None for a layer outside the blocks)."""
    match = _BLOCK_NUMBER.search(name)
    return int(match.group(1)) if match else None


def _block_of(name: str) -> str:
    match = _BLOCK_NUMBER.search(name)
    return f"block{match.group(1)}" if match else name


#: Roles an engine fuses into one matrix per block (vLLM: qkv_proj, gate_up_proj).
FUSED_ROLES = (("q", "k", "v"), ("gate", "up"))


def _fused(key):
    """`key` with each fused set of roles sharing one group: per block at module resolution
    (`model.layers.0.q+k+v`), one group for all blocks at role resolution (`q+k+v`)."""

    def fused_key(unit: QuantUnit) -> str:
        roles = next((r for r in FUSED_ROLES if unit.role in r), None)
        if roles is None:
            return key(unit)
        joined = "+".join(roles)
        return joined if key(unit) == unit.role else f"{unit.name.rsplit('.', 2)[0]}.{joined}"

    return fused_key


def _make_groups(units: Sequence[QuantUnit], config: SearchConfig) -> list[GeneGroup]:
    if not units:
        raise QoptError("the model has no linear layers to search over")
    key = {"module": lambda u: u.name, "block": lambda u: _block_of(u.name), "role": lambda u: u.role}[
        config.resolution
    ]
    if config.fused_groups == "auto" and config.resolution != "block":
        key = _fused(key)
    members: dict[str, list[QuantUnit]] = {}
    for unit in units:
        members.setdefault(key(unit), []).append(unit)
    groups = []
    for name, group_units in members.items():
        narrowest = min(u.in_features for u in group_units)
        sizes = tuple(s for s in sorted(config.group_sizes) if s <= narrowest)
        groups.append(GeneGroup(name=name, units=tuple(group_units), group_sizes=sizes))
    return groups
