"""Sensitivity-based bit allocation: the strongest non-search competitor.

In the spirit of llama.cpp's target-bpw proposal, HIGGS's linearity theorem
and ModelOpt's auto-quantize: the model's error is taken to be additive over
layers, each layer's share measured once per candidate config, and the
cheapest-error choice under a size budget is solved exactly.

1. `measure_costs`: for every block linear layer and every config of a menu,
   the layer's true bits (scales, zero points counted, `qopt.bits`) and a
   quality proxy, one of `PROXIES`:
   - "kl": the KL (nats/token, search part) of the model with *only that
     layer* quantized that way: one model evaluation per (layer, config);
   - "hessian": the layer's output error tr(dW H dW^T) (H = X^T X / n from
     the calibration windows, the error GPTQ minimises), scaled per layer
     into KL by *one* single-layer KL measurement (an `anchor` config): one
     model evaluation per layer, the menu's other configs cost a matmul each.
     HIGGS's linearity theorem in a measured form: a layer's KL share is
     proportional to its output error.
2. `solve`: a multiple-choice knapsack by dynamic programming over the bit
   budget (costs rounded *up* to a grid of at most `resolution` steps, so the
   solution never exceeds the budget; exact when costs are whole steps).
3. `allocate`: the Strategy for one budget in bits per weight.

`proxy_fit` reports how well the additive proxy predicts the real KL (rank
correlation over random mixtures of the menu), the check that makes the
allocator's premise a measured one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qopt.bits import layer_cost
from qopt.calibration import ActivationStats
from qopt.errors import QoptError
from qopt.evaluate import Evaluator
from qopt.model import QuantUnit
from qopt.quant.weight import to_original_basis
from qopt.quantizer import quantize_unit
from qopt.strategy import EDGE_ROLES, FP16, LayerConfig, Strategy

#: Bit-widths the allocator chooses among (16 = leave the layer unquantized).
ALLOCATOR_BITS = (2, 3, 4, 5, 6, 8)
ALLOCATOR_ROUNDINGS = ("nearest", "gptq")
#: Scale rules and outlier policies (a Hadamard rotation or none) the allocator chooses among:
#: the refinements human schemes apply (`qopt.baselines`), so it is the strongest of them.
ALLOCATOR_SCALES = ("absmax", "mse")
ALLOCATOR_OUTLIERS = ("none", "rotate")
#: Quality proxies `measure_costs` knows (see the module docstring).
PROXIES = ("kl", "hessian")

_Units = Sequence[QuantUnit]
_Menu = Sequence[LayerConfig]


def menu(
    group_size: int | None,
    bits: Sequence[int] = ALLOCATOR_BITS,
    roundings: Sequence[str] = ALLOCATOR_ROUNDINGS,
    scales: Sequence[str] = ALLOCATOR_SCALES,
    outliers: Sequence[str] = ALLOCATOR_OUTLIERS,
) -> list[LayerConfig]:
    """Candidate configs: each bit-width with per-channel symmetric scales and (given a
    `group_size`) asymmetric groups, with each rounding method, scale rule and outlier
    policy; plus 16-bit. The default menu has 6 x 2 x 2 x 2 x 2 + 1 = 97 configs."""
    scalings = [dict(granularity="channel", group_size=None, symmetric=True)]
    if group_size is not None:
        scalings.append(dict(granularity="group", group_size=group_size, symmetric=False))
    configs = [
        FP16.evolve(bits=b, rounding=r, scale=rule, outliers=policy, **scaling)
        for b in bits
        if b < 16
        for scaling in scalings
        for r in roundings
        for rule in scales
        for policy in outliers
    ]
    return [*configs, FP16]


@dataclass(frozen=True)
class LayerCosts:
    """Per layer and menu config: true bits and the proxy error.

    `bits` and `error` are [n_layers, n_configs]: bits of the layer's matrix,
    and KL (nats/token) of the model with only that layer quantized.
    """

    layers: tuple[str, ...]
    menu: tuple[LayerConfig, ...]
    n_weights: int  # of all block linear layers
    bits: np.ndarray
    error: np.ndarray

    def predicted(self, choice: Sequence[int]) -> float:
        """The additive proxy's KL for one choice (a menu index per layer)."""
        return float(self.error[np.arange(len(self.layers)), list(choice)].sum())

    def bpw(self, choice: Sequence[int]) -> float:
        return float(self.bits[np.arange(len(self.layers)), list(choice)].sum()) / self.n_weights

    def strategy(self, choice: Sequence[int], name: str = "") -> Strategy:
        layers = {layer: self.menu[c] for layer, c in zip(self.layers, choice, strict=True)}
        return Strategy(layers=layers, name=name)

    def merged(self, groups: Mapping[str, Sequence[str]]) -> LayerCosts:
        """Costs of groups of layers that share one config (a search space's gene groups):
        bits and errors summed over each group's layers; `layers` become the group names."""
        row = {layer: i for i, layer in enumerate(self.layers)}
        rows = [[row[layer] for layer in members] for members in groups.values()]
        return LayerCosts(
            tuple(groups),
            self.menu,
            self.n_weights,
            np.stack([self.bits[r].sum(0) for r in rows]),
            np.stack([self.error[r].sum(0) for r in rows]),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what a study stores)."""
        return {
            "layers": list(self.layers),
            "menu": [c.to_dict() for c in self.menu],
            "n_weights": self.n_weights,
            "bits": self.bits.tolist(),
            "error": self.error.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], config_class: type[LayerConfig] = LayerConfig) -> LayerCosts:
        return cls(
            tuple(data["layers"]),
            tuple(config_class.from_dict(c, where="allocator menu") for c in data["menu"]),
            int(data["n_weights"]),
            np.array(data["bits"], dtype=np.int64),
            np.array(data["error"], dtype=np.float64),
        )


def measure_costs(
    evaluator: Evaluator,
    configs: Sequence[LayerConfig],
    windows: int | None = None,
    proxy: str = "kl",
    progress: bool = True,
) -> LayerCosts:
    """Measure every (block linear layer, config) pair on the evaluator's search part
    (its first `windows` windows if given: a cheaper, noisier proxy).

    "kl" costs n_layers x (n_configs - 1) model evaluations (16-bit costs nothing);
    the quantized weights are cached per (layer, config), so a later evaluation of a
    mixture reuses them. "hessian" costs n_layers evaluations and one quantization
    per (layer, config), with the calibration Hessians (collected once).
    """
    if proxy not in PROXIES:
        raise QoptError(f"unknown allocator proxy {proxy!r}: choose one of {', '.join(PROXIES)}")
    units = [u for u in evaluator.lm.units if u.role not in EDGE_ROLES]
    bits = np.array([[layer_cost(u.out_features, u.in_features, c).total for c in configs] for u in units])
    n_weights = sum(u.out_features * u.in_features for u in units)
    measured = _kl_errors if proxy == "kl" else _hessian_errors
    with _quiet(evaluator):
        error = measured(evaluator, units, configs, windows, progress)
    return LayerCosts(tuple(u.name for u in units), tuple(configs), n_weights, bits, error)


def anchor(configs: Sequence[LayerConfig]) -> int:
    """The menu index whose single-layer KL calibrates the "hessian" proxy: a plain
    (round-to-nearest, abs-max, unrotated) config nearest 3 bits (finer scales first), where
    a layer's error is large enough to measure and small enough to stay in KL's quadratic range."""
    quantized = [j for j, c in enumerate(configs) if c.quantizes_weights]
    if not quantized:
        raise QoptError("the allocator's menu has no config that quantizes weights")
    return min(
        quantized,
        key=lambda j: (
            configs[j].rounding != "nearest",
            configs[j].scale != "absmax" or configs[j].outliers != "none",
            abs(configs[j].bits - 3),
            configs[j].granularity != "group",
        ),
    )


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W_hat - W) H (W_hat - W)^T): the layer's squared output error summed over its
    outputs, per token (H = X^T X / n_tokens, [in, in]; W, W_hat [out, in])."""
    d = (w_hat - w).double()
    return float(((d @ hessian.double()) * d).sum())


def layer_output_errors(name: str, w: torch.Tensor, configs: _Menu, stats: ActivationStats) -> np.ndarray:
    """`output_error` of layer `name`'s weight `w` [out, in] quantized in each of `configs`
    (0 where a config leaves it 16-bit), with the calibration `stats`, its Hessians included:
    the "hessian" proxy's per-layer work before its KL scaling. Shape [len(configs)]."""
    assert stats.hessian is not None
    hessian = stats.hessian[name].to(w.device)
    errors = np.zeros(len(configs))
    for j, config in enumerate(configs):
        if config.quantizes_weights:
            stored, transform = quantize_unit(name, w, config, stats, seed=0)
            assert stored is not None
            errors[j] = output_error(w, to_original_basis(stored.values, transform), hessian)
    return errors


def _kl_errors(evaluator: Evaluator, units: _Units, configs: _Menu, windows: int | None, progress: bool) -> np.ndarray:
    evaluator.quantizer.prepare([{u.name: c for u in units} for c in configs])  # calibration once, if needed
    error = np.zeros((len(units), len(configs)))
    jobs = [(i, j) for i in range(len(units)) for j, c in enumerate(configs) if c.quantizes_weights]
    for i, j in tqdm(jobs, desc="layer sensitivity", disable=not progress):
        error[i, j] = _single_layer_kl(evaluator, units[i], configs[j], windows)
    return error


def _hessian_errors(
    evaluator: Evaluator, units: _Units, configs: _Menu, windows: int | None, progress: bool
) -> np.ndarray:
    stats = evaluator.quantizer.activation_stats(hessians=True)
    assert stats.hessian is not None
    pivot = anchor(configs)
    error = np.zeros((len(units), len(configs)))
    for i, unit in enumerate(tqdm(units, desc="layer sensitivity (Hessian proxy)", disable=not progress)):
        error[i] = layer_output_errors(unit.name, unit.read_weight().float(), configs, stats)
        kl = _single_layer_kl(evaluator, unit, configs[pivot], windows)
        error[i] *= kl / error[i, pivot] if error[i, pivot] > 0 else 0.0
    return error


def _single_layer_kl(evaluator: Evaluator, unit: QuantUnit, config: LayerConfig, windows: int | None) -> float:
    """Search-part KL (nats/token) with only `unit` quantized as `config` (floored at 0)."""
    return max(evaluator.evaluate(Strategy(layers={unit.name: config}), "search", windows=windows).kl, 0.0)


def solve(bits: np.ndarray, error: np.ndarray, budget_bits: int, resolution: int = 20_000) -> list[int]:
    """The choice (one column per row) of least total `error` whose total `bits` is at most
    `budget_bits`: a multiple-choice knapsack solved by dynamic programming.

    Costs are counted in steps of ceil(budget_bits / resolution) bits, each rounded
    up, so the answer always fits; it is exact when every cost is a whole number of
    steps (e.g. budget_bits <= resolution). Raises `QoptError` if nothing fits.
    """
    n_rows, _ = bits.shape
    step = max(1, -(-budget_bits // resolution))
    capacity = budget_bits // step
    weight = -(-bits.astype(np.int64) // step)
    best = np.full(capacity + 1, np.inf)  # least error using exactly this many steps
    best[0] = 0.0
    picked = np.full((n_rows, capacity + 1), -1, dtype=np.int32)
    for row in range(n_rows):
        new = np.full(capacity + 1, np.inf)
        for col in np.argsort(error[row], kind="stable"):
            w = int(weight[row, col])
            if w > capacity:
                continue
            candidate = best[: capacity + 1 - w] + error[row, col]
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            picked[row, w:][better] = col
        best = new
    if not np.isfinite(best).any():
        raise QoptError(f"no choice fits {budget_bits} bits: the budget is below the cheapest config of every layer")
    used = int(np.argmin(best))
    choice = [0] * n_rows
    for row in reversed(range(n_rows)):
        col = int(picked[row, used])
        choice[row] = col
        used -= int(weight[row, col])
    return choice


def allocate(costs: LayerCosts, budget_bpw: float) -> Strategy:
    """The menu choice per layer with the least predicted KL at <= `budget_bpw` true bits per weight."""
    choice = solve(costs.bits, costs.error, int(budget_bpw * costs.n_weights))
    return costs.strategy(choice, name=f"Allocator {budget_bpw:g} bpw")


def proxy_fit(
    evaluator: Evaluator, costs: LayerCosts, n_samples: int = 20, seed: int = 0, progress: bool = True
) -> tuple[float, list[tuple[float, float]]]:
    """Spearman rank correlation between the additive proxy and the measured KL (search
    part) over `n_samples` random mixtures of quantized menu configs; and the
    (predicted, measured) pairs."""
    rng = np.random.default_rng(seed)
    quantized = [j for j, c in enumerate(costs.menu) if c.quantizes_weights]
    pairs = []
    with _quiet(evaluator):
        for _ in tqdm(range(n_samples), desc="checking the proxy", disable=not progress):
            choice = [int(rng.choice(quantized)) for _ in costs.layers]
            measured = evaluator.evaluate(costs.strategy(choice), "search").kl
            pairs.append((costs.predicted(choice), measured))
    predicted, measured = (np.array(v) for v in zip(*pairs, strict=True))
    return _spearman(predicted, measured), pairs


@contextmanager
def _quiet(evaluator: Evaluator) -> Iterator[None]:
    """No per-evaluation progress bars inside the allocator's own."""
    shown, evaluator.progress = evaluator.progress, False
    try:
        yield
    finally:
        evaluator.progress = shown


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
