"""Statistics of the unquantized model's activations on calibration text.

SmoothQuant-style smoothing needs each linear layer's per-input-channel
abs-max; GPTQ and AWQ need its input second moment H = X^T X / n (the
"Hessian" of the layer-output error). They are collected once per model and
calibration windows (the search part of the data, never the evaluation part)
and shared by every strategy a worker judges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qopt.model import LoadedModel


@dataclass(frozen=True)
class ActivationStats:
    """Per-layer input statistics over `n_tokens` calibration tokens.

    `absmax[name]` is [in_features] fp32; `hessian[name]` is [in_features,
    in_features] fp32 (X^T X / n_tokens), or `hessian` is None when not collected.
    """

    absmax: dict[str, torch.Tensor]
    n_tokens: int
    hessian: dict[str, torch.Tensor] | None = None


def collect_activation_stats(
    lm: LoadedModel, windows: torch.Tensor, batch_size: int = 8, hessians: bool = False
) -> ActivationStats:
    """Run the model (as it currently is: call with no strategy applied) over
    `windows` ([n, seq_len] token ids) and record each matmul unit's input
    abs-max, and with `hessians` its X^T X / n."""
    absmax: dict[str, torch.Tensor] = {}
    gram: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            seen = x.abs().amax(dim=0)
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
            if hessians:
                gram[name] = gram[name] + x.T @ x if name in gram else x.T @ x

        return hook

    for unit in lm.units:
        if not unit.is_embedding:
            handles.append(unit.module.register_forward_pre_hook(recorder(unit.name)))
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                lm.model(input_ids=windows[start : start + batch_size].to(lm.device))
    finally:
        for handle in handles:
            handle.remove()
    n_tokens = windows.numel()
    return ActivationStats(
        absmax={k: v.cpu() for k, v in absmax.items()},
        n_tokens=n_tokens,
        hessian={k: (v / n_tokens).cpu() for k, v in gram.items()} if hessians else None,
    )
