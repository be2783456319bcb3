"""Export a strategy as a packed checkpoint, and load one back.

A checkpoint directory holds
- `strategy.yaml`: the strategy, loadable by `Strategy.load`;
- `model.safetensors`: for every weight-quantized matrix, its codes
  bit-packed at the strategy's bit-width (`<name>.codes`, uint8), one fp16
  scale per block (`<name>.scales`), one fp16 zero point per block when
  asymmetric (`<name>.zeros`), kept outliers as fp16 values with their flat
  indices packed at ceil(log2(out*in)) bits (`<name>.outlier_values`,
  `<name>.outlier_index`), and fp16 SmoothQuant / AWQ factors per input
  channel (`<name>.smooth`, `<name>.awq_scale`): exactly what `qopt.bits`
  counts, so these tensors' bytes are the true bits / 8. Rotations are
  regenerated from the size. Every other parameter (16-bit matrices, norms,
  biases) is stored as the model holds it;
- `config.json` and the tokenizer files, so the directory loads like a model;
- `manifest.json`: the source model, the seed, per matrix its shape, config,
  counted bits and stored bytes, and the totals.

Loading decodes every matrix into exactly the weights the fake-quantized
evaluation used (the export checks this bit for bit), so `qopt eval
--checkpoint` reproduces the exported strategy's metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qopt.bits import layer_cost
from qopt.cache import tensor_bytes
from qopt.errors import QoptError
from qopt.model import LoadedModel
from qopt.quant.formats import index_bits
from qopt.quant.outliers import InputTransform, rotation_matrix
from qopt.quant.packing import pack_bits, unpack_bits
from qopt.quant.scales import from_blocks, grid_values, to_blocks
from qopt.quant.weight import QuantizedMatrix, to_original_basis
from qopt.quantizer import Quantizer, quantize_unit
from qopt.strategy import LayerConfig, Strategy

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STRATEGY = "strategy.yaml"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its strategy and manifest, and per weight-quantized module the
    decoded [out, in] weight and input transform the quantized model computes with."""

    strategy: Strategy
    manifest: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, InputTransform | None]]
    plain: dict[str, torch.Tensor]  # every other parameter, by state-dict name


def export_checkpoint(
    quantizer: Quantizer,
    strategy: Strategy,
    out_dir: str | Path,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `strategy` applied to the quantizer's model as a packed checkpoint in `out_dir`.

    `seed` is the stochastic-rounding seed of the evaluation; `source` (e.g. the
    data and evaluation settings) is recorded in the manifest. Returns the
    manifest. Raises `QoptError` if a matrix's packed form would not decode to
    the weight the evaluation uses (a bug, never expected).
    """
    lm = quantizer.lm
    plan = quantizer.plan(strategy)
    quantizer.restore()
    stats = quantizer.prepare([plan])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    units: dict[str, Any] = {}
    packed: set[int] = set()  # ids of the parameters stored packed
    with torch.inference_mode():
        for unit in lm.units:
            config = plan[unit.name]
            if not config.quantizes_weights:
                continue
            w = unit.read_weight().float()
            stored, transform = quantize_unit(unit.name, w, config, stats, seed)
            assert stored is not None
            parts = _pack(stored, transform)
            _check_round_trip(unit.name, parts, config, stored, w.shape)
            tensors.update({f"{unit.name}.{k}": v.contiguous().cpu() for k, v in parts.items()})
            packed.add(id(unit.weight))
            counted = layer_cost(unit.out_features, unit.in_features, config).total
            units[unit.name] = {
                "shape": [unit.out_features, unit.in_features],
                "transposed": unit.transposed,
                "config": config.to_dict(),
                "counted_bits": counted,
                "stored_bytes": tensor_bytes(*parts.values()),
            }
    plain_bytes = 0
    for name, param in _plain_parameters(lm, packed).items():
        tensors[name] = param.detach().contiguous().cpu()
        plain_bytes += tensor_bytes(param)
    save_file(tensors, str(out / WEIGHTS))
    strategy.save(out / STRATEGY)
    lm.model.config.save_pretrained(out)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out)
    cost = quantizer.cost(strategy)
    manifest = {
        "format": f"qopt-packed-v{FORMAT_VERSION}",
        "model": lm.name,
        "seed": seed,
        **(source or {}),
        "bpw": cost.bpw,
        "quantized_counted_bytes": math.ceil(sum(u["counted_bits"] for u in units.values()) / 8),
        "quantized_stored_bytes": sum(u["stored_bytes"] for u in units.values()),
        "plain_stored_bytes": plain_bytes,
        "plain_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "file_bytes": (out / WEIGHTS).stat().st_size,
        "units": units,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint directory written by `export_checkpoint` and decode its matrices."""
    folder = Path(path)
    manifest = read_manifest(folder)
    tensors = load_file(str(folder / WEIGHTS), device=str(device))
    weights = {}
    for name, info in manifest["units"].items():
        config = LayerConfig.from_dict(info["config"], where=f"{MANIFEST}: {name}")
        parts = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        transform = _transform(parts, config, info["shape"][1], torch.device(device))
        values = _unpack(parts, config, tuple(info["shape"]))
        weights[name] = (to_original_basis(values, transform), transform)
    quantized_keys = {f"{name}.{k}" for name in manifest["units"] for k in _PART_NAMES}
    plain = {k: v for k, v in tensors.items() if k not in quantized_keys}
    return Checkpoint(Strategy.load(folder / STRATEGY), manifest, weights, plain)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`; `QoptError` if it is not a complete checkpoint."""
    folder = Path(path)
    for name in (MANIFEST, WEIGHTS, STRATEGY):
        if not (folder / name).is_file():
            raise QoptError(f"{folder} is not a qopt checkpoint: {name} is missing")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise QoptError(f"{folder / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != f"qopt-packed-v{FORMAT_VERSION}":
        raise QoptError(f"{folder}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def use_checkpoint(quantizer: Quantizer, checkpoint: Checkpoint) -> None:
    """Make `quantizer` apply the checkpoint's decoded weights instead of quantizing.

    The quantizer's model must be the one the checkpoint was exported from (its
    unquantized weights stay the reference); anything else raises `QoptError`.
    """
    lm = quantizer.lm
    quantizer.restore()
    plan = quantizer.plan(checkpoint.strategy)
    state = lm.model.state_dict()
    for key, tensor in checkpoint.plain.items():
        if key not in state or state[key].shape != tensor.shape or not torch.equal(state[key], tensor.to(state[key])):
            raise QoptError(f"the checkpoint's {key} differs from the model's: it was exported from another model")
    quantizer.cache.max_bytes = max(quantizer.cache.max_bytes, 2**62)  # nothing from the checkpoint is evicted
    seed = checkpoint.manifest["seed"]
    for name, (w_hat, transform) in checkpoint.weights.items():
        unit = lm.unit(name)
        if tuple(w_hat.shape) != (unit.out_features, unit.in_features):
            raise QoptError(f"checkpoint matrix {name} is {tuple(w_hat.shape)}, the model's is not")
        if plan[name].to_dict() != checkpoint.manifest["units"][name]["config"]:
            raise QoptError(f"checkpoint matrix {name}: its config differs from the strategy's")
        quantizer.remember(name, plan[name], seed, w_hat.to(unit.weight.dtype), transform)


_PART_NAMES = ("codes", "scales", "zeros", "outlier_values", "outlier_index", "smooth", "awq_scale")


def _pack(stored: QuantizedMatrix, transform: InputTransform | None) -> dict[str, torch.Tensor]:
    """The stored tensors of one matrix (see the module docstring)."""
    parts = {
        "codes": pack_bits(stored.codes().reshape(-1), stored.grid.bits),
        "scales": stored.scale.reshape(-1).half(),
    }
    if stored.zero is not None:
        parts["zeros"] = stored.zero.reshape(-1).half()
    if stored.kept is not None:
        index, values = stored.outliers()
        parts["outlier_index"] = pack_bits(index, index_bits(stored.values.numel()))
        parts["outlier_values"] = values
    if transform is not None and transform.smooth is not None:
        parts["smooth"] = transform.smooth.half()
    if transform is not None and transform.scale is not None:
        parts["awq_scale"] = transform.scale.half()
    return parts


def _unpack(parts: dict[str, torch.Tensor], config: LayerConfig, shape: tuple[int, int]) -> torch.Tensor:
    """The [out, in] fp32 values in the quantization basis, from the stored tensors."""
    out, inp = shape
    n = out * inp
    grid = config.grid()
    assert grid is not None
    codes = unpack_bits(parts["codes"], grid.bits, n).reshape(out, inp)
    code_blocks = to_blocks(codes.float(), grid.granularity, grid.group_size).nan_to_num(0).long()
    scale = parts["scales"].float().reshape(-1, 1)
    zero = parts["zeros"].float().reshape(-1, 1) if "zeros" in parts else None
    values = from_blocks(grid_values(code_blocks, scale, zero, grid), shape)
    if "outlier_index" in parts:
        k = parts["outlier_values"].numel()
        index = unpack_bits(parts["outlier_index"], index_bits(n), k)
        values = values.reshape(-1).clone()
        values[index] = parts["outlier_values"].float()
        values = values.reshape(out, inp)
    return values


def _transform(
    parts: dict[str, torch.Tensor], config: LayerConfig, in_features: int, device: torch.device
) -> InputTransform | None:
    smooth = parts["smooth"].float() if "smooth" in parts else None
    scale = parts["awq_scale"].float() if "awq_scale" in parts else None
    rotation = rotation_matrix(in_features).to(device) if config.outliers == "rotate" else None
    if smooth is None and rotation is None and scale is None:
        return None
    return InputTransform(smooth=smooth, rotation=rotation, scale=scale)


def _check_round_trip(
    name: str,
    parts: dict[str, torch.Tensor],
    config: LayerConfig,
    stored: QuantizedMatrix,
    shape: torch.Size,
) -> None:
    decoded = _unpack({k: v.cpu() for k, v in parts.items()}, config, tuple(shape))
    if not torch.equal(decoded, stored.values.cpu()):
        worst = float((decoded - stored.values.cpu()).abs().max())
        raise QoptError(f"{name}: the packed weights decode with an error of {worst:.3g} (please report this)")


def _plain_parameters(lm: LoadedModel, packed: set[int]) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer not stored packed (by id), tied weights once."""
    seen = set(packed)
    plain = {}
    for name, tensor in lm.model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        plain[name] = tensor
    return plain
