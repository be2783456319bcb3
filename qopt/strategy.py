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

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml

from qopt.errors import QoptError
from qopt.io import read_document

BITS = (2, 3, 4, 5, 6, 8, 16)
WEIGHT_FORMATS = ("int", "fp", "nf4")
FORMAT_BITS = {"int": BITS, "fp": (4, 8, 16), "nf4": (4, 16)}
GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZE_RANGE = (16, 256)
SCALE_RULES = ("absmax", "mse", "percentile")
CLIP_PERCENTILE_RANGE = (90.0, 100.0)
OUTLIER_POLICIES = ("none", "topk", "smooth", "rotate")
TOPK_FRACTION_RANGE = (0.0001, 0.1)
SMOOTH_ALPHA_RANGE = (0.0, 1.0)
ACT_FORMATS = ("none", "int", "fp")
ACT_BITS = {"int": (4, 8), "fp": (8,)}
ACCUMULATIONS = ("fp32", "fp16", "bf16")
ROUNDINGS = ("nearest", "stochastic", "gptq", "awq", "hqq")
#: Rounding methods that need the layer's input Hessian from calibration data.
HESSIAN_ROUNDINGS = ("gptq", "awq")

#: Roles that stay 16-bit unless a strategy names them explicitly.
EDGE_ROLES = ("embed", "lm_head")


class _Conditional(NamedTuple):
    """A gene that exists only when `exists(genes)`; `default` when it appears."""

    exists: Callable[[Mapping[str, Any]], bool]
    default: Any
    condition_text: str


_CONDITIONAL_GENES = {
    "group_size": _Conditional(lambda g: g["granularity"] == "group", 128, "with granularity: group"),
    "clip_percentile": _Conditional(lambda g: g["scale"] == "percentile", 99.9, "with scale: percentile"),
    "topk_fraction": _Conditional(lambda g: g["outliers"] == "topk", 0.01, "with outliers: topk"),
    "smooth_alpha": _Conditional(lambda g: g["outliers"] == "smooth", 0.5, "with outliers: smooth"),
    "act_bits": _Conditional(lambda g: g["act_format"] != "none", 8, "when act_format is not none"),
}


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if isinstance(value, bool) and not all(isinstance(a, bool) for a in allowed):
        raise QoptError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if value not in allowed:
        raise QoptError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_range(name: str, value: Any, bounds: tuple[float, float], integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not bounds[0] <= value <= bounds[1]:
        kind = "an integer" if integer else "a number"
        raise QoptError(f"{name}: {value!r} is not {kind} in [{bounds[0]}, {bounds[1]}]")


@dataclass(frozen=True)
class LayerConfig:
    """How one weight matrix (and the activations entering it) is quantized.

    `bits` is the payload width in bits per weight; side data (scales, zero
    points, outliers) is accounted for in `qopt.bits`.
    """

    bits: int = 16
    format: str = "int"
    granularity: str = "group"
    group_size: int | None = 128
    symmetric: bool = False
    scale: str = "absmax"
    clip_percentile: float | None = None
    outliers: str = "none"
    topk_fraction: float | None = None
    smooth_alpha: float | None = None
    act_format: str = "none"
    act_bits: int | None = None
    accumulation: str = "fp32"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        _check_choice("bits", self.bits, BITS)
        _check_choice("format", self.format, WEIGHT_FORMATS)
        if self.bits not in FORMAT_BITS[self.format]:
            raise QoptError(
                f"bits: format {self.format!r} cannot be {self.bits}-bit "
                f"(allowed: {', '.join(map(str, FORMAT_BITS[self.format]))})"
            )
        if self.format != "int" and not self.symmetric:
            raise QoptError(f"symmetric: the {self.format} grid is symmetric; set symmetric: true")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("scale", self.scale, SCALE_RULES)
        _check_choice("outliers", self.outliers, OUTLIER_POLICIES)
        _check_choice("act_format", self.act_format, ACT_FORMATS)
        _check_choice("accumulation", self.accumulation, ACCUMULATIONS)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        if not isinstance(self.symmetric, bool):
            raise QoptError(f"symmetric: must be true or false, got {self.symmetric!r}")
        if self.rounding == "hqq" and self.quantizes_weights and (self.format != "int" or self.symmetric):
            raise QoptError(
                "rounding: hqq optimises the zero points of an asymmetric INT grid; use format: int, symmetric: false"
            )
        genes = self.genes()
        for name, gene in _CONDITIONAL_GENES.items():
            present = genes[name] is not None
            if gene.exists(genes) and not present:
                raise QoptError(f"{name}: required by this config but missing")
            if present and not gene.exists(genes):
                raise QoptError(f"{name}: only allowed {gene.condition_text}")
        if self.group_size is not None:
            _check_range("group_size", self.group_size, GROUP_SIZE_RANGE, integer=True)
        if self.clip_percentile is not None:
            _check_range("clip_percentile", self.clip_percentile, CLIP_PERCENTILE_RANGE)
        if self.topk_fraction is not None:
            _check_range("topk_fraction", self.topk_fraction, TOPK_FRACTION_RANGE)
        if self.smooth_alpha is not None:
            _check_range("smooth_alpha", self.smooth_alpha, SMOOTH_ALPHA_RANGE)
        if self.act_bits is not None:
            _check_choice("act_bits", self.act_bits, ACT_BITS[self.act_format])

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

    def genes(self) -> dict[str, Any]:
        """Gene name -> value, absent conditional genes as None (a flat, shallow `asdict`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def evolve(self, **changes: Any) -> LayerConfig:
        """This config with some genes changed, conditional genes kept consistent.

        Genes that stop existing are dropped; genes that come into existence
        take their default unless given. Used by overrides and by mutations.
        """
        return _build_config(self.genes(), changes, where="")

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
        return _build_config(start, dict(data), where)

    def describe(self) -> str:
        """A short human label, e.g. ``int4 g128 asym mse``."""
        if not self.quantizes_weights:
            text = "fp16"
        else:
            fmt = {"int": f"int{self.bits}", "fp": "fp4-e2m1" if self.bits == 4 else "fp8-e4m3", "nf4": "nf4"}
            gran = {"tensor": "tensor", "channel": "chan", "group": f"g{self.group_size}"}
            text = f"{fmt[self.format]} {gran[self.granularity]}"
            if self.format == "int":
                text += " sym" if self.symmetric else " asym"
            if self.scale != "absmax":
                text += f" {self.scale}"
        if self.outliers == "topk":
            text += f" keep{self.topk_fraction:.2%}"
        elif self.outliers == "smooth":
            text += f" smooth{self.smooth_alpha:.2f}"
        elif self.outliers == "rotate":
            text += " rot"
        if self.quantizes_activations:
            text += f" a{self.act_format}{self.act_bits}"
        if self.accumulation != "fp32":
            text += f" acc-{self.accumulation}"
        if self.rounding != "nearest":
            text += f" {self.rounding}"
        return text


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
    return {k: v for k, v in genes.items() if k not in _CONDITIONAL_GENES or _CONDITIONAL_GENES[k].exists(full)}


def _build_config(start: dict[str, Any], changes: Mapping[str, Any], where: str) -> LayerConfig:
    genes = dict(start)
    unknown = set(changes) - set(genes)
    if unknown:
        prefix = f"{where}." if where else ""
        raise QoptError(f"{prefix}{sorted(unknown)[0]}: unknown gene (genes: {', '.join(genes)})")
    genes.update(changes)
    if "format" in changes and changes["format"] != "int" and "symmetric" not in changes:
        genes["symmetric"] = True
    for name, gene in _CONDITIONAL_GENES.items():
        if gene.exists(genes):
            if genes[name] is None:
                genes[name] = gene.default
        elif name not in changes:
            genes[name] = None  # inherited from a config where it existed
    try:
        return LayerConfig(**genes)
    except QoptError as exc:
        raise QoptError(f"{where}.{exc}" if where else str(exc)) from None
    except TypeError as exc:  # e.g. a list where a number belongs
        raise QoptError(f"{where or 'layer config'}: {exc}") from None
