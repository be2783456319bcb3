"""One weight matrix, fake-quantized as a LayerConfig says."""

from __future__ import annotations

import torch

from qopt.quant.awq import awq_scale
from qopt.quant.gptq import gptq_quantize
from qopt.quant.hqq import hqq_quantize_in_range
from qopt.quant.outliers import InputTransform, rotation_matrix, smoothing_factors, topk_mask
from qopt.quant.scales import block_range, from_blocks, quantize_blocks, to_blocks
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
        scale = awq_scale(basis_w, basis_h, lambda s: _quantize_matrix(basis_w * s, config) / s)
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
    quantized model computes with.

    Order: input transform (smoothing, rotation, AWQ scale) -> top-k outliers
    set aside in fp16 -> rounding (nearest, stochastic, HQQ per block; GPTQ
    column by column with `hessian`, [in, in], in the untransformed basis) ->
    back to the original basis. A 16-bit config returns `w` unchanged.
    """
    if not config.quantizes_weights:
        return w
    w = w.float()
    if transform is not None:
        w = transform.weight_forward(w)
        if hessian is not None:
            hessian = transform.hessian_forward(hessian.to(w.device))
    w_hat = _quantize_matrix(w, config, generator, hessian)
    if transform is not None:
        w_hat = transform.weight_inverse(w_hat)
    return w_hat


def _quantize_matrix(
    w: torch.Tensor,
    config: LayerConfig,
    generator: torch.Generator | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize [out, in] `w` in the basis it is given in (outliers, blocks, rounding)."""
    kept = topk_mask(w, config.topk_fraction) if config.topk_fraction is not None else None
    if config.rounding == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian from calibration data")
        return gptq_quantize(w, hessian, config, kept)
    to_quantize = w.masked_fill(kept, float("nan")) if kept is not None else w
    blocks = to_blocks(to_quantize, config.granularity, config.group_size)
    if config.rounding == "hqq":
        blocks = hqq_quantize_in_range(blocks, *block_range(blocks, config), config)
    else:
        blocks = quantize_blocks(blocks, config, generator)
    w_hat = from_blocks(blocks, w.shape)
    if kept is not None:
        w_hat = torch.where(kept, w.half().float(), w_hat)
    return w_hat
