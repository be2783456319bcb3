"""A strategy as a GGUF file that llama.cpp runs, holding qopt's own integers and scales.

llama.cpp's legacy block types hold a matrix as rows of 32-weight blocks, each
with an fp16 scale `d` (and, for the `_1` types, an fp16 offset `m`):

    Q4_0  int4 symmetric   w = d * (q - 8),   q in 0..15
    Q4_1  int4 asymmetric  w = d * q + m
    Q5_0  int5 symmetric   w = d * (q - 16),  q in 0..31
    Q5_1  int5 asymmetric  w = d * q + m
    Q8_0  int8 symmetric   w = d * q,         q in -128..127

which is exactly qopt's INT grid with groups of 32 along the input dimension:
a symmetric code c in [-2^(b-1), 2^(b-1)) is stored as q = c + 2^(b-1) with
d = the block's scale; an asymmetric block's w = scale * (q - zero) is stored
with d = scale and m = -scale * zero (m rounded to fp16: the only change). So
the codes GPTQ, HQQ or stochastic rounding chose are written as they are, never
re-rounded. A 16-bit matrix is stored as F16. `gguf_type` says, per matrix,
which type holds its config, or why none does (a K-quant's super-block layout,
per-channel scales, a float grid, outliers kept in 16 bits, input transforms,
activation quantization are beyond these types); `export_gguf` refuses a
strategy with such a matrix, naming every offender.

Everything else comes from the source: from a GGUF source its metadata,
tokenizer and non-matrix tensors are copied byte for byte (the embedding stays
in its source type, which is what qopt evaluated); from a Hugging Face Llama
folder they are written from its config and tokenizer (`gguf`'s vocabulary
readers), with embeddings and norms in F32. Query and key rows are permuted
as llama.cpp's converter does (its rotary embedding pairs neighbouring
dimensions, Hugging Face's pairs halves); a row permutation moves whole
blocks, so it changes no code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qopt.errors import QoptError, listing
from qopt.gguf_source import is_gguf
from qopt.llamacpp import gguf_name
from qopt.model import LoadedModel, QuantUnit
from qopt.quant.weight import QuantizedMatrix
from qopt.strategy import EDGE_ROLES, LayerConfig

BLOCK = 32
#: (bits, symmetric) -> the GGML type name holding that INT grid in blocks of 32.
BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}
#: What a config must have for a block type to hold it exactly (besides `BLOCK_TYPES`' bits/symmetry).
EXACT_GENES = {
    "format": "int",
    "granularity": "group",
    "group_size": BLOCK,
    "outliers": "none",
    "act_format": "none",
    "accumulation": "fp32",
}
#: Rounding methods whose result is only codes and scales (AWQ also scales the layer's input).
STORABLE_ROUNDINGS = ("nearest", "stochastic", "gptq", "hqq")


def gguf_type(config: LayerConfig, in_features: int) -> tuple[str | None, list[str]]:
    """The GGML type that stores a matrix quantized by `config` exactly, or None and the
    reasons none does (one short phrase each)."""
    if not config.quantizes_weights:
        return "F16", []
    reasons = [
        f"{name} {getattr(config, name)} (needs {value})"
        for name, value in EXACT_GENES.items()
        if getattr(config, name) != value
    ]
    if (config.bits, config.symmetric) not in BLOCK_TYPES:
        kind = "symmetric" if config.symmetric else "asymmetric"
        reasons.append(f"int{config.bits} {kind} (block types: int4/int5 either way, int8 symmetric)")
    if config.rounding not in STORABLE_ROUNDINGS:
        reasons.append(f"rounding {config.rounding} (its input scaling has no place in the file)")
    if in_features % BLOCK:
        reasons.append(f"{in_features} inputs (not a multiple of {BLOCK})")
    if reasons:
        return None, reasons
    return BLOCK_TYPES[(config.bits, config.symmetric)], []


def offenders(units: list[QuantUnit], plan: Mapping[str, LayerConfig]) -> list[str]:
    """One line per block matrix no GGUF type stores exactly: its name, config and why."""
    lines = []
    for unit in units:
        if unit.name not in plan or unit.role in EDGE_ROLES:
            continue
        _, reasons = gguf_type(plan[unit.name], unit.in_features)
        if reasons:
            lines.append(f"{unit.name} ({plan[unit.name].describe()}): {'; '.join(reasons)}")
    return lines


def encode_blocks(stored: QuantizedMatrix, ggml_type: str) -> np.ndarray:
    """qopt's codes and scales of one [out, in] matrix as GGUF block bytes [out, in/32 * block bytes]."""
    out_features, in_features = stored.values.shape
    n_blocks = out_features * in_features // BLOCK
    codes = stored.codes().reshape(n_blocks, BLOCK).numpy()
    scale = stored.scale.reshape(n_blocks, 1).float().numpy()
    parts = [scale.astype(np.float16).view(np.uint8)]
    bits = stored.grid.bits
    if stored.zero is not None:  # w = scale * (q - zero) = d * q + m
        zero = stored.zero.reshape(n_blocks, 1).float().numpy()
        parts.append((-scale * zero).astype(np.float16).view(np.uint8))
    if bits == 8:
        parts.append((codes - 128).astype(np.int8).view(np.uint8))
    else:
        low = (codes & 0x0F).astype(np.uint8)
        if bits == 5:  # the fifth bit of element j is bit j of a little-endian uint32
            high = (codes >> 4).astype(np.uint8)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))
        parts.append(low[:, : BLOCK // 2] | (low[:, BLOCK // 2 :] << 4))  # elements j and j + 16 share a byte
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(out_features, -1)


def llama_rows(n_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The row permutation llama.cpp's converter applies to query/key matrices of `n_heads` heads."""

    def permute(rows: np.ndarray) -> np.ndarray:
        head_dim = rows.shape[0] // n_heads
        shaped = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])
        return shaped.swapaxes(1, 2).reshape(rows.shape)

    return permute


@dataclass(frozen=True)
class GgufTensor:
    """One tensor to write: its GGUF name, data (uint8 block bytes for quantized types), and type name."""

    name: str
    data: np.ndarray
    ggml_type: str


def write_gguf(
    path: Path,
    lm: LoadedModel,
    tensors: list[GgufTensor],
    name: str,
) -> None:
    """Write the GGUF file: the source's metadata and other tensors, then qopt's matrices."""
    import gguf

    written = {t.name for t in tensors}
    if is_gguf(lm.name):
        reader = gguf.GGUFReader(lm.name)
        arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
        writer = gguf.GGUFWriter(str(path), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name in (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.NAME):
                continue  # the file is now of mixed types, and named after the strategy
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        source = {t.name: t for t in reader.tensors}
        order = [t.name for t in reader.tensors]
        extra = {
            n: GgufTensor(n, np.asarray(t.data), t.tensor_type.name) for n, t in source.items() if n not in written
        }
    else:
        writer = gguf.GGUFWriter(str(path), "llama")
        _llama_metadata(writer, lm)
        extra = {t.name: t for t in _llama_plain_tensors(lm) if t.name not in written}
        order = list(extra) + [t.name for t in tensors]
    writer.add_name(name)
    by_name = {**extra, **{t.name: t for t in tensors}}
    for tensor_name in order:
        t = by_name[tensor_name]
        kind = gguf.GGMLQuantizationType[t.ggml_type]
        if t.data.dtype == np.uint8 and kind not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            writer.add_tensor(t.name, t.data, raw_dtype=kind)
        else:
            writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_metadata(writer: Any, lm: LoadedModel) -> None:
    """Llama hyperparameters and the tokenizer of a Hugging Face folder, as llama.cpp reads them."""
    import gguf

    config = lm.model.config
    if config.model_type != "llama":
        raise QoptError(
            f"GGUF export from a Hugging Face folder supports Llama models, not {config.model_type!r}; "
            "convert the source with llama.cpp's convert_hf_to_gguf.py and export from that .gguf"
        )
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    folder = Path(lm.name)
    if (folder / "tokenizer.model").is_file():
        vocab = gguf.vocab.SentencePieceVocab(folder)
        writer.add_tokenizer_model("llama")
    else:
        vocab = gguf.vocab.LlamaHfVocab(folder)
        writer.add_tokenizer_model("llama")
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(folder, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def _llama_plain_tensors(lm: LoadedModel) -> list[GgufTensor]:
    """The embedding, norms and (untied) head of a Hugging Face Llama, in F32, by GGUF name."""
    import gguf

    config = lm.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, param in lm.model.state_dict().items():
        if "proj" in hf_name:  # the block matrices: qopt writes them
            continue
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue
        out.append(GgufTensor(mapped, param.detach().float().cpu().numpy(), "F32"))
    return out


def nearest_type(config: LayerConfig, in_features: int) -> str:
    """The block type llama.cpp would give a config no type holds exactly: the legacy type of
    at least its bit-width and its symmetry (int2/int3 -> Q4, int6 -> Q8_0), F16 when the
    inputs are not whole blocks. (`gguf` cannot write K-quants, so none is chosen.)"""
    if not config.quantizes_weights or in_features % BLOCK:
        return "F16"
    bits = min((b for b, _ in BLOCK_TYPES if b >= config.bits), default=8)
    symmetric = config.symmetric or config.format != "int" or bits == 8
    return BLOCK_TYPES[(bits, symmetric)]


def matrix_tensor(
    unit: QuantUnit,
    config: LayerConfig,
    stored: QuantizedMatrix | None,
    w: torch.Tensor,
    lm: LoadedModel,
    nearest: bool = False,
) -> GgufTensor:
    """One block matrix as a GGUF tensor: qopt's blocks, or F16 for a 16-bit config. With
    `nearest`, a config no type holds is re-rounded from the float weight `w` to
    `nearest_type` by the `gguf` package (as llama-quantize would), not refused."""
    ggml_type, reasons = gguf_type(config, unit.in_features)
    if ggml_type is None and not nearest:
        raise QoptError(f"{unit.name}: no GGUF type stores {config.describe()} exactly ({'; '.join(reasons)})")
    if ggml_type is None:
        import gguf

        ggml_type = nearest_type(config, unit.in_features)
        weight = w.float().cpu().numpy()
        kind = gguf.GGMLQuantizationType[ggml_type]
        data = weight.astype(np.float16) if ggml_type == "F16" else gguf.quants.quantize(weight, kind)
    elif ggml_type == "F16":
        data = w.to(torch.float16).cpu().numpy()
    else:
        assert stored is not None
        data = encode_blocks(stored, ggml_type)
    permute = _row_permutation(unit, lm)
    if permute is not None:
        data = permute(data)
    return GgufTensor(gguf_name(unit), np.ascontiguousarray(data), ggml_type)


def _row_permutation(unit: QuantUnit, lm: LoadedModel) -> Callable[[np.ndarray], np.ndarray] | None:
    config = lm.model.config
    if getattr(config, "model_type", None) != "llama" or unit.role not in ("q", "k"):
        return None
    heads = config.num_attention_heads
    if unit.role == "k":
        heads = getattr(config, "num_key_value_heads", None) or heads
    return llama_rows(heads)


def export_gguf(quantizer, strategy, path: Path, seed: int = 0, nearest: bool = False) -> dict[str, Any]:
    """Write `strategy` applied to the quantizer's model as the GGUF file `path` (a
    finished file or none: it is written under a temporary name, then renamed).

    Raises `QoptError` listing every block matrix no GGUF type stores exactly, unless
    `nearest`: then those get `nearest_type`, re-rounded from their float weights.
    Returns a summary: per type the number of matrices, the file's bytes, the bits per
    weight of the block matrices as stored in it (their tensor bytes x 8 / weights), and
    `changed`: one line per matrix not stored as qopt quantized it.
    """
    import os

    from qopt.quantizer import quantize_unit

    lm = quantizer.lm
    plan = quantizer.plan(strategy)
    bad = offenders(lm.units, plan)
    if bad and not nearest:
        raise QoptError(
            f"{len(bad)} matrices have no GGUF type that stores their config exactly:{listing(bad)}\n"
            "search with `search.deploy: llamacpp` so every strategy is exportable, "
            "or pass --nearest to re-round these from float weights to the nearest type"
        )
    quantizer.restore()
    stats = quantizer.prepare([plan])
    tensors, counts, stored_bytes, n_weights, changed = [], {}, 0, 0, []
    with torch.inference_mode():
        for unit in lm.units:
            if unit.role in EDGE_ROLES or unit.name not in plan:
                continue
            config = plan[unit.name]
            w = unit.read_weight().float()
            exact = gguf_type(config, unit.in_features)[0] is not None
            quantized = config.quantizes_weights and exact
            stored, _ = quantize_unit(unit.name, w, config, stats, seed) if quantized else (None, None)
            tensor = matrix_tensor(unit, config, stored, w, lm, nearest)
            if not exact:
                changed.append(f"{unit.name}: {config.describe()} {config.rounding} -> {tensor.ggml_type}")
            tensors.append(tensor)
            counts[tensor.ggml_type] = counts.get(tensor.ggml_type, 0) + 1
            stored_bytes += tensor.data.nbytes
            n_weights += unit.out_features * unit.in_features
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write_gguf(partial, lm, tensors, strategy.name or path.stem)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "types": counts,
        "file_bytes": path.stat().st_size,
        "bpw": 8 * stored_bytes / n_weights,
        "changed": changed,
    }
