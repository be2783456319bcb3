"""Perplexity in a real inference engine: llama.cpp, through llama-cpp-python.

`llamacpp_perplexity` runs a GGUF file on token windows (the same [n, seq_len]
ids qopt's evaluator scores, so tokenization cannot differ) and returns the
perplexity of each window's next tokens, computed as qopt computes it: the
mean NLL over every position that has a next token in its window.
Needs the `llamacpp` extra (`pip install 'qopt[llamacpp]'`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from qopt.errors import QoptError


def llamacpp_perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """Perplexity of llama.cpp running the GGUF file `path` on `windows` ([n, seq_len] token ids)."""
    try:
        import llama_cpp
    except ImportError:
        raise QoptError("running a GGUF file needs llama-cpp-python: pip install 'qopt[llamacpp]'") from None
    n_windows, seq_len = windows.shape
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=seq_len,
        n_batch=seq_len,
        logits_all=True,
        n_threads=threads or os.cpu_count() or 1,
        verbose=False,
    )
    nll, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: seq_len - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            picked = logits[np.arange(seq_len - 1), window[1:]]
            nll += float((logsumexp - picked).sum())
            count += seq_len - 1
    finally:
        llm.close()
    return math.exp(nll / count)
