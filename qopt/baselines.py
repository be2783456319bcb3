"""Human-designed quantization schemes as Strategies, measured in qopt's own harness.

Each scheme is one uniform `LayerConfig` on every block linear layer, built
from the same genes a search uses, so a baseline is measured on the same data
split, in the same true bits, and can seed a search:

- `rtn`: round-to-nearest (the plain scheme every paper starts from);
- `gptq`: GPTQ's Hessian-based error compensation (Frantar et al. 2023);
- `awq`: AWQ's activation-aware per-channel scaling (Lin et al. 2024);
- `hqq`: HQQ's calibration-free zero-point optimisation (Badri & Shaji 2023;
  asymmetric only);
- `smoothquant`: SmoothQuant W·A8 (Xiao et al. 2023): alpha 0.5 smoothing,
  per-channel symmetric weights, dynamic per-token INT8 activations;
- `quarot`: QuaRot-style W·A4 (Ashkboos et al. 2024): a Hadamard rotation of
  each layer's input, GPTQ on per-channel symmetric weights, INT4 activations.

Two refinements apply to the weight-only methods (RTN, GPTQ, AWQ, HQQ), as the
tools people use apply them:
- `scale="mse"`: each block's scale is searched (clipped) to minimise the
  weight's squared error instead of set by the largest magnitude, as GPTQ's
  reference quantizer (`mse=True`) and llama.cpp's k-quants do;
- `rotate=True`: a Hadamard rotation of each layer's input before quantizing,
  spreading outliers over all channels (weight-only QuaRot / QuIP#).

`group_size=None` means per-channel scales. SmoothQuant and QuaRot are
per-channel symmetric by definition and ignore `group_size`, `symmetric`,
`scale` and `rotate`; HQQ is asymmetric by definition and ignores `symmetric`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from qopt.errors import QoptError
from qopt.evaluate import Evaluator, Metrics
from qopt.model import QuantUnit
from qopt.strategy import BITS, LayerConfig, Strategy, uniform

METHODS = ("rtn", "gptq", "awq", "hqq", "smoothquant", "quarot")
#: How a weight-only scheme sets each block's scale (see the module docstring).
SCHEME_SCALES = ("absmax", "mse")
_FIXED = ("smoothquant", "quarot")  # methods that fix their own grid, scale rule and rotation
_ROUNDING = {"rtn": "nearest", "gptq": "gptq", "awq": "awq", "hqq": "hqq"}


def label(config: LayerConfig) -> str:
    """A scheme's name from its config: the rounding method first, e.g. ``GPTQ int3 g64 asym``."""
    method = {"nearest": "RTN", "stochastic": "SR"}.get(config.rounding, config.rounding.upper())
    return f"{method} {config.evolve(rounding='nearest').describe()}"


@dataclass(frozen=True)
class Scheme:
    """One human-designed scheme at one setting."""

    method: str
    bits: int
    group_size: int | None = 128  # None: one scale per output channel
    symmetric: bool = False
    scale: str = "absmax"  # or "mse": a clip search per block
    rotate: bool = False  # a Hadamard rotation of each layer's input first

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QoptError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.scale not in SCHEME_SCALES:
            raise QoptError(f"scale {self.scale!r} is not one of {', '.join(SCHEME_SCALES)}")
        if self.bits not in BITS or self.bits == 16:
            raise QoptError(f"bits {self.bits} is not one of {', '.join(map(str, BITS[:-1]))}")

    @property
    def granularity_label(self) -> str:
        if self.method in _FIXED or self.group_size is None:
            return "chan"
        return f"g{self.group_size}"

    def strategy(self) -> Strategy:
        """The scheme as an executable Strategy (embeddings and head stay 16-bit)."""
        channel = dict(granularity="channel", group_size=None, symmetric=True)
        if self.method == "smoothquant":
            genes = dict(channel, outliers="smooth", smooth_alpha=0.5, act_format="int", act_bits=8)
            name = f"SmoothQuant W{self.bits}A8"
        elif self.method == "quarot":
            genes = dict(channel, outliers="rotate", rounding="gptq", act_format="int", act_bits=4)
            name = f"QuaRot W{self.bits}A4"
        else:
            scaling = (
                dict(granularity="channel", group_size=None)
                if self.group_size is None
                else dict(granularity="group", group_size=self.group_size)
            )
            symmetric = self.symmetric and self.method != "hqq"  # HQQ optimises zero points
            genes = dict(scaling, symmetric=symmetric, rounding=_ROUNDING[self.method], scale=self.scale)
            if self.rotate:
                genes["outliers"] = "rotate"
            name = ""
        strategy = uniform(self.bits, **genes)
        return Strategy(default=strategy.default, name=name or label(strategy.default))


@dataclass(frozen=True)
class Allocation:
    """The sensitivity-based allocator's strategy at one budget (see `qopt.allocate`),
    measured like a scheme."""

    budget_bpw: float
    allocated: Strategy
    method: str = "allocate"
    scale = "mixed"  # not fields: the allocator chooses scale rules and rotations per layer
    rotate = None

    @property
    def bits(self) -> float:
        return self.budget_bpw

    @property
    def granularity_label(self) -> str:
        return "mixed"

    def strategy(self) -> Strategy:
        return self.allocated


def fitting_group_size(units: Sequence[QuantUnit], candidates: Sequence[int] = (128, 64, 32, 16)) -> int:
    """The largest candidate group size no block linear layer's input dimension is smaller than."""
    narrowest = min(u.in_features for u in units if not u.is_embedding and u.role != "lm_head")
    for size in candidates:
        if size <= narrowest:
            return size
    raise QoptError(f"no group size of {list(candidates)} fits this model's narrowest layer ({narrowest} inputs)")


def schemes(
    methods: Iterable[str],
    bits: Iterable[int],
    group_size: int | None = 128,
    symmetric: bool = False,
    scales: Sequence[str] = ("absmax",),
    rotations: Sequence[bool] = (False,),
) -> list[Scheme]:
    """Every (method, bits, scale rule, rotation) combination, in the order given;
    SmoothQuant and QuaRot, which fix their own scale and rotation, once per bit-width."""
    chosen = []
    for method in methods:
        variants = [("absmax", False)] if method in _FIXED else [(s, r) for s in scales for r in rotations]
        chosen += [Scheme(method, b, group_size, symmetric, s, r) for b in bits for s, r in variants]
    return chosen


@dataclass(frozen=True)
class BaselineResult:
    """One scheme measured on both parts of the data; `seconds` is the wall clock of both."""

    scheme: Scheme | Allocation
    strategy: Strategy
    search: Metrics
    held_out: Metrics
    seconds: float

    def row(self) -> dict:
        """The table row: KL in nats/token, bpw of the block linear layers, seconds."""
        return {
            "method": self.scheme.method,
            "bits": self.scheme.bits,
            "group": self.scheme.granularity_label,
            "scale": self.scheme.scale,
            "rotate": self.scheme.rotate,
            "name": self.strategy.name,
            "bpw": self.held_out.bpw,
            "search_kl": self.search.kl,
            "eval_kl": self.held_out.kl,
            "eval_ppl": self.held_out.ppl,
            "eval_top1": self.held_out.top1,
            "quantize_seconds": self.held_out.quantize_seconds,  # applying the scheme once
            "seconds": self.seconds,
        }


def run(evaluator: Evaluator, chosen: Iterable[Scheme | Allocation]) -> Iterator[BaselineResult]:
    """Measure each scheme on the search part and on the held-out evaluation part.

    The unquantized references and the calibration statistics (from the
    search part only) are computed once, before the first scheme, and are not
    counted in a scheme's seconds.
    """
    chosen = list(chosen)
    plans = [evaluator.quantizer.plan(s.strategy()) for s in chosen]  # reject a bad setting before any work
    for part in ("search", "eval"):
        evaluator.reference(part)
    evaluator.quantizer.prepare(plans)
    for scheme in chosen:
        strategy = scheme.strategy()
        start = time.perf_counter()
        search = evaluator.evaluate(strategy, "search")
        held_out = evaluator.evaluate(strategy, "eval")
        yield BaselineResult(scheme, strategy, search, held_out, time.perf_counter() - start)
