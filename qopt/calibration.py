"""Statistics of the unquantized model's activations on calibration text.

SmoothQuant-style smoothing needs each linear layer's per-input-channel
abs-max; GPTQ and AWQ need its input second moment H = X^T X / n (the
"Hessian" of the layer-output error). They are collected once per model and
calibration windows (the search part of the data, never the evaluation part)
and shared by every strategy a worker judges.

Hessians are large (in_features^2 fp32 per layer: 0.5 GiB for SmolLM2-135M,
about 6 GiB for a 1B model), so they are streamed: the layers are cut into
groups whose Hessians fit `max_bytes`, each group is collected in its own pass
over the calibration windows and written to a safetensors file, and a layer's
Hessian is read back from disk when a strategy quantizes that layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qopt.model import HeadInput, LoadedModel, QuantUnit

#: Hessian bytes one collection pass may hold, unless the caller says otherwise.
DEFAULT_HESSIAN_BYTES = 1024 * 2**20


class HessianFiles(Mapping[str, torch.Tensor]):
    """Per-layer Hessians in safetensors files of one folder, read one layer at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[str, Path] = {}
        for path in sorted(folder.glob("hessian-*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                self._where.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass(frozen=True)
class ActivationStats:
    """Per-layer input statistics over `n_tokens` calibration tokens.

    `absmax[name]` is [in_features] fp32; `hessian[name]` is [in_features,
    in_features] fp32 (X^T X / n_tokens), in memory or read from disk on
    access, or `hessian` is None when not collected. `peak_hessian_bytes` is
    the most Hessian memory the collection held at once.
    """

    absmax: dict[str, torch.Tensor]
    n_tokens: int
    hessian: Mapping[str, torch.Tensor] | None = None
    peak_hessian_bytes: int = 0


def collect_activation_stats(
    lm: LoadedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    hessians: bool = False,
    folder: Path | None = None,
    max_bytes: int = DEFAULT_HESSIAN_BYTES,
) -> ActivationStats:
    """Run the model (as it currently is: call with no strategy applied) over
    `windows` ([n, seq_len] token ids) and record each matmul unit's input
    abs-max, and with `hessians` its X^T X / n.

    With a `folder`, Hessians are collected in passes over groups of layers
    holding at most `max_bytes` (one layer per pass if a layer alone is
    larger), each group written to `folder` as it completes; without one, in a
    single pass, kept in memory.
    """
    units = [u for u in lm.units if not u.is_embedding]
    groups = _groups(units, max_bytes) if hessians and folder is not None else [units]
    absmax: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    peak = 0
    for index, group in enumerate(groups):
        gram = _one_pass(lm, windows, batch_size, group if hessians else [], absmax if index == 0 else None)
        peak = max(peak, sum(h.numel() * h.element_size() for h in gram.values()))
        gram = {name: (h / windows.numel()).cpu() for name, h in gram.items()}
        if folder is None:
            kept.update(gram)
        elif gram:
            save_file(gram, str(folder / f"hessian-{index:04d}.safetensors"))
    stored: Mapping[str, torch.Tensor] | None = None
    if hessians:
        stored = kept if folder is None else HessianFiles(folder)
    return ActivationStats(
        absmax={k: v.cpu() for k, v in absmax.items()},
        n_tokens=windows.numel(),
        hessian=stored,
        peak_hessian_bytes=peak,
    )


def save_absmax(stats: ActivationStats, folder: Path) -> None:
    """Write the abs-maxes and token count beside the Hessian files of `folder`."""
    save_file(stats.absmax, str(folder / "absmax.safetensors"))
    meta = {"n_tokens": stats.n_tokens, "hessians": stats.hessian is not None, "peak": stats.peak_hessian_bytes}
    (folder / "stats.json").write_text(json.dumps(meta))


def load_stats(folder: Path) -> ActivationStats:
    """The statistics `collect_activation_stats(..., folder=folder)` and `save_absmax` wrote."""
    meta = json.loads((folder / "stats.json").read_text())
    with safe_open(str(folder / "absmax.safetensors"), framework="pt") as handle:
        absmax = {name: handle.get_tensor(name) for name in handle.keys()}
    hessian = HessianFiles(folder) if meta["hessians"] else None
    return ActivationStats(absmax, meta["n_tokens"], hessian, meta.get("peak", 0))


def hessian_bytes(unit: QuantUnit) -> int:
    """Bytes of one layer's fp32 Hessian."""
    return 4 * unit.in_features**2


def _groups(units: Sequence[QuantUnit], max_bytes: int) -> list[list[QuantUnit]]:
    """Consecutive units, cut so each group's Hessians take at most `max_bytes`."""
    groups: list[list[QuantUnit]] = [[]]
    held = 0
    for unit in units:
        size = hessian_bytes(unit)
        if groups[-1] and held + size > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(unit)
        held += size
    return groups


def _one_pass(
    lm: LoadedModel,
    windows: torch.Tensor,
    batch_size: int,
    hessian_units: Sequence[QuantUnit],
    absmax: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """One pass over the windows: X^T X summed for `hessian_units`, and (if `absmax` is
    given) every unit's input abs-max recorded into it."""
    gram: dict[str, torch.Tensor] = {}
    wanted = {u.name for u in hessian_units}

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if absmax is not None:
                seen = x.abs().amax(dim=0)
                absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
            if name in wanted:
                if name in gram:
                    gram[name].add_(x.T @ x)
                else:
                    gram[name] = x.T @ x

        return hook

    handles = [
        u.module.register_forward_pre_hook(recorder(u.name))
        for u in lm.units
        if not u.is_embedding and (absmax is not None or u.name in wanted)
    ]
    try:
        # Registered after the recorders, so an untied head's own input is still recorded in full.
        with torch.inference_mode(), HeadInput(lm.model):
            for start in range(0, len(windows), batch_size):
                lm.model(input_ids=windows[start : start + batch_size].to(lm.device))
    finally:
        for handle in handles:
            handle.remove()
    return gram
