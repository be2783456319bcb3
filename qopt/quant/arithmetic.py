"""Approximate arithmetic: dynamic activation quantization and low-precision
accumulation, emulated in fp32."""

from __future__ import annotations

import torch

from qopt.quant.formats import E4M3_MAX, e4m3_round

#: K-chunk width whose partial sums are rounded to the accumulator precision.
ACCUMULATION_CHUNK = 64
_ACC_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def fake_quantize_activations(x: torch.Tensor, act_format: str, act_bits: int) -> torch.Tensor:
    """Dynamic per-token symmetric quantization of x [..., in]; returns dequantized fp32."""
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    if act_format == "int":
        qmax = 2 ** (act_bits - 1) - 1
        scale = absmax / qmax
        return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale
    if act_format == "fp":
        scale = absmax / E4M3_MAX
        return e4m3_round(x / scale) * scale
    raise ValueError(f"unknown activation format {act_format!r}")


def lowprec_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, accumulation: str, chunk: int = ACCUMULATION_CHUNK
) -> torch.Tensor:
    """y = x w^T + b with partial sums kept in fp16/bf16.

    x is [..., K], w is [N, K]. Each K-chunk's dot products are computed in
    fp32 and rounded to the accumulator type, then added to an accumulator that
    is itself rounded after every addition, as a low-precision MAC unit would.
    """
    dtype = _ACC_DTYPES[accumulation]
    k = x.shape[-1]
    acc = None
    for start in range(0, k, chunk):
        part = (x[..., start : start + chunk] @ w[:, start : start + chunk].T).to(dtype)
        acc = part if acc is None else (acc.float() + part.float()).to(dtype)
    assert acc is not None
    y = acc.float()
    return y if bias is None else y + bias
