"""A strategy as llama.cpp can take it: a `llama-quantize --tensor-type` override list.

llama.cpp stores each tensor in one GGML type; `--tensor-type "REGEX=TYPE"`
(repeatable) sets the type of the GGUF tensors whose names match. qopt maps
each matrix's bit-width and format to the nearest type: INT4/5 symmetric ->
q4_0/q5_0, asymmetric -> q4_1/q5_1 (blocks of 32), INT8 -> q8_0, INT2/3/6 ->
the k-quants q2_k/q3_k/q6_k (super-blocks of 256), NF4 -> iq4_nl, FP4 ->
mxfp4, 16-bit -> f16. Whatever that type cannot carry is listed per tensor as
an unexpressible gene: a different block size, a clip search, GPTQ/AWQ/HQQ or
stochastic rounding (llama-quantize re-rounds from the float weights; an
importance matrix is its nearest substitute), outliers, smoothing or
rotation, activation quantization and low-precision accumulation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qopt.model import QuantUnit
from qopt.strategy import LayerConfig

# qopt role -> GGUF tensor name inside a block (edges have no block).
_GGUF_ROLE = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "qkv": "attn_qkv",
    "gate": "ffn_gate", "up": "ffn_up", "fc1": "ffn_up", "down": "ffn_down", "fc2": "ffn_down",
}  # fmt: skip
_EDGE_NAME = {"embed": "token_embd", "lm_head": "output"}
# (format, bits, symmetric) -> (GGML type, its block size in weights)
_LEGACY = {
    ("int", 4, True): ("q4_0", 32), ("int", 4, False): ("q4_1", 32),
    ("int", 5, True): ("q5_0", 32), ("int", 5, False): ("q5_1", 32),
}  # fmt: skip
_K_QUANTS = {2: "q2_k", 3: "q3_k", 6: "q6_k"}


@dataclass(frozen=True)
class TensorType:
    """One GGUF tensor's type, and the genes of its qopt config that type loses."""

    gguf_name: str
    ggml_type: str
    lost: tuple[str, ...]

    def override(self) -> str:
        """The `--tensor-type` argument: an anchored regex on the tensor name, '=', the type."""
        return f"^{re.escape(self.gguf_name)}$={self.ggml_type}"


def gguf_name(unit: QuantUnit) -> str:
    """The GGUF tensor name llama.cpp's converter gives this matrix (e.g. blk.3.attn_q.weight)."""
    if unit.role in _EDGE_NAME:
        return f"{_EDGE_NAME[unit.role]}.weight"
    block = next((part for part in unit.name.split(".") if part.isdigit()), None)
    if block is None or unit.role not in _GGUF_ROLE:
        return f"{unit.name}.weight"  # no GGUF convention known: keep the HF name
    return f"blk.{block}.{_GGUF_ROLE[unit.role]}.weight"


def tensor_type(config: LayerConfig) -> tuple[str, tuple[str, ...]]:
    """The nearest GGML type for `config`, and what it cannot express."""
    lost: list[str] = []
    if not config.quantizes_weights:
        ggml, block = "f16", None
    elif config.format == "nf4":
        ggml, block = "iq4_nl", 32
    elif config.format == "fp":
        ggml, block = ("mxfp4", 32) if config.bits == 4 else ("q8_0", 32)
        if config.bits == 8:
            lost.append("format fp8 (no e4m3 type; q8_0 is INT8)")
    elif (config.format, config.bits, config.symmetric) in _LEGACY:
        ggml, block = _LEGACY[(config.format, config.bits, config.symmetric)]
    elif config.bits == 8:
        ggml, block = "q8_0", 32
        if not config.symmetric:
            lost.append("symmetric: false (q8_0 is symmetric)")
    else:
        ggml, block = _K_QUANTS[config.bits], 256
    if block is not None:
        granularity = f"g{config.group_size}" if config.granularity == "group" else config.granularity
        if granularity != f"g{block}":
            unit_name = "super-blocks" if block == 256 else "blocks"
            lost.append(f"granularity {granularity} ({ggml} uses {unit_name} of {block})")
        if config.scale != "absmax":
            lost.append(f"scale {config.scale} (llama-quantize chooses its own scales)")
        if config.rounding != "nearest":
            lost.append(f"rounding {config.rounding} (llama-quantize rounds from the float weights)")
        if config.outliers != "none":
            lost.append(f"outliers {config.outliers}")
    elif config.outliers == "smooth":
        lost.append("outliers smooth")
    if config.act_format != "none":
        lost.append(f"activations {config.act_format}{config.act_bits}")
    if config.accumulation != "fp32":
        lost.append(f"accumulation {config.accumulation}")
    return ggml, tuple(lost)


def tensor_types(units: Sequence[QuantUnit], plan: Mapping[str, LayerConfig]) -> list[TensorType]:
    """One entry per matrix of the model, in module order."""
    result = []
    for unit in units:
        ggml, lost = tensor_type(plan[unit.name])
        result.append(TensorType(gguf_name(unit), ggml, lost))
    return result


def override_file(types: Sequence[TensorType], source: str) -> str:
    """The text of the override list: comments, then one REGEX=TYPE per line.

    Use: llama-quantize $(grep -v '^#' FILE | sed 's/^/--tensor-type /') in-f16.gguf out.gguf Q8_0
    """
    lines = [
        f"# llama-quantize --tensor-type overrides for {source}, written by qopt",
        "# use: llama-quantize $(grep -v '^#' THIS_FILE | sed 's/^/--tensor-type /') model-f16.gguf out.gguf Q8_0",
    ]
    lost = [t for t in types if t.lost]
    if lost:
        lines.append(f"# {len(lost)} of {len(types)} tensors lose genes llama.cpp types cannot express:")
        lines += [f"#   {t.gguf_name}: {'; '.join(t.lost)}" for t in lost]
    else:
        lines.append("# every gene of this strategy is expressible as llama.cpp types")
    lines += [t.override() for t in types]
    return "\n".join(lines) + "\n"
