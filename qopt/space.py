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
from qopt.model import QuantUnit
from qopt.strategy import EDGE_ROLES, FORMAT_BITS, FP16, ROUNDINGS, LayerConfig, Strategy, drop_inactive_genes

RESOLUTIONS = ("module", "block", "role")
FAMILIES = ("bits", "scaling", "format", "outliers", "rounding", "arithmetic")
#: The genes of each family (what a family-level deviation or replacement redraws).
FAMILY_GENES = {
    "bits": ("bits",),
    "scaling": ("granularity", "group_size", "symmetric", "scale", "clip_percentile"),
    "format": ("format", "act_format", "act_bits"),
    "outliers": ("outliers", "topk_fraction", "smooth_alpha"),
    "rounding": ("rounding",),
    "arithmetic": ("accumulation",),
}
#: Genes that change together, the smallest unit a mutation or broadcast edits.
GENE_UNITS = {
    "granularity": ("granularity", "group_size"),
    "symmetric": ("symmetric",),
    "scale": ("scale", "clip_percentile"),
    "outliers": ("outliers", "topk_fraction", "smooth_alpha"),
    "format": ("format",),
    "activations": ("act_format", "act_bits"),
    "accumulation": ("accumulation",),
    "rounding": ("rounding",),
}
UNIT_FAMILY = {
    "granularity": "scaling", "symmetric": "scaling", "scale": "scaling", "outliers": "outliers",
    "format": "format", "activations": "format", "accumulation": "arithmetic", "rounding": "rounding",
}  # fmt: skip
_FLOAT_RANGES = {
    "clip_percentile": (99.0, 99.99, False),
    "topk_fraction": (0.001, 0.05, True),
    "smooth_alpha": (0.2, 0.9, False),
}

Genome = dict[str, LayerConfig]
"""One LayerConfig per gene group, in group order."""


@dataclass(frozen=True)
class SearchConfig:
    """What is searched, and how the first generation is drawn.

    `entropy` controls the initial population: each genome starts from one
    random default config; every (group, family) pair is redrawn independently
    with probability `entropy` (0 = uniform strategies, 1 = independent layers).
    """

    resolution: str = "module"
    families: tuple[str, ...] = FAMILIES
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16)
    group_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    base: LayerConfig = field(default_factory=lambda: FP16.evolve(bits=4, group_size=64))
    entropy: float = 0.3

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
        self.units = [u for u in units if u.role not in EDGE_ROLES]
        self.groups = _make_groups(self.units, config)
        self._n_weights = sum(g.n_weights for g in self.groups)
        # Each group's parameter table depends only on the space: built once, read by every walk.
        self._tables = {g.name: self._group_table(g) for g in self.groups}

    # ---- the conditional structure -------------------------------------
    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter any genome can have, with its distribution."""
        return {name: dist for table in self._tables.values() for name, dist in table.items()}

    def _group_table(self, group: GeneGroup) -> dict[str, BaseDistribution]:
        families = set(self.config.families)
        genes: dict[str, BaseDistribution] = {}
        if "bits" in families:
            genes["bits"] = CategoricalDistribution(self.config.bits)
        if "format" in families:
            genes["format4"] = CategoricalDistribution(("int", "fp", "nf4"))
            genes["format8"] = CategoricalDistribution(("int", "fp"))
            genes["act_format"] = CategoricalDistribution(("none", "int", "fp"))
            genes["act_bits"] = CategoricalDistribution((4, 8))
        if "scaling" in families:
            genes["granularity"] = CategoricalDistribution(_granularities(group))
            if group.group_sizes:
                genes["group_size"] = CategoricalDistribution(group.group_sizes)
            genes["symmetric"] = CategoricalDistribution((False, True))
            genes["scale"] = CategoricalDistribution(("absmax", "mse", "percentile"))
            genes["clip_percentile"] = _float("clip_percentile")
        if "outliers" in families:
            genes["outliers"] = CategoricalDistribution(("none", "topk", "smooth", "rotate"))
            genes["topk_fraction"] = _float("topk_fraction")
            genes["smooth_alpha"] = _float("smooth_alpha")
        if "rounding" in families:
            genes["rounding"] = CategoricalDistribution(ROUNDINGS)
        if "arithmetic" in families:
            genes["accumulation"] = CategoricalDistribution(("fp32", "fp16", "bf16"))
        return {f"{group.name}.{gene}": dist for gene, dist in genes.items()}

    def _walk(self, group: GeneGroup, pick) -> LayerConfig:
        """Build a group's config, asking `pick(gene, distribution)` for each gene
        that exists given the genes chosen before it."""
        table = self._tables[group.name]
        base = self.config.base

        def gene(name: str, fallback: Any) -> Any:
            key = f"{group.name}.{name}"
            return pick(key, table[key]) if key in table else fallback

        bits = gene("bits", base.bits)
        if bits == 16:
            return FP16
        genes: dict[str, Any] = {"bits": bits}
        base_format = base.format if bits in FORMAT_BITS[base.format] else "int"
        genes["format"] = (
            gene(f"format{bits}", "int") if bits in (4, 8) and "format" in self.config.families else base_format
        )
        genes["act_format"] = gene("act_format", base.act_format)
        if genes["act_format"] == "int":
            genes["act_bits"] = gene("act_bits", base.act_bits if base.act_format == "int" else 8)
        elif genes["act_format"] == "fp":
            genes["act_bits"] = 8
        genes["granularity"] = gene("granularity", base.granularity)
        if genes["granularity"] == "group":
            genes["group_size"] = gene("group_size", base.group_size or 128)
        genes["symmetric"] = gene("symmetric", base.symmetric) if genes["format"] == "int" else True
        genes["scale"] = gene("scale", base.scale)
        if genes["scale"] == "percentile":
            genes["clip_percentile"] = gene("clip_percentile", base.clip_percentile or 99.9)
        genes["outliers"] = gene("outliers", base.outliers)
        if genes["outliers"] == "topk":
            genes["topk_fraction"] = gene("topk_fraction", base.topk_fraction or 0.01)
        elif genes["outliers"] == "smooth":
            genes["smooth_alpha"] = gene("smooth_alpha", base.smooth_alpha or 0.5)
        genes["accumulation"] = gene("accumulation", base.accumulation)
        genes["rounding"] = gene("rounding", base.rounding)
        return self.repair(genes, group)

    def repair(self, genes: Mapping[str, Any], group: GeneGroup) -> LayerConfig:
        """The nearest valid config to a (possibly inconsistent) set of genes.

        Fixes what operators can break: a format the bit-width lacks, an
        asymmetric float grid, a group wider than the group's layers, float
        genes outside the searched ranges, HQQ on a grid without zero points
        (it becomes round-to-nearest), genes of a 16-bit layer.
        """
        g = {k: v for k, v in genes.items() if v is not None}
        if g.get("bits", 16) == 16:
            return FP16
        if g["bits"] not in self.config.bits:
            g["bits"] = min(self.config.bits, key=lambda b: (abs(b - g["bits"]), b))
            if g["bits"] == 16:
                return FP16
        fmt = g.get("format", "int")
        if g["bits"] not in FORMAT_BITS[fmt]:
            fmt = "int"
        g["format"] = fmt
        if fmt != "int":
            g["symmetric"] = True
        if g.get("granularity") == "group":
            if not group.group_sizes:
                g["granularity"] = "channel"
            elif g.get("group_size") not in group.group_sizes:
                wanted = g.get("group_size") or 128
                g["group_size"] = min(group.group_sizes, key=lambda s: (abs(s - wanted), s))
        if g.get("rounding") == "hqq" and (fmt != "int" or g.get("symmetric")):
            g["rounding"] = "nearest"
        for name, (low, high, _) in _FLOAT_RANGES.items():
            if name in g:
                g[name] = min(max(float(g[name]), low), high)
        return FP16.evolve(**drop_inactive_genes({k: v for k, v in g.items() if k in _GENE_NAMES}))

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
        return self.replace_genes(config, donor, FAMILY_GENES[family], group)

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
        if self.config.resolution == "role":
            return Strategy(roles=dict(genome), name=name)
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
        this ends. Then, if still over, drop outlier side data. Returns the
        genome unchanged if it already fits.
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
            genome[group.name] = self.repair({**genome[group.name].to_dict(), "outliers": "none"}, group)
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
        return [self.repair(o, group) for o in options]


_GENE_NAMES = set(LayerConfig.__dataclass_fields__)


def _float(name: str) -> FloatDistribution:
    low, high, log = _FLOAT_RANGES[name]
    return FloatDistribution(low, high, log=log)


def _granularities(group: GeneGroup) -> tuple[str, ...]:
    return ("tensor", "channel", "group") if group.group_sizes else ("tensor", "channel")


def _block_of(name: str) -> str:
    match = re.search(r"\.(\d+)\.", name)
    return f"block{match.group(1)}" if match else name


def _make_groups(units: Sequence[QuantUnit], config: SearchConfig) -> list[GeneGroup]:
    if not units:
        raise QoptError("the model has no linear layers to search over")
    key = {"module": lambda u: u.name, "block": lambda u: _block_of(u.name), "role": lambda u: u.role}[
        config.resolution
    ]
    members: dict[str, list[QuantUnit]] = {}
    for unit in units:
        members.setdefault(key(unit), []).append(unit)
    groups = []
    for name, group_units in members.items():
        narrowest = min(u.in_features for u in group_units)
        sizes = tuple(s for s in sorted(config.group_sizes) if s <= narrowest)
        groups.append(GeneGroup(name=name, units=tuple(group_units), group_sizes=sizes))
    return groups
