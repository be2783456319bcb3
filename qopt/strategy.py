"""The genome: a quantization strategy for a whole model, as plain data.

A `Strategy` is a default `LayerConfig` plus overrides by *role* (all `down`
projections, say) and by module name. Each `LayerConfig` carries the five gene
families of qopt's research design:

1. bit-width: 2, 3, 4, 5, 6, 8, or 16 (16 = left unquantized);
2. scaling rule: granularity (tensor / channel / group of 16-256 inputs),
   symmetric or not, and how the scale is chosen (abs-max, MSE clip search,
   percentile clip);
3. formats: weights as INT, FP (e2m1 at 4 bits, e4m3 at 8) or NF4; activations
   off, or quantized dynamically per token (INT4/INT8, FP8 e4m3);
4. outlier handling: none, keep the top-k fraction of weights in 16 bits,
   SmoothQuant-style migration with strength alpha, or a Hadamard rotation of
   the input dimension;
5. approximate arithmetic: fp32 / fp16 / bf16 accumulation of K-chunk partial
   sums;
6. weight rounding: round-to-nearest, stochastic rounding, GPTQ (Hessian-based
   error compensation), AWQ (activation-aware per-channel scaling) or HQQ
   (half-quadratic zero-point optimisation, calibration-free).

Some genes exist only under a condition (`group_size` only for group
granularity, ...). Configs are kept canonical: a conditional gene is `None`
exactly when its condition is false, so equal strategies compare equal and
serialise identically.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from qopt.errors import QoptError
from qopt.genes import Genes, gene, only_with, schema
from qopt.io import read_document
from qopt.quant.grid import QuantGrid, WeightQuantization

BITS = (2, 3, 4, 5, 6, 8, 16)
WEIGHT_FORMATS = ("int", "fp", "nf4")
FORMAT_BITS = {"int": BITS, "fp": (4, 8, 16), "nf4": (4, 16)}
GRANULARITIES = ("tensor", "channel", "group")
SCALE_RULES = ("absmax", "mse", "percentile")
OUTLIER_POLICIES = ("none", "topk", "smooth", "rotate")
ACT_FORMATS = ("none", "int", "fp")
ACT_BITS = {"int": (4, 8), "fp": (8,)}
ACCUMULATIONS = ("fp32", "fp16", "bf16")
ROUNDINGS = ("nearest", "stochastic", "gptq", "awq", "hqq")
#: Rounding methods that need the layer's input Hessian from calibration data.
HESSIAN_ROUNDINGS = ("gptq", "awq")

#: Roles that stay 16-bit unless a strategy names them explicitly.
EDGE_ROLES = ("embed", "lm_head")


def _format_label(bits: int, g: Genes) -> str:
    if bits == 16:
        return "fp16"
    return {"int": f"int{bits}", "fp": "fp4-e2m1" if bits == 4 else "fp8-e4m3", "nf4": "nf4"}[g["format"]]


def _outliers_label(policy: str, g: Genes) -> str:
    if policy == "topk":
        return f"keep{g['topk_fraction']:.2%}"
    if policy == "smooth":
        return f"smooth{g['smooth_alpha']:.2f}"
    return "rot" if policy == "rotate" else ""


def _roundings(g: Genes) -> tuple[str, ...]:
    asymmetric_int = g["format"] == "int" and not g["symmetric"]
    return ROUNDINGS if asymmetric_int or g["bits"] == 16 else ROUNDINGS[:-1]


@dataclass(frozen=True)
class LayerConfig:
    """How one weight matrix (and the activations entering it) is quantized.

    Each field is a gene, described by its `gene(...)` entry (qopt.genes):
    this class body is the gene table. `bits` is the payload width in bits
    per weight; side data (scales, zero points, outliers) is accounted for in
    `qopt.bits`.
    """

    bits: int = gene("bits", default=16, values=BITS, label=_format_label, weights_only=False)
    format: str = gene(
        "format",
        default="int",
        values=WEIGHT_FORMATS,
        allowed=lambda g: tuple(f for f in WEIGHT_FORMATS if g["bits"] in FORMAT_BITS[f]),
        why=lambda g: f"has no {g['bits']}-bit grid",
        param_key="bits",
    )
    granularity: str = gene(
        "scaling",
        default="group",
        values=GRANULARITIES,
        fallback="channel",
        label=lambda v, g: {"tensor": "tensor", "channel": "chan", "group": f"g{g['group_size']}"}[v],
    )
    group_size: int | None = gene(
        "scaling",
        default=128,
        bounds=(16, 256),
        integer=True,
        unit="granularity",
        **only_with("granularity", "group"),
    )
    symmetric: bool = gene(
        "scaling",
        default=False,
        values=(False, True),
        allowed=lambda g: (False, True) if g["format"] == "int" else (True,),
        why=lambda g: f"the {g['format']} grid is symmetric; set symmetric: true",
        label=lambda v, g: ("sym" if v else "asym") if g["format"] == "int" else "",
    )
    scale: str = gene("scaling", default="absmax", values=SCALE_RULES, label=lambda v, g: "" if v == "absmax" else v)
    clip_percentile: float | None = gene(
        "scaling",
        default=99.9,
        bounds=(90.0, 100.0),
        search=(99.0, 99.99, False),
        unit="scale",
        **only_with("scale", "percentile"),
    )
    outliers: str = gene(
        "outliers",
        default="none",
        values=OUTLIER_POLICIES,
        weights_only=False,
        label=_outliers_label,
    )
    topk_fraction: float | None = gene(
        "outliers",
        default=0.01,
        bounds=(0.0001, 0.1),
        search=(0.001, 0.05, True),
        unit="outliers",
        **only_with("outliers", "topk"),
    )
    smooth_alpha: float | None = gene(
        "outliers",
        default=0.5,
        bounds=(0.0, 1.0),
        search=(0.2, 0.9, False),
        unit="outliers",
        **only_with("outliers", "smooth"),
    )
    act_format: str = gene(
        "format",
        default="none",
        values=ACT_FORMATS,
        unit="activations",
        weights_only=False,
        label=lambda v, g: "" if v == "none" else f"a{v}{g['act_bits']}",
    )
    act_bits: int | None = gene(
        "format",
        default=8,
        values=(4, 8),
        unit="activations",
        exists=lambda g: g["act_format"] != "none",
        condition="when act_format is not none",
        allowed=lambda g: ACT_BITS[g["act_format"]],
        why=lambda g: f"{g['act_format']} activations come in {', '.join(map(str, ACT_BITS[g['act_format']]))} bits",
    )
    accumulation: str = gene(
        "arithmetic",
        default="fp32",
        values=ACCUMULATIONS,
        weights_only=False,
        label=lambda v, g: "" if v == "fp32" else f"acc-{v}",
    )
    rounding: str = gene(
        "rounding",
        default="nearest",
        values=ROUNDINGS,
        allowed=_roundings,
        why=lambda g: "needs an asymmetric INT grid (hqq optimises zero points); use format: int, symmetric: false",
        weights_only=False,
        label=lambda v, g: "" if v == "nearest" else v,
    )

    def __post_init__(self) -> None:
        genes: dict[str, Any] = {}
        for g in schema(type(self)):
            value = getattr(self, g.name)
            if not g.exists(genes):
                if value is not None:
                    raise QoptError(f"{g.name}: only allowed {g.condition}")
                continue
            if value is None:  # a conditional gene that exists takes its default
                value = g.default
                object.__setattr__(self, g.name, value)
            g.check(value, genes)
            genes[g.name] = value

    @property
    def quantizes_weights(self) -> bool:
        return self.bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.act_format != "none"

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing this layer needs its input Hessian (GPTQ, AWQ)."""
        return self.quantizes_weights and self.rounding in HESSIAN_ROUNDINGS

    def grid(self) -> QuantGrid | None:
        """The grid this config rounds weights onto (None for a 16-bit config)."""
        if not self.quantizes_weights:
            return None
        return QuantGrid(
            format=self.format,
            bits=self.bits,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=self.group_size,
            scale_rule=self.scale,
            clip_percentile=self.clip_percentile,
        )

    def quantization(self) -> WeightQuantization:
        """The weight numerics this config asks for, as plain values."""
        return WeightQuantization(
            grid=self.grid(),
            rounding=self.rounding,
            keep_fraction=self.topk_fraction,
            smooth_alpha=self.smooth_alpha,
            rotate=self.outliers == "rotate",
        )

    def genes(self) -> dict[str, Any]:
        """Gene name -> value, absent conditional genes as None (a flat, shallow `asdict`)."""
        return {g.name: getattr(self, g.name) for g in schema(type(self))}

    def evolve(self, **changes: Any) -> LayerConfig:
        """This config with some genes changed, conditional genes kept consistent.

        Genes that stop existing are dropped; genes that come into existence
        take their default unless given. Used by overrides and by mutations.
        """
        return _build_config(type(self), self.genes(), changes, where="")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.genes().items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: LayerConfig | None = None, where: str = "") -> LayerConfig:
        """Parse a (possibly partial) mapping of genes over `base`.

        `where` prefixes error messages (e.g. ``"layers.model.layers.0.mlp"``).
        """
        if not isinstance(data, Mapping):
            raise QoptError(f"{where or 'layer config'}: expected a mapping of genes, got {type(data).__name__}")
        start = (base if base is not None else cls()).genes()
        return _build_config(cls, start, dict(data), where)

    def describe(self) -> str:
        """A short human label, e.g. ``int4 g128 asym mse``."""
        genes = self.genes()
        parts = (
            g.label(genes[g.name], genes)
            for g in schema(type(self))
            if g.label is not None and genes[g.name] is not None and (self.quantizes_weights or not g.weights_only)
        )
        return " ".join(p for p in parts if p)


GENES = schema(LayerConfig)
"""The gene table, in field order (see `qopt.genes`)."""


FP16 = LayerConfig()


class LayerInfo(Protocol):
    """What strategy resolution needs to know about one quantizable module."""

    name: str
    role: str
    in_features: int
    is_embedding: bool
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Strategy:
    """A complete quantization policy for one model.

    Resolution order for a module: `layers[name]`, then `roles[role]`, then
    `default`. `default` covers the linear layers of the transformer blocks;
    embeddings and the output head (`EDGE_ROLES`) stay 16-bit unless a role or
    layer entry names them.
    """

    default: LayerConfig = FP16
    roles: Mapping[str, LayerConfig] = field(default_factory=dict)
    layers: Mapping[str, LayerConfig] = field(default_factory=dict)
    name: str = ""

    def config_for(self, name: str, role: str) -> LayerConfig:
        if name in self.layers:
            return self.layers[name]
        if role in self.roles:
            return self.roles[role]
        if role in EDGE_ROLES:
            return FP16
        return self.default

    def resolve(self, units: Sequence[LayerInfo]) -> dict[str, LayerConfig]:
        """Check this strategy against a model's modules; return name -> config.

        Raises `QoptError` naming the offending field for unknown module or role
        names, group sizes wider than a layer, and activation quantization on
        an embedding.
        """
        names = {u.name for u in units}
        alias_of = {alias: u.name for u in units for alias in u.aliases}
        for name in self.layers:
            if name in alias_of:
                raise QoptError(
                    f"layers.{name}: this weight is tied to {alias_of[name]}; configure {alias_of[name]} instead"
                )
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise QoptError(f"layers.{name}: the model has no quantizable module of that name{hint}")
        roles = {u.role for u in units}
        for role in self.roles:
            if role not in roles:
                raise QoptError(
                    f"roles.{role}: the model has no layer of that role (roles: {', '.join(sorted(roles))})"
                )
        plan = {}
        for unit in units:
            config = self.config_for(unit.name, unit.role)
            where = f"layers.{unit.name}" if unit.name in self.layers else f"roles.{unit.role}"
            if unit.role not in self.roles and unit.name not in self.layers:
                where = "default"
            if config.quantizes_weights and config.group_size is not None and config.group_size > unit.in_features:
                raise QoptError(
                    f"{where}.group_size: {config.group_size} is larger than {unit.name}'s "
                    f"input dimension {unit.in_features}"
                )
            if unit.is_embedding and (config.quantizes_activations or config.accumulation != "fp32"):
                raise QoptError(
                    f"{where}: {unit.name} is an embedding lookup; act_format and accumulation do not apply to it"
                )
            if unit.is_embedding and config.outliers in ("smooth", "rotate") and config.quantizes_weights:
                raise QoptError(
                    f"{where}.outliers: {config.outliers} needs a matmul input; {unit.name} is an embedding"
                )
            if unit.is_embedding and config.needs_hessian:
                raise QoptError(
                    f"{where}.rounding: {config.rounding} needs a matmul input; {unit.name} is an embedding"
                )
            plan[unit.name] = config
        return plan

    # ---- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.name:
            data["name"] = self.name
        data["default"] = self.default.to_dict()
        if self.roles:
            data["roles"] = {k: v.to_dict() for k, v in self.roles.items()}
        if self.layers:
            data["layers"] = {k: v.to_dict() for k, v in self.layers.items()}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Strategy:
        """Parse a strategy mapping. Role and layer entries may be partial:
        their genes are laid over `default`."""
        if not isinstance(data, Mapping):
            raise QoptError(f"a strategy must be a mapping with a 'default' entry, got {type(data).__name__}")
        unknown = set(data) - {"name", "default", "roles", "layers"}
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise QoptError(f"unknown strategy key(s) {names} (allowed: name, default, roles, layers)")
        default = LayerConfig.from_dict(data.get("default", {}), where="default")

        def entries(key: str) -> dict[str, LayerConfig]:
            section = data.get(key) or {}
            if not isinstance(section, Mapping):
                raise QoptError(f"{key}: expected a mapping of name -> genes")
            return {str(k): LayerConfig.from_dict(v, default, where=f"{key}.{k}") for k, v in section.items()}

        return cls(default=default, roles=entries("roles"), layers=entries("layers"), name=str(data.get("name", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def key(self) -> str:
        """A canonical string identifying this strategy's numerics (name excluded)."""
        return json.dumps({**self.to_dict(), "name": ""}, sort_keys=True)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        try:
            path.write_text(text)
        except OSError as exc:
            raise QoptError(f"cannot write strategy to {path}: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Strategy:
        """Read a strategy from a .yaml/.yml or .json file."""
        data = read_document(path, "strategy file")
        try:
            return cls.from_dict(data)
        except QoptError as exc:
            raise QoptError(f"strategy file {path}: {exc}") from exc


def uniform(
    bits: int,
    *,
    format: str = "int",
    granularity: str = "group",
    group_size: int | None = 128,
    symmetric: bool = False,
    scale: str = "absmax",
    name: str = "",
    **genes: Any,
) -> Strategy:
    """The same config on every block linear layer; embeddings and head stay 16-bit."""
    config = FP16.evolve(
        bits=bits,
        format=format,
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        symmetric=symmetric or format != "int",
        scale=scale,
        **genes,
    )
    return Strategy(default=config, name=name or f"uniform {config.describe()}")


def drop_inactive_genes(genes: Mapping[str, Any]) -> dict[str, Any]:
    """`genes` without the conditional genes whose condition does not hold.

    Operators use it to turn an edited gene set into one `LayerConfig` accepts
    (e.g. `smooth_alpha` after outliers changed from smooth to none).
    """
    full = {**FP16.genes(), **genes}
    return {k: v for k, v in genes.items() if k not in _BY_NAME or _BY_NAME[k].exists(full)}


_BY_NAME = {g.name: g for g in GENES}


def _build_config(
    config_class: type[LayerConfig], start: dict[str, Any], changes: Mapping[str, Any], where: str
) -> LayerConfig:
    """`start` with `changes` applied, made consistent gene by gene: a gene that was
    not changed follows the ones that were (dropped if its condition no longer
    holds; the only allowed value if its old one is no longer allowed, e.g. a
    float format's symmetric grid). Changed genes are validated as given."""
    genes = dict(start)
    unknown = set(changes) - set(genes)
    if unknown:
        prefix = f"{where}." if where else ""
        raise QoptError(f"{prefix}{sorted(unknown)[0]}: unknown gene (genes: {', '.join(genes)})")
    genes.update(changes)
    decided: dict[str, Any] = {}
    for g in schema(config_class):
        value = genes[g.name]
        if g.name not in changes:
            if g.conditional and not g.exists(decided):
                value = None  # inherited from a config where it existed
            elif g.categorical and value is not None:
                try:
                    choices = g.choices(decided)
                except (KeyError, TypeError):  # an earlier gene is invalid: its own check reports it
                    choices = g.values
                if value not in choices and len(choices) == 1:
                    value = choices[0]
        genes[g.name] = value
        decided[g.name] = g.default if value is None and g.exists(decided) else value
    try:
        return config_class(**genes)
    except QoptError as exc:
        raise QoptError(f"{where}.{exc}" if where else str(exc)) from None
    except TypeError as exc:  # e.g. a list where a number belongs
        raise QoptError(f"{where or 'layer config'}: {exc}") from None
