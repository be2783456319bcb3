"""The gene schema: what each gene of a layer's quantization config is, said once.

A `Gene` is the metadata of one `LayerConfig` field (declared there with
`gene(...)`): its family (what a study searches or leaves at its base config),
its mutation unit (the genes an operator changes together), its values or
range, the default it takes when it comes into existence, the condition under
which it exists, the values the genes before it allow, how a search draws it,
and how it reads in a label. Everything that needs to know about genes reads
this table:

- `LayerConfig` validation, canonical form and (de)serialisation (strategy.py);
- the search space's Optuna distributions, its walk and its repair (space.py);
- the operators' gene units and families (operators.py, via `units`);
- labels (`describe`).

Adding a gene is one `gene(...)` field in `LayerConfig` plus its numerics.
Genes are ordered as the fields are: a gene's condition and allowed values may
read only the genes declared before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from qopt.errors import QoptError

Genes = Mapping[str, Any]
"""Gene name -> value, for the genes decided so far."""

FAMILIES = ("bits", "scaling", "format", "outliers", "rounding", "arithmetic")


def _always(_genes: Genes) -> bool:
    return True


@dataclass(frozen=True)
class Gene:
    """One gene: a field of `LayerConfig` and everything derived from it.

    Exactly one of `values` (a categorical gene, in the order a search draws
    them) and `bounds` (a number; `integer` for whole numbers) is set.
    `search` is the (low, high, log) range a search draws a float gene from,
    inside `bounds`. `allowed(genes)` narrows `values` given the genes before
    it (`why(genes)` says why, for errors); `fallback` is what repair picks
    when a value is not allowed (default: `default`, else the first allowed).
    `param(genes)` names the Optuna parameter when its choices depend on an
    earlier gene (e.g. ``format4``), with `param_key` naming that gene.
    `label(value, genes)` is its part of `describe` ("" for none);
    `weights_only` genes are left out of a 16-bit layer's label.
    """

    family: str
    default: Any = None
    values: tuple[Any, ...] = ()
    bounds: tuple[float, float] | None = None
    integer: bool = False
    search: tuple[float, float, bool] | None = None
    unit: str = ""
    exists: Callable[[Genes], bool] = _always
    condition: str = ""
    allowed: Callable[[Genes], tuple[Any, ...]] | None = None
    why: Callable[[Genes], str] | None = None
    fallback: Any = None
    param_key: str = ""
    label: Callable[[Any, Genes], str] | None = None
    weights_only: bool = True
    name: str = ""

    @property
    def categorical(self) -> bool:
        return bool(self.values)

    @property
    def conditional(self) -> bool:
        return self.exists is not _always

    def choices(self, genes: Genes) -> tuple[Any, ...]:
        """The values this gene may take after `genes` (categorical genes only)."""
        return self.allowed(genes) if self.allowed is not None else self.values

    def param(self, genes: Genes) -> str:
        """The Optuna parameter's name (within a gene group) under `genes`."""
        return f"{self.name}{genes[self.param_key]}" if self.param_key else self.name

    def check(self, value: Any, genes: Genes) -> None:
        """Raise `QoptError` (prefixed with the gene's name) unless `value` is valid after `genes`."""
        if self.categorical:
            _check_choice(self.name, value, self.values)
            allowed = self.choices(genes)
            if value not in allowed:
                reason = self.why(genes) if self.why is not None else ""
                raise QoptError(f"{self.name}: {value!r} {reason or 'is not allowed here'}")
        else:
            assert self.bounds is not None
            _check_range(self.name, value, self.bounds, self.integer)


def gene(family: str, *, default: Any = None, **metadata: Any) -> Any:
    """A `LayerConfig` field described by a `Gene` (see `Gene` for the arguments).

    A conditional gene's field defaults to None (absent); `LayerConfig` fills
    in `default` where its condition holds.
    """
    described = Gene(family=family, default=default, **metadata)
    field_default = None if described.conditional else default
    return dataclasses.field(default=field_default, metadata={"gene": described})


def only_with(name: str, value: Any) -> dict[str, Any]:
    """`exists` and `condition` for a gene that exists only while gene `name` is `value`
    (the condition's text is derived, so the two cannot disagree)."""
    return {"exists": lambda genes: genes[name] == value, "condition": f"with {name}: {value}"}


@cache
def schema(config_class: type) -> tuple[Gene, ...]:
    """The genes of a `LayerConfig` class (or a subclass adding genes), in field order,
    each with its name."""
    return tuple(
        dataclasses.replace(f.metadata["gene"], name=f.name, unit=f.metadata["gene"].unit or f.name)
        for f in dataclasses.fields(config_class)
        if "gene" in f.metadata
    )


def units(genes: tuple[Gene, ...]) -> dict[str, tuple[str, ...]]:
    """Mutation unit -> its genes (genes that change together), in field order."""
    grouped: dict[str, list[str]] = {}
    for g in genes:
        grouped.setdefault(g.unit, []).append(g.name)
    return {unit: tuple(names) for unit, names in grouped.items()}


def unit_families(genes: tuple[Gene, ...]) -> dict[str, str]:
    """Mutation unit -> the family it belongs to."""
    return {g.unit: g.family for g in genes}


def family_genes(genes: tuple[Gene, ...]) -> dict[str, tuple[str, ...]]:
    """Family -> its genes (what a family-level deviation or replacement redraws)."""
    return {family: tuple(g.name for g in genes if g.family == family) for family in FAMILIES}


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    booleans = all(isinstance(a, bool) for a in allowed)
    if isinstance(value, bool) != booleans or value not in allowed:
        if booleans:
            raise QoptError(f"{name}: must be true or false, got {value!r}")
        raise QoptError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_range(name: str, value: Any, bounds: tuple[float, float], integer: bool) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not bounds[0] <= value <= bounds[1]:
        kind = "an integer" if integer else "a number"
        raise QoptError(f"{name}: {value!r} is not {kind} in [{bounds[0]}, {bounds[1]}]")
