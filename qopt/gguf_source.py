"""Models stored as GGUF files (llama.cpp's format), read through transformers.

transformers' own GGUF loader (`from_pretrained(folder, gguf_file=name)`, which
needs the `gguf` package) dequantizes every tensor to float. That takes tens of
seconds for a 135M model, so it is done once: the converted model and tokenizer
are saved as an ordinary Hugging Face folder in qopt's cache directory, keyed by
a hash of the file's bytes, and every later load reads that folder.

A GGUF file is usually already quantized (Q4_1, Q8_0, K-quants...). What qopt
calls "unquantized" for such a model is the dequantized source, and a scheme
that matches the source grid (int4 g32 asymmetric on a Q4_1 file) is nearly
lossless by construction: `source_grid` says which grid each tensor came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from qopt.cache import cache_dir
from qopt.errors import QoptError, first_line

#: Bump when the conversion changes, so folders converted before are not reused.
_CONVERSION_VERSION = 1
_HASH_CHUNK = 8 * 2**20


def is_gguf(name_or_path: str) -> bool:
    """Whether `name_or_path` names a GGUF file (by its suffix)."""
    return name_or_path.lower().endswith(".gguf")


def converted_folder(path: str | Path) -> Path:
    """The Hugging Face folder holding the GGUF file's model, converted on first use.

    Raises `QoptError` in one sentence for a missing, truncated or unsupported file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise QoptError(f"model file {path} does not exist (give a .gguf file, a model directory or a hub name)")
    folder = cache_dir() / "gguf" / f"v{_CONVERSION_VERSION}-{file_hash(path)}"
    if (folder / "source.json").is_file():
        return folder
    grid = source_grid(path)  # reads the header: a truncated or foreign file fails here, cheaply
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model, tokenizer = _load_with_transformers(path)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "source.json").write_text(json.dumps({"gguf": str(path), "tensor_types": grid}, indent=1))
        try:
            partial.replace(folder)
        except OSError:  # another process converted the same file first: keep its folder
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def source_grid(path: str | Path) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each GGML type ({"Q4_1": 210, ...})."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise QoptError("reading .gguf models needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on a bad file
        raise QoptError(f"{path} is not a readable GGUF file: {first_line(exc)}") from None
    counts = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return dict(counts.most_common())


def describe_grid(folder: Path) -> str | None:
    """One line saying a converted GGUF model was already quantized, or None for other folders."""
    source = folder / "source.json"
    if not source.is_file():
        return None
    types = json.loads(source.read_text())["tensor_types"]
    quantized = {t: n for t, n in types.items() if t not in ("F32", "F16", "BF16")}
    listing = ", ".join(f"{n} x {t}" for t, n in types.items())
    if not quantized:
        return f"GGUF source in float ({listing})"
    return (
        f"GGUF source already quantized ({listing}): 'unquantized' means its dequantized weights, "
        "and a scheme on the source grid is nearly lossless by construction"
    )


def file_hash(path: Path) -> str:
    """blake2b of the file's bytes (hex, 32 chars); about 0.3 s per 100 MB."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_with_transformers(path: Path):
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except ImportError as exc:
        raise QoptError(f"reading .gguf models needs the gguf package: {first_line(exc)}") from None
    except Exception as exc:  # unsupported architecture (ValueError), damaged tensors (many types)
        raise QoptError(f"transformers could not load {path}: {first_line(exc)}") from None
    # The weights are plain floats now; transformers still marks the model as GGUF-quantized,
    # which would refuse to save it and make the saved folder load through GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
