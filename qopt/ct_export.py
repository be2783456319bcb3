"""A strategy as a compressed-tensors checkpoint (vLLM, transformers), holding qopt's own codes.

compressed-tensors describes a quantized model in `config.json`'s
`quantization_config`: `config_groups`, each a scheme (INT bits, `tensor` /
`channel` / `group` strategy with a group size, symmetric or not) with the
modules it `targets`. qopt writes one group per distinct layer config, each
targeting its modules by exact name, and lets the `compressed-tensors` package
do the packing: every module gets qopt's dequantized weights with qopt's own
scales (and zero points), so the package's rounding to that grid recovers
exactly the codes qopt chose (GPTQ's, HQQ's...), and `from_pretrained` gives
back the weights qopt evaluated.

Symmetric schemes are `pack-quantized` (codes packed into int32, what vLLM's
W4A16/W8A16 kernels read). Asymmetric ones are written `int-quantized` (one
int8 per code): transformers 5.24 with compressed-tensors 0.20.1 cannot load
the packed zero points `pack-quantized` writes (the loader's placeholder keeps
them unpacked: a size mismatch), so the file is larger than the true bits say
for those layers. Configs beyond these schemes (float grids, outliers, input
transforms, activation quantization, AWQ's input scaling, non-integer zero
points) are refused, naming the layers. vLLM fuses q/k/v and gate/up into one
matrix and needs one scheme for each fused set; `fused_mismatches` names the
sets a strategy breaks (`search.fused_groups: auto` ties their genes).

Needs the `compressed-tensors` extra (`pip install 'qopt[compressed-tensors]'`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qopt.errors import QoptError, listing
from qopt.gguf_export import STORABLE_ROUNDINGS
from qopt.model import QuantUnit
from qopt.space import FUSED_ROLES
from qopt.strategy import EDGE_ROLES, LayerConfig

_PLAIN = {"format": "int", "outliers": "none", "act_format": "none", "accumulation": "fp32"}


def scheme_args(config: LayerConfig, in_features: int) -> tuple[dict[str, Any] | None, list[str]]:
    """compressed-tensors `QuantizationArgs` fields for `config` (None for 16 bits), and the
    reasons no scheme holds it exactly (empty when one does)."""
    if not config.quantizes_weights:
        return None, []
    reasons = [f"{k} {getattr(config, k)} (needs {v})" for k, v in _PLAIN.items() if getattr(config, k) != v]
    if config.rounding not in STORABLE_ROUNDINGS:
        reasons.append(f"rounding {config.rounding} (its input scaling has no place in the checkpoint)")
    if config.granularity == "group" and in_features % (config.group_size or 1):
        reasons.append(f"{in_features} inputs (not a multiple of group size {config.group_size})")
    return (None if reasons else _args(config)), reasons


def _args(config: LayerConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": config.bits, "type": "int", "symmetric": bool(config.symmetric)}
    args["strategy"] = config.granularity
    if config.granularity == "group":
        args["group_size"] = config.group_size
    return args


def offenders(units: list[QuantUnit], plan: Mapping[str, LayerConfig]) -> list[str]:
    """One line per block matrix no compressed-tensors scheme holds exactly."""
    lines = []
    for unit in _block_units(units, plan):
        _, reasons = scheme_args(plan[unit.name], unit.in_features)
        if reasons:
            lines.append(f"{unit.name} ({plan[unit.name].describe()}): {'; '.join(reasons)}")
    return lines


def fused_mismatches(units: list[QuantUnit], plan: Mapping[str, LayerConfig]) -> list[str]:
    """One line per set of layers vLLM fuses (a block's q/k/v, gate/up) whose configs differ."""
    sets: dict[tuple[str, tuple[str, ...]], list[QuantUnit]] = {}
    for unit in _block_units(units, plan):
        for roles in FUSED_ROLES:
            if unit.role in roles:
                sets.setdefault((unit.name.rsplit(".", 2)[0], roles), []).append(unit)
    lines = []
    for (block, _), members in sets.items():
        configs = {plan[u.name] for u in members}
        if len(configs) > 1:
            shown = ", ".join(f"{u.name.rsplit('.', 1)[1]} {plan[u.name].describe()}" for u in members)
            lines.append(f"{block}: {shown}")
    return lines


def _block_units(units: list[QuantUnit], plan: Mapping[str, LayerConfig]) -> list[QuantUnit]:
    return [u for u in units if u.name in plan and u.role not in EDGE_ROLES]


def export_compressed_tensors(quantizer, strategy, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write `strategy` applied to the quantizer's model as a compressed-tensors checkpoint
    in `out_dir` (config with `quantization_config`, safetensors, tokenizer). The quantizer's
    own model is not changed (a copy is compressed). Returns a summary: the scheme groups
    (label -> number of layers) and the safetensors bytes."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise QoptError("compressed-tensors export needs: pip install 'qopt[compressed-tensors]'") from None
    from qopt.quantizer import quantize_unit

    lm = quantizer.lm
    plan = quantizer.plan(strategy)
    for problems, what in (
        (offenders(lm.units, plan), "have no compressed-tensors scheme that stores their config exactly"),
        (fused_mismatches(lm.units, plan), "are fused by vLLM but quantized differently (use search.fused_groups)"),
    ):
        if problems:
            raise QoptError(f"{len(problems)} layers {what}:{listing(problems)}")
    quantizer.restore()
    stats = quantizer.prepare([plan])
    stored = {}
    with torch.inference_mode():
        for unit in _block_units(lm.units, plan):
            config = plan[unit.name]
            if config.quantizes_weights:
                stored[unit.name], _ = quantize_unit(unit.name, unit.read_weight().float(), config, stats, seed)
                zero = stored[unit.name].zero
                if zero is not None and not torch.equal(zero, zero.round()):
                    raise QoptError(
                        f"{unit.name}: its zero points are not integers (HQQ); compressed-tensors needs int8"
                    )
    groups: dict[tuple, list[str]] = {}
    for name in stored:
        groups.setdefault(tuple(sorted(_args(plan[name]).items())), []).append(name)
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=[f"re:^{n}$" for n in names],
            weights=QuantizationArgs(**dict(key)),
            format="pack-quantized" if dict(key)["symmetric"] else "int-quantized",
        )
        for i, (key, names) in enumerate(groups.items())
    }
    model = copy.deepcopy(lm.model).float().cpu()
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups), show_progress=False)
    with torch.no_grad():
        for name, matrix in stored.items():
            module = model.get_submodule(name)
            module.weight.copy_(matrix.values.to(module.weight.dtype))
            module.weight_scale.copy_(matrix.scale.reshape(module.weight_scale.shape))
            if matrix.zero is not None:  # qopt's unsigned codes and zero point -> compressed-tensors' signed ones
                offset = 2 ** (matrix.grid.bits - 1)
                module.weight_zero_point.copy_((matrix.zero - offset).reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out_dir)
    labels = {}
    for key, names in groups.items():
        a = dict(key)
        shape = f"g{a['group_size']}" if a["strategy"] == "group" else a["strategy"]
        labels[f"int{a['num_bits']} {shape} {'sym' if a['symmetric'] else 'asym'}"] = len(names)
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"groups": labels, "file_bytes": size}
