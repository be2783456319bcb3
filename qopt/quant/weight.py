"""One weight matrix, quantized as a `WeightQuantization` says (plain values, no genes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qopt.quant.awq import awq_scale
from qopt.quant.gptq import gptq_quantize
from qopt.quant.grid import QuantGrid, WeightQuantization
from qopt.quant.hqq import hqq_grid, quantize_on_grid
from qopt.quant.outliers import InputTransform, rotation_matrix, smoothing_factors, topk_mask
from qopt.quant.scales import block_range, from_blocks, grid_codes, grid_params, quantize_in_range, to_blocks


def input_transform(
    recipe: WeightQuantization,
    w: torch.Tensor,
    act_absmax: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> InputTransform | None:
    """The transform of the input dimension `recipe` asks for, if any.

    `w` is the pristine [out, in] weight. Smoothing needs `act_absmax` ([in],
    the calibration activations' per-channel abs-max); AWQ scaling (rounding:
    awq) needs `hessian` ([in, in], X^T X / n) and is searched here, on top of
    any smoothing or rotation.
    """
    smooth = rotation = None
    if recipe.smooth_alpha is not None:
        if act_absmax is None:
            raise ValueError("smoothing needs activation statistics from calibration data")
        smooth = smoothing_factors(act_absmax.to(w.device), w, recipe.smooth_alpha)
    elif recipe.rotate:
        rotation = rotation_matrix(w.shape[1]).to(w.device)
    transform = InputTransform(smooth=smooth, rotation=rotation)
    grid = recipe.grid
    if recipe.rounding == "awq" and grid is not None:
        if hessian is None:
            raise ValueError("AWQ needs the layer's input Hessian from calibration data")
        basis_w = transform.weight_forward(w.float())
        basis_h = transform.hessian_forward(hessian.to(w.device))

        def scaled(s: torch.Tensor) -> torch.Tensor:
            return quantize_matrix(basis_w * s, grid, keep_fraction=recipe.keep_fraction).values / s

        transform = InputTransform(smooth=smooth, rotation=rotation, scale=awq_scale(basis_w, basis_h, scaled))
    if smooth is None and rotation is None and transform.scale is None:
        return None
    return transform


def fake_quantize_weight(
    w: torch.Tensor,
    recipe: WeightQuantization,
    transform: InputTransform | None = None,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Simulate storing `w` ([out, in]) as `recipe` says; returns the fp32 weight the
    quantized model computes with (`quantize_weight`, then back to the original
    basis). A recipe without a grid (16-bit) returns `w` unchanged.
    """
    if recipe.grid is None:
        return w
    return to_original_basis(quantize_weight(w, recipe, transform, generator, hessian).values, transform)


def to_original_basis(w: torch.Tensor, transform: InputTransform | None) -> torch.Tensor:
    """An [out, in] weight in the transformed basis, mapped back to the layer's own."""
    return transform.weight_inverse(w) if transform is not None else w


def quantize_weight(
    w: torch.Tensor,
    recipe: WeightQuantization,
    transform: InputTransform | None = None,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedMatrix:
    """`w` ([out, in]) as stored: in the transformed basis, what `quantize_matrix` keeps.

    Order: input transform (smoothing, rotation, AWQ scale) -> top-k outliers
    set aside in fp16 -> rounding (nearest, stochastic, HQQ per block; GPTQ
    column by column with `hessian`, [in, in], given in the untransformed basis).
    """
    assert recipe.grid is not None, "a 16-bit matrix is not quantized"
    w = w.float()
    if transform is not None:
        w = transform.weight_forward(w)
        if hessian is not None:
            hessian = transform.hessian_forward(hessian.to(w.device))
    return quantize_matrix(w, recipe.grid, recipe.rounding, recipe.keep_fraction, generator, hessian)


@dataclass(frozen=True)
class QuantizedMatrix:
    """An [out, in] matrix as quantized, in the basis it was quantized in: what is stored.

    `values`: the dequantized fp32 weights (kept outliers as their fp16 values);
    `scale`, `zero`: each block's grid ([n_blocks, 1], fp16-valued; `zero` None
    for symmetric and float grids); `kept`: [out, in] bool mask of outliers, or
    None; `grid`: the grid the values lie on. The evaluator reads `values`, the
    exporters `codes()`, `scale`, `zero` and the kept outliers.
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    kept: torch.Tensor | None
    grid: QuantGrid

    def codes(self) -> torch.Tensor:
        """The [out, in] unsigned integer codes (int64, in [0, 2^bits)); kept outliers get code 0."""
        on_grid = self.values if self.kept is None else self.values.masked_fill(self.kept, float("nan"))
        blocks = to_blocks(on_grid, self.grid.granularity, self.grid.group_size)
        return from_blocks(grid_codes(blocks, self.scale, self.zero, self.grid), self.values.shape)

    def outliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept outliers' flat indices (int64, ascending) and fp16 values (empty if none)."""
        if self.kept is None:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float16)
        index = self.kept.reshape(-1).nonzero().reshape(-1)
        return index, self.values.reshape(-1)[index].half()


def quantize_matrix(
    w: torch.Tensor,
    grid: QuantGrid,
    rounding: str = "nearest",
    keep_fraction: float | None = None,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedMatrix:
    """Quantize [out, in] `w` onto `grid` in the basis it is given in (outliers, blocks, rounding).

    `rounding` "awq" rounds to nearest here: AWQ's part is its input transform.
    """
    kept = topk_mask(w, keep_fraction) if keep_fraction is not None else None
    if rounding == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian from calibration data")
        values, lo, hi = gptq_quantize(w, hessian, grid, kept)
        return QuantizedMatrix(values, *grid_params(lo, hi, grid), kept, grid)
    to_quantize = w.masked_fill(kept, float("nan")) if kept is not None else w
    blocks = to_blocks(to_quantize, grid.granularity, grid.group_size)
    lo, hi = block_range(blocks, grid)
    if rounding == "hqq":
        scale, zero = hqq_grid(blocks, lo, hi, grid)
        blocks = quantize_on_grid(blocks, scale, zero, grid)
    else:
        scale, zero = grid_params(lo, hi, grid)
        blocks = quantize_in_range(blocks, lo, hi, grid, rounding == "stochastic", generator)
    values = from_blocks(blocks, w.shape)
    if kept is not None:
        values = torch.where(kept, w.half().float(), values)
    return QuantizedMatrix(values, scale, zero, kept, grid)
