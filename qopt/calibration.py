"""Statistics of the unquantized model's activations on calibration text.

SmoothQuant-style smoothing needs each linear layer's per-input-channel
abs-max. They are collected once per model and calibration windows (the search
part of the data, never the evaluation part).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qopt.model import LoadedModel


@dataclass(frozen=True)
class ActivationStats:
    """Per-layer input statistics: `absmax[name]` is [in_features] fp32."""

    absmax: dict[str, torch.Tensor]
    n_tokens: int


def collect_activation_stats(lm: LoadedModel, windows: torch.Tensor, batch_size: int = 8) -> ActivationStats:
    """Run the model (as it currently is: call with no strategy applied) over
    `windows` ([n, seq_len] token ids) and record each matmul unit's input abs-max."""
    absmax: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].detach()
            seen = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen

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
    return ActivationStats(absmax={k: v.cpu() for k, v in absmax.items()}, n_tokens=windows.numel())
