"""AWQ: activation-aware per-input-channel scaling before rounding.

Lin et al. (2024), "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration". Weights of input channels that carry large
activations matter more; scaling such a column up by s (and its input down
by s) before quantizing shrinks its relative rounding error. The scale is
s = a^alpha, with a the per-channel activation magnitude, alpha chosen on a
grid of 20 by the layer's output error on calibration data, as in the
reference's `auto_scale`. Two differences, both so that one cached Hessian
serves every strategy: a is the channel's RMS, sqrt(diag(X^T X / n)), where
the reference uses mean |x| (the RMS is known in any smoothed or rotated
basis); and the output error ||X (W - W_hat)^T||^2 is computed as
tr(D H D^T) from the Hessian, not by re-running the layer. alpha = 0 is plain
round-to-nearest, so the search never does worse than it on that error. The
reference searches one scale per group of layers sharing an input and folds it
into the preceding norm; qopt searches one per layer and stores it (16 bits
per input channel, counted in `qopt.bits`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GRID = 20


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Squared layer-output error per calibration token: tr((W - W_hat) H (W - W_hat)^T)."""
    d = w - w_hat
    return float(((d @ hessian) * d).sum())


def awq_scale(
    w: torch.Tensor,
    hessian: torch.Tensor,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    grid: int = GRID,
) -> torch.Tensor:
    """The per-input-channel scale s ([in], fp16-representable) with the least output error.

    `w` is [out, in], `hessian` [in, in] in the same basis; `quantize(s)` returns
    the fake-quantized weight computed with scale s, in the basis of `w`
    (i.e. Q(w * s) / s).
    """
    rms = torch.diag(hessian).clamp_min(1e-8).sqrt()
    best_scale, best_error = torch.ones_like(rms), float("inf")
    for k in range(grid):
        s = rms.pow(k / grid)
        s = (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4).half().float()
        error = output_error(w, quantize(s), hessian)
        if error < best_error:
            best_scale, best_error = s, error
    return best_scale
