"""Outlier handling: keep the largest weights in 16 bits, migrate activation
outliers into the weights (SmoothQuant), or rotate the input dimension.

Smoothing and rotation (and AWQ's scaling, see `qopt.quant.awq`) are *input
transforms*: an invertible map T on the layer's input dimension with
x' = T(x), w' = w T^{-T}, so x' w'^T = x w^T. The weight is quantized in the
transformed space; activations, when quantized, are too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def outlier_count(numel: int, fraction: float) -> int:
    """How many weights a top-k policy keeps in 16 bits (at least one)."""
    return max(1, math.ceil(numel * fraction))


def topk_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (shape of `w`) of its `fraction` largest-magnitude entries."""
    k = outlier_count(w.numel(), fraction)
    idx = w.abs().flatten().topk(k).indices
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[idx] = True
    return mask.view_as(w)


@dataclass(frozen=True)
class InputTransform:
    """x' = ((x / smooth) @ rotation) / scale; any part may be absent.

    `smooth` (SmoothQuant) and `scale` (AWQ) are [in], stored in fp16 and so
    counted as side data; `rotation` is an orthogonal [in, in] matrix that is
    regenerated, never stored.
    """

    smooth: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def weight_forward(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] weight into the transformed space."""
        if self.smooth is not None:
            w = w * self.smooth
        if self.rotation is not None:
            w = w @ self.rotation
        if self.scale is not None:
            w = w * self.scale
        return w

    def weight_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            w = w / self.scale
        if self.rotation is not None:
            w = w @ self.rotation.T
        if self.smooth is not None:
            w = w / self.smooth
        return w

    def input_forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] activations into the transformed space."""
        if self.smooth is not None:
            x = x / self.smooth
        if self.rotation is not None:
            x = x @ self.rotation
        if self.scale is not None:
            x = x / self.scale
        return x

    def hessian_forward(self, hessian: torch.Tensor) -> torch.Tensor:
        """The input second moment X^T X / n ([in, in]) in the transformed space: M^T H M, M = T(I)."""
        m = self.input_forward(torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype))
        return m.T @ hessian @ m


def smoothing_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s_j = max|X_j|^a / max|W_j|^(1-a).

    `act_absmax` is [in] (from calibration), `w` is [out, in]. Rounded to fp16
    because that is how they are stored.
    """
    w_absmax = w.abs().amax(dim=0).clamp(min=1e-5)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4).to(torch.float16).to(w.dtype)


@lru_cache(maxsize=32)
def rotation_matrix(n: int) -> torch.Tensor:
    """An orthogonal [n, n] rotation that spreads outliers across the input dim.

    n = 2^k * m with m odd: the normalised Sylvester Hadamard of size 2^k,
    Kronecker the orthonormal DCT-II of size m, so dimensions like 172 = 4 * 43
    are fully mixed too. Deterministic, so nothing is stored.
    """
    power = n & -n
    odd = n // power
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < power:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    hadamard = hadamard / math.sqrt(power)
    if odd == 1:
        return hadamard.float()
    k = torch.arange(odd, dtype=torch.float64)[:, None]
    i = torch.arange(odd, dtype=torch.float64)[None, :]
    dct = torch.cos(math.pi * (i + 0.5) * k / odd) * math.sqrt(2.0 / odd)
    dct[0] /= math.sqrt(2.0)
    return torch.kron(hadamard, dct.T.contiguous()).float()
