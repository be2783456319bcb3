"""Apply a Strategy to a loaded model in place, and undo it.

Weights are fake-quantized (quantized and dequantized back to the model's
dtype) so the model runs unchanged code; activation quantization and
low-precision accumulation replace the forward of the affected modules. A
quantized weight is swapped in as a new parameter and the model's own
parameter is put back afterwards: the pristine weights are never overwritten,
and never copied.
With a weight cache, a (module, config) pair quantized before is not
quantized again: the next strategy pays only for the layers that changed.
"""

from __future__ import annotations

import time
import types
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qopt.bits import ModelCost, model_cost
from qopt.cache import WeightCache, tensor_bytes
from qopt.calibration import ActivationStats
from qopt.errors import QoptError
from qopt.model import LoadedModel, QuantUnit
from qopt.quant import InputTransform, fake_quantize_activations, input_transform, lowprec_linear
from qopt.quant.weight import QuantizedMatrix, quantize_weight, to_original_basis
from qopt.strategy import LayerConfig, Strategy


@dataclass(frozen=True)
class QuantReport:
    """What applying a strategy did: the per-module plan, its cost, and the time (s)."""

    plan: dict[str, LayerConfig]
    cost: ModelCost
    seconds: float


class Quantizer:
    """Puts strategies on one model, one at a time.

    `calibrate(hessians)` is called (once, lazily) when a strategy needs
    activation statistics: smoothing needs abs-maxes, GPTQ and AWQ also need
    Hessians (`hessians=True`). `cache_bytes` bounds the memory kept for
    quantized weights of earlier strategies (0: quantize every time).
    """

    def __init__(
        self, lm: LoadedModel, calibrate: Callable[[bool], ActivationStats] | None = None, cache_bytes: int = 0
    ) -> None:
        self.lm = lm
        self.cache = WeightCache(cache_bytes)
        self._calibrate = calibrate
        self._stats: ActivationStats | None = None
        self._pristine: dict[str, torch.nn.Parameter] = {}  # unit name -> its own parameter, while swapped out
        self._patched: list[QuantUnit] = []

    def plan(self, strategy: Strategy) -> dict[str, LayerConfig]:
        """Validate `strategy` against this model; module name -> config."""
        return strategy.resolve(self.lm.units)

    def cost(self, strategy: Strategy) -> ModelCost:
        """True storage cost of `strategy` on this model, without applying it."""
        return model_cost(self.lm.units, self.plan(strategy), self.lm.other_params)

    def apply(self, strategy: Strategy, seed: int = 0) -> QuantReport:
        """Quantize the model as `strategy` says (starting from pristine weights)."""
        start = time.perf_counter()
        plan = self.plan(strategy)
        self.restore()
        stats = self.prepare([plan])
        with torch.inference_mode():
            for unit in self.lm.units:
                self._apply_unit(unit, plan[unit.name], stats, seed)
        cost = model_cost(self.lm.units, plan, self.lm.other_params)
        return QuantReport(plan=plan, cost=cost, seconds=time.perf_counter() - start)

    def restore(self) -> None:
        """Put back every pristine weight and original forward."""
        for name, original in self._pristine.items():
            self.lm.unit(name).swap_weight(original)
        self._pristine.clear()
        for unit in self._patched:
            del unit.module.forward
        self._patched.clear()

    @contextmanager
    def applied(self, strategy: Strategy, seed: int = 0) -> Iterator[QuantReport]:
        """`with quantizer.applied(s) as report:` the model is quantized inside."""
        report = self.apply(strategy, seed)
        try:
            yield report
        finally:
            self.restore()

    def prepare(self, plans: Sequence[dict[str, LayerConfig]]) -> ActivationStats | None:
        """Collect, once, the calibration statistics any of these plans needs (None if none does)."""
        configs = [c for plan in plans for c in plan.values()]
        smooths = any(c.outliers == "smooth" for c in configs if c.quantizes_weights or c.quantizes_activations)
        hessians = any(c.needs_hessian for c in configs)
        return self.activation_stats(hessians) if smooths or hessians else None

    def activation_stats(self, hessians: bool = False) -> ActivationStats:
        """The calibration statistics (collected on first use, then cached); with
        `hessians`, including every layer's input Hessian."""
        if self._stats is None or (hessians and self._stats.hessian is None):
            if self._calibrate is None:
                raise QoptError(
                    "this strategy uses smoothing, GPTQ or AWQ, which need calibration data; none was given"
                )
            self.restore()
            # Same windows, same model: abs-maxes collected again with the Hessians are the same,
            # so weights already cached (made with the abs-maxes, or with no statistics) stay valid.
            self._stats = self._calibrate(hessians)
        return self._stats

    def _apply_unit(self, unit: QuantUnit, config: LayerConfig, stats: ActivationStats | None, seed: int) -> None:
        needs_forward = config.quantizes_activations or config.accumulation != "fp32"
        if not config.quantizes_weights and not needs_forward:
            return
        w = unit.read_weight()
        entry = self.cache.get(_cache_key(unit.name, config, seed))
        if entry is None:
            stored, transform = quantize_unit(unit.name, w.float(), config, stats, seed)
            w_hat = None if stored is None else to_original_basis(stored.values, transform).to(w.dtype)
            entry = self.remember(unit.name, config, seed, w_hat, transform)
        w_hat, transform = entry
        if w_hat is not None:
            self._pristine[unit.name] = unit.swap_weight(w_hat)
        if needs_forward:
            forward = _emulated_forward((w if w_hat is None else w_hat).float(), config, transform)
            unit.module.forward = types.MethodType(forward, unit.module)
            self._patched.append(unit)

    def remember(
        self, name: str, config: LayerConfig, seed: int, w_hat: torch.Tensor | None, transform: InputTransform | None
    ) -> tuple[torch.Tensor | None, InputTransform | None]:
        """Keep module `name`'s weight under `config` (None: unchanged) and its input transform
        in the weight cache, so applying that config again uses them instead of quantizing."""
        held = (transform.smooth, transform.rotation, transform.scale) if transform is not None else ()
        self.cache.put(_cache_key(name, config, seed), (w_hat, transform), tensor_bytes(w_hat, *held))
        return w_hat, transform


def _cache_key(name: str, config: LayerConfig, seed: int) -> tuple:
    # Stochastic rounding draws from a generator seeded per (seed, module): part of the key.
    return (name, config, seed if config.rounding == "stochastic" else None)


def quantize_unit(
    name: str, w: torch.Tensor, config: LayerConfig, stats: ActivationStats | None, seed: int
) -> tuple[QuantizedMatrix | None, InputTransform | None]:
    """Module `name`'s fp32 weight `w` ([out, in]) as `config` stores it (None for a
    16-bit config), and the input transform it is stored in (None if none).

    Stochastic rounding draws from a generator seeded by (`seed`, module name),
    so a strategy quantizes the same way every time.
    """
    act_absmax = stats.absmax.get(name) if stats is not None else None
    hessian = stats.hessian.get(name) if stats is not None and stats.hessian is not None else None
    recipe = config.quantization()
    transform = input_transform(recipe, w, act_absmax, hessian)
    if recipe.grid is None:
        return None, transform
    generator = None
    if recipe.rounding == "stochastic":
        generator = torch.Generator(device=w.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    stored = quantize_weight(w, recipe, transform, generator, hessian if recipe.needs_hessian else None)
    return stored, transform


def _emulated_forward(w: torch.Tensor, config: LayerConfig, transform: InputTransform | None):
    """A forward computing in the transformed basis with quantized activations
    and/or low-precision accumulation. `w` is the (fake-quantized) [out, in] weight."""
    if transform is not None and config.quantizes_activations:
        w = transform.weight_forward(w)
    else:
        transform = None  # without activation quantization the transform cancels out

    def forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if transform is not None:
            x = transform.input_forward(x)
        if config.quantizes_activations:
            assert config.act_bits is not None
            x = fake_quantize_activations(x, config.act_format, config.act_bits)
        if config.accumulation != "fp32":
            return lowprec_linear(x, w, module.bias, config.accumulation)
        return F.linear(x, w, module.bias)

    return forward
