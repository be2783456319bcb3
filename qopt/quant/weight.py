"""One weight matrix, fake-quantized as a LayerConfig says."""

from __future__ import annotations

import torch

from qopt.quant.outliers import InputTransform, rotation_matrix, smoothing_factors, topk_mask
from qopt.quant.scales import from_blocks, quantize_blocks, to_blocks
from qopt.strategy import LayerConfig


def input_transform(
    config: LayerConfig, w: torch.Tensor, act_absmax: torch.Tensor | None = None
) -> InputTransform | None:
    """The smoothing or rotation of the input dimension a config asks for, if any.

    `w` is the pristine [out, in] weight; smoothing also needs `act_absmax`
    ([in], the calibration activations' per-channel abs-max).
    """
    if config.outliers == "smooth":
        if act_absmax is None:
            raise ValueError("smoothing needs activation statistics from calibration data")
        assert config.smooth_alpha is not None
        return InputTransform(smooth=smoothing_factors(act_absmax.to(w.device), w, config.smooth_alpha))
    if config.outliers == "rotate":
        return InputTransform(rotation=rotation_matrix(w.shape[1]).to(w.device))
    return None


def fake_quantize_weight(
    w: torch.Tensor,
    config: LayerConfig,
    transform: InputTransform | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simulate storing `w` ([out, in]) as `config` says; returns the fp32 weight the
    quantized model computes with.

    Order: input transform (smoothing or rotation) -> top-k outliers set aside
    in fp16 -> blocks -> scale choice -> rounding -> back to the original basis.
    A 16-bit config returns `w` unchanged.
    """
    if not config.quantizes_weights:
        return w
    w = w.float()
    if transform is not None:
        w = transform.weight_forward(w)
    kept = topk_mask(w, config.topk_fraction) if config.topk_fraction is not None else None
    to_quantize = w.masked_fill(kept, float("nan")) if kept is not None else w
    blocks = quantize_blocks(to_blocks(to_quantize, config.granularity, config.group_size), config, generator)
    w_hat = from_blocks(blocks, w.shape)
    if kept is not None:
        w_hat = torch.where(kept, w.half().float(), w_hat)
    if transform is not None:
        w_hat = transform.weight_inverse(w_hat)
    return w_hat
