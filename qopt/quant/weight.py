"""One weight matrix, fake-quantized as a LayerConfig says."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qopt.quant.awq import awq_scale
from qopt.quant.gptq import gptq_quantize
from qopt.quant.hqq import hqq_grid, quantize_on_grid
from qopt.quant.outliers import InputTransform, rotation_matrix, smoothing_factors, topk_mask
from qopt.quant.scales import block_range, from_blocks, grid_params, quantize_in_range, to_blocks
from qopt.strategy import LayerConfig


def input_transform(
    config: LayerConfig,
    w: torch.Tensor,
    act_absmax: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> InputTransform | None:
    """The transform of the input dimension a config asks for, if any.

    `w` is the pristine [out, in] weight. Smoothing needs `act_absmax` ([in],
    the calibration activations' per-channel abs-max); AWQ scaling (rounding:
    awq) needs `hessian` ([in, in], X^T X / n) and is searched here, on top of
    any smoothing or rotation.
    """
    smooth = rotation = None
    if config.outliers == "smooth":
        if act_absmax is None:
            raise ValueError("smoothing needs activation statistics from calibration data")
        assert config.smooth_alpha is not None
        smooth = smoothing_factors(act_absmax.to(w.device), w, config.smooth_alpha)
    elif config.outliers == "rotate":
        rotation = rotation_matrix(w.shape[1]).to(w.device)
    transform = InputTransform(smooth=smooth, rotation=rotation)
    if config.rounding == "awq" and config.quantizes_weights:
        if hessian is None:
            raise ValueError("AWQ needs the layer's input Hessian from calibration data")
        basis_w = transform.weight_forward(w.float())
        basis_h = transform.hessian_forward(hessian.to(w.device))
        scale = awq_scale(basis_w, basis_h, lambda s: quantize_matrix(basis_w * s, config).values / s)
        transform = InputTransform(smooth=smooth, rotation=rotation, scale=scale)
    if smooth is None and rotation is None and transform.scale is None:
        return None
    return transform


def fake_quantize_weight(
    w: torch.Tensor,
    config: LayerConfig,
    transform: InputTransform | None = None,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Simulate storing `w` ([out, in]) as `config` says; returns the fp32 weight the
    quantized model computes with (`quantize_weight`, then back to the original
    basis). A 16-bit config returns `w` unchanged.
    """
    if not config.quantizes_weights:
        return w
    return to_original_basis(quantize_weight(w, config, transform, generator, hessian).values, transform)


def to_original_basis(w: torch.Tensor, transform: InputTransform | None) -> torch.Tensor:
    """An [out, in] weight in the transformed basis, mapped back to the layer's own."""
    return transform.weight_inverse(w) if transform is not None else w


def quantize_weight(
    w: torch.Tensor,
    config: LayerConfig,
    transform: InputTransform | None = None,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedMatrix:
    """`w` ([out, in]) as stored: in the transformed basis, what `quantize_matrix` keeps.

    Order: input transform (smoothing, rotation, AWQ scale) -> top-k outliers
    set aside in fp16 -> rounding (nearest, stochastic, HQQ per block; GPTQ
    column by column with `hessian`, [in, in], given in the untransformed basis).
    """
    w = w.float()
    if transform is not None:
        w = transform.weight_forward(w)
        if hessian is not None:
            hessian = transform.hessian_forward(hessian.to(w.device))
    return quantize_matrix(w, config, generator, hessian)


@dataclass(frozen=True)
class QuantizedMatrix:
    """An [out, in] matrix as quantized, in the basis it was quantized in.

    `values`: the dequantized fp32 weights (kept outliers as their fp16 values);
    `scale`, `zero`: each block's grid ([n_blocks, 1], fp16-valued; `zero` None
    for symmetric and float grids); `kept`: [out, in] bool mask of outliers, or None.
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    kept: torch.Tensor | None


def quantize_matrix(
    w: torch.Tensor,
    config: LayerConfig,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedMatrix:
    """Quantize [out, in] `w` in the basis it is given in (outliers, blocks, rounding)."""
    kept = topk_mask(w, config.topk_fraction) if config.topk_fraction is not None else None
    if config.rounding == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian from calibration data")
        values, lo, hi = gptq_quantize(w, hessian, config, kept)
        return QuantizedMatrix(values, *grid_params(lo, hi, config), kept)
    to_quantize = w.masked_fill(kept, float("nan")) if kept is not None else w
    blocks = to_blocks(to_quantize, config.granularity, config.group_size)
    lo, hi = block_range(blocks, config)
    if config.rounding == "hqq":
        scale, zero = hqq_grid(blocks, lo, hi, config)
        blocks = quantize_on_grid(blocks, scale, zero, config)
    else:
        scale, zero = grid_params(lo, hi, config)
        blocks = quantize_in_range(blocks, lo, hi, config, config.rounding == "stochastic", generator)
    values = from_blocks(blocks, w.shape)
    if kept is not None:
        values = torch.where(kept, w.half().float(), values)
    return QuantizedMatrix(values, scale, zero, kept)
