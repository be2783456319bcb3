"""What structure a search found: per-layer genes across the front, and how they differ
from the population.

Pure analysis of decoded genomes (no plotting, no storage): `analyse` takes the
study's search space and its trials; `summary` renders the findings as text.
A gene's *value* on a layer is a short label (bits `3`, format `int`,
granularity `g64`, outliers `topk`, ...); a 16-bit layer shows `16` / `fp16`
and `-` for genes it does not have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from qopt.space import SearchSpace
from qopt.strategy import LayerConfig

#: Genes shown per layer, in report order.
GENES = ("bits", "format", "granularity", "scale", "outliers", "rounding", "activations")


def gene_value(config: LayerConfig, gene: str) -> str:
    """The short label of one gene of one layer's config."""
    if gene == "bits":
        return str(config.bits)
    if gene == "activations":
        return "none" if config.act_format == "none" else f"{config.act_format}{config.act_bits}"
    if not config.quantizes_weights:
        return "fp16" if gene == "format" else "-"
    if gene == "granularity":
        return f"g{config.group_size}" if config.granularity == "group" else config.granularity
    return str(getattr(config, gene))


@dataclass(frozen=True)
class Member:
    """One front member: its trial, size, search-part quality, and per-layer genes."""

    trial: int
    bpw: float
    quality: float
    genes: dict[str, list[str]]  # gene -> one label per layer (space group order)
    bits: list[int]


@dataclass(frozen=True)
class Comparison:
    """A front member against the baseline nearest to it in bpw (search-part quality)."""

    trial: int
    bpw: float
    quality: float
    baseline: str
    baseline_bpw: float
    baseline_quality: float


@dataclass(frozen=True)
class Structure:
    layers: list[str]  # gene-group names, model order
    front: list[Member]  # ordered by bpw
    population: int  # searched completed trials
    frequencies: dict[str, dict[str, tuple[float, float]]]  # gene -> value -> (front share, population share)
    protection: list[tuple[str, float, float]]  # (layer, mean bits above its member's mean, share at 16 bits)
    comparisons: list[Comparison]


def analyse(space: SearchSpace, front: Sequence[FrozenTrial], trials: Sequence[FrozenTrial]) -> Structure:
    """The structure of `front` (feasible Pareto trials) among `trials` (all completed;
    baselines are those with a `baseline` user attribute)."""
    layers = [g.name for g in space.groups]
    searched_front = sorted((t for t in front if "baseline" not in t.user_attrs), key=lambda t: t.user_attrs["bpw"])
    population = [t for t in trials if "baseline" not in t.user_attrs]
    genomes = {t.number: space.decode(t.params) for t in [*population, *searched_front]}  # each decoded once
    labels = {
        n: {gene: [gene_value(genome[g.name], gene) for g in space.groups] for gene in GENES}
        for n, genome in genomes.items()
    }
    members = [
        Member(
            t.number,
            t.user_attrs["bpw"],
            t.values[0],
            labels[t.number],
            [genomes[t.number][g.name].bits for g in space.groups],
        )
        for t in searched_front
    ]
    frequencies = {
        gene: _shares([labels[t.number][gene] for t in searched_front], [labels[t.number][gene] for t in population])
        for gene in GENES
    }
    protection = []
    for i, layer in enumerate(layers):
        if not members:
            break
        excess = sum(m.bits[i] - _mean(m.bits) for m in members) / len(members)
        kept = sum(m.bits[i] == 16 for m in members) / len(members)
        protection.append((layer, excess, kept))
    protection.sort(key=lambda row: -row[1])
    baselines = [t for t in trials if "baseline" in t.user_attrs]
    comparisons = []
    for m in members:
        if baselines:
            nearest = min(baselines, key=lambda b: (abs(b.user_attrs["bpw"] - m.bpw), b.values[0]))
            comparisons.append(
                Comparison(
                    m.trial,
                    m.bpw,
                    m.quality,
                    nearest.user_attrs["baseline"],
                    nearest.user_attrs["bpw"],
                    nearest.values[0],
                )
            )
    return Structure(layers, members, len(population), frequencies, protection, comparisons)


def summary(structure: Structure, quality: str = "kl", top: int = 5) -> str:
    """A few lines for the terminal: front size, what the front prefers, protected layers, baselines."""
    lines = [f"front: {len(structure.front)} strategies among {structure.population} searched trials"]
    for gene in ("bits", "granularity", "outliers", "rounding"):
        shares = structure.frequencies[gene]
        over = sorted(shares.items(), key=lambda kv: kv[1][1] - kv[1][0])  # most over-represented on the front first
        text = ", ".join(f"{v} {f:.0%} (population {p:.0%})" for v, (f, p) in over[:3])
        lines.append(f"  {gene:<12} front favours: {text}")
    if structure.protection:
        lines.append("  protected layers (mean bits above the strategy's mean, across the front):")
        for layer, excess, kept in structure.protection[:top]:
            lines.append(f"    {layer:<40} {excess:+.2f} bits, 16-bit in {kept:.0%} of the front")
    comparisons = structure.comparisons
    if comparisons:
        wins = sum(c.quality < c.baseline_quality for c in comparisons)
        lines.append(f"  {wins} of {len(comparisons)} front members beat the baseline nearest in bpw; for example:")
        step = max(1, len(comparisons) // top)
        for c in comparisons[::step][:top] + ([comparisons[-1]] if len(comparisons) > top else []):
            verdict = "better" if c.quality < c.baseline_quality else "worse"
            lines.append(
                f"    trial {c.trial:>4} {c.bpw:.3f} bpw {quality} {c.quality:.4f}: {verdict} than {c.baseline} "
                f"({c.baseline_bpw:.3f} bpw, {c.baseline_quality:.4f})"
            )
    return "\n".join(lines)


def _shares(front: Sequence[Sequence[str]], population: Sequence[Sequence[str]]) -> dict[str, tuple[float, float]]:
    """value -> (share of all layer slots on the front, share in the population)."""
    f = Counter(v for labels in front for v in labels)
    p = Counter(v for labels in population for v in labels)
    nf, np_ = max(1, sum(f.values())), max(1, sum(p.values()))
    return {v: (f[v] / nf, p[v] / np_) for v in sorted(set(f) | set(p), key=_natural)}


def _natural(value: str) -> tuple:
    digits = "".join(ch for ch in value if ch.isdigit())
    return (0, int(digits), value) if digits and value.lstrip("g").isdigit() else (1, 0, value)


def _mean(values: Sequence[int]) -> float:
    return sum(values) / len(values)
