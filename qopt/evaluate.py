"""Measure a strategy: quality against the unquantized model, and true size.

Metrics, over all positions of every window in one part of the data:
- `kl`: mean KL(P_fp || P_q) of next-token distributions, in nats per token;
- `ppl`: perplexity of the quantized model on the text;
- `top1`: fraction of positions where both models' most likely token agree.
Logits exist one chunk of positions at a time: the model runs up to its
final hidden states, and the output head is applied to `_LOGITS_CHUNK_BYTES`
worth of positions at once, so no tensor of tokens x vocabulary outlives a
chunk. The unquantized model's distributions are kept as what they are made
from, its final hidden states (hidden x 4 bytes per token: 2.3 KB for
SmolLM2-135M, against 192 KB for its log-probs), and recomputed chunk by
chunk with the unquantized head: KL stays exact over the full vocabulary, at
the price of one more head matmul per chunk. Quantized weights are cached per
(module, config), and calibration statistics on disk (`qopt.cache`).

Every part is scored in the same batches, the first of `screen_windows`
windows: after it, a strategy may be stopped (`Rejected`) because it
collapsed or because a caller's verdict finds it hopeless (multi-fidelity
screening), at a fraction of the full cost.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from qopt.cache import CalibrationCache, model_fingerprint, tokens_fingerprint
from qopt.calibration import ActivationStats, collect_activation_stats
from qopt.data import TokenSplit, split_windows, tokenize
from qopt.errors import QoptError
from qopt.model import HeadInput, LoadedModel
from qopt.quantizer import Quantizer
from qopt.strategy import Strategy

#: Logits (and their log-softmax) are computed for this many bytes of positions x vocab at a time.
_LOGITS_CHUNK_BYTES = 64 * 2**20


#: Where calibration windows come from (`EvalSettings.calibration`).
CALIBRATION_SOURCES = ("search", "apart")


@dataclass(frozen=True)
class EvalSettings:
    """How text becomes evaluation windows.

    `seq_len` is tokens per window, capped by the model's context length.
    `search_windows` / `eval_windows` cap the windows used per part (a seeded
    subset). `calib_windows` windows of the search half feed calibration (GPTQ
    Hessians, AWQ/SmoothQuant activation scales); `calibration` says which:
    "search", the first of the scored search windows (what GPTQ fits is then
    also what scores it: an optimistic search KL for GPTQ-rounded layers), or
    "apart", search-half windows that are neither scored nor validating.
    `screen_windows` is the first batch: the low-fidelity look at a strategy.
    `validation_windows` caps the validation part: search-half windows the
    search never scores, which choose among its best members (0: none).
    `weight_cache_mib` bounds the memory for quantized weights kept between
    strategies (0 turns the cache off); `calibration_cache` keeps calibration
    statistics on disk. `calib_memory_mib`
    bounds the Hessians held at once while they are collected (the rest wait
    on disk, in the calibration cache).
    """

    seq_len: int = 512
    search_fraction: float = 0.5
    search_windows: int = 16
    eval_windows: int = 64
    calib_windows: int = 8
    batch_size: int = 8
    screen_windows: int = 2
    validation_windows: int = 16
    seed: int = 0
    weight_cache_mib: int = 1024
    calibration_cache: bool = True
    calib_memory_mib: int = 1024
    calibration: str = "search"

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_SOURCES:
            raise QoptError(f"eval.calibration: {self.calibration!r} is not one of {', '.join(CALIBRATION_SOURCES)}")
        names = ("seq_len", "search_windows", "eval_windows", "calib_windows", "batch_size", "screen_windows")
        for name in (*names, "calib_memory_mib"):
            if getattr(self, name) < 1:
                raise QoptError(f"eval.{name}: {getattr(self, name)} must be at least 1")
        if self.validation_windows < 0:
            raise QoptError(f"eval.validation_windows: {self.validation_windows} must be 0 (none) or more")
        if self.weight_cache_mib < 0:
            raise QoptError(f"eval.weight_cache_mib: {self.weight_cache_mib} must be 0 (off) or more")


@dataclass(frozen=True)
class Metrics:
    """The measured outcome of one strategy on one part of the data."""

    part: str
    bpw: float  # bits per weight of the transformer blocks' linear layers
    kl: float  # nats per token
    ppl: float
    top1: float
    fp_ppl: float  # the unquantized model's perplexity on the same windows
    tokens: int  # positions scored
    seconds: float  # quantization + forward passes for this strategy
    quantize_seconds: float  # applying the strategy to the weights (part of `seconds`)
    embed_bpw: float
    head_bpw: float
    total_bytes: int
    screen_kl: float  # KL (nats/token) over the first `screen_windows` windows only

    def to_dict(self) -> dict:
        return asdict(self)


class Rejected(Exception):
    """A strategy stopped after the first batch; `kl` is its KL there (nats/token)
    over `tokens` positions."""

    def __init__(self, reason: str, kl: float, tokens: int) -> None:
        super().__init__(reason)
        self.kl = kl
        self.tokens = tokens


class Collapsed(Rejected):
    """A strategy's outputs collapsed: non-finite, or KL above the cap on the first batch."""


#: verdict(screen_kl) -> why to stop the strategy after the first batch, or None to go on.
Verdict = Callable[[float], "str | None"]


@dataclass(frozen=True)
class _Reference:
    """The unquantized model on one part: what its next-token distributions are made of.

    `hidden` is [n_windows, seq_len, hidden] (the model's dtype, on the CPU):
    the final hidden states the output head turns into logits; `head_weight`
    ([vocab, hidden]) and `head_bias` are the unquantized head's own parameters
    (never overwritten: the quantizer swaps parameters instead). `nll` is the
    summed next-token NLL, added up exactly as a strategy's is (so an unquantized
    strategy's perplexity equals it bit for bit); `window_nll` [n_windows] is
    each window's (float64), for scoring only the first windows.
    """

    hidden: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    nll: float
    window_nll: torch.Tensor

    def nll_of(self, n_windows: int) -> float:
        """Summed NLL of the first `n_windows` windows."""
        return self.nll if n_windows == len(self.window_nll) else float(self.window_nll[:n_windows].sum())

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


class Evaluator:
    """Judges strategies on one model and one text, deterministically."""

    def __init__(
        self, lm: LoadedModel, split: TokenSplit, settings: EvalSettings = EvalSettings(), progress: bool = False
    ) -> None:
        self.lm = lm
        self.split = split
        self.settings = settings
        self.progress = progress
        if settings.calibration == "apart":
            have = 0 if split.calibration is None else len(split.calibration)
            if have < settings.calib_windows:
                raise QoptError(
                    f"eval.calibration: apart needs {settings.calib_windows} search-half windows beyond the "
                    f"{len(split.search)} scored and {0 if split.validation is None else len(split.validation)} "
                    f"validation ones; the text leaves {have} "
                    "(use a longer text, fewer windows, or calibration: search)"
                )
        self.quantizer = Quantizer(lm, calibrate=self._calibrate, cache_bytes=settings.weight_cache_mib * 2**20)
        self._references: dict[str, _Reference] = {}
        self._model_hash: str | None = None

    @classmethod
    def from_text(
        cls, lm: LoadedModel, text: str, settings: EvalSettings = EvalSettings(), progress: bool = False
    ) -> Evaluator:
        """Tokenize `text` once with the model's tokenizer and split it as `settings` say."""
        split = split_windows(
            tokenize(lm.tokenizer, text),
            min(settings.seq_len, lm.context_length),
            settings.search_fraction,
            (settings.search_windows, settings.eval_windows),
            settings.seed,
            settings.validation_windows,
            settings.calib_windows if settings.calibration == "apart" else 0,
        )
        return cls(lm, split, settings, progress)

    def evaluate(
        self,
        strategy: Strategy,
        part: str = "search",
        collapse_kl: float | None = None,
        verdict: Verdict | None = None,
        windows: int | None = None,
    ) -> Metrics:
        """Quantize as `strategy` says, score it on `part` ("search" or "eval"), restore.

        `windows` scores only the part's first that many windows (a low-fidelity
        look, e.g. the allocator's per-layer sensitivities); None: all of them.

        After the first batch (`screen_windows` windows) the strategy is
        stopped with `Collapsed` if its KL there is not finite or exceeds
        `collapse_kl`, or with `Rejected` if `verdict(kl)` gives a reason
        (asked only when windows remain after the first batch).
        """
        self.quantizer.plan(strategy)  # reject a bad strategy before any forward pass
        if windows is not None and windows < 1:
            raise QoptError(f"windows: {windows} must be at least 1")
        n_windows = windows
        windows = self.split.part(part)[:n_windows]
        reference = self.reference(part)
        start = time.perf_counter()
        with self.quantizer.applied(strategy, seed=self.settings.seed) as report:
            kl_sum, nll_sum, agree = 0.0, 0.0, 0
            for idx, scored in self._score(windows, f"eval {part}", reference):
                kl_sum += scored.kl
                nll_sum += scored.nll
                agree += scored.agree
                if idx.start == 0:
                    n_positions = windows[idx].numel()
                    screen_kl = kl_sum / n_positions
                    # A verdict on the whole part would discard a full measurement, not save one.
                    self._screen(screen_kl, n_positions, collapse_kl, verdict if idx.stop < len(windows) else None)
        seconds = time.perf_counter() - start
        positions = windows.numel()
        cost = report.cost
        return Metrics(
            part=part,
            bpw=cost.bpw,
            kl=kl_sum / positions,
            ppl=_ppl(nll_sum, windows),
            top1=agree / positions,
            fp_ppl=_ppl(reference.nll_of(len(windows)), windows),
            tokens=positions,
            seconds=seconds,
            quantize_seconds=report.seconds,
            embed_bpw=cost.embed.bpw,
            head_bpw=cost.head.bpw,
            total_bytes=cost.total_bytes,
            screen_kl=screen_kl,
        )

    @staticmethod
    def _screen(kl: float, tokens: int, collapse_kl: float | None, verdict: Verdict | None) -> None:
        if collapse_kl is not None and (not math.isfinite(kl) or kl > collapse_kl):
            raise Collapsed(f"KL {kl:.3g} nats/token on the first batch exceeds the cap {collapse_kl}", kl, tokens)
        reason = verdict(kl) if verdict is not None else None
        if reason:
            raise Rejected(reason, kl, tokens)

    def reference(self, part: str) -> _Reference:
        """The unquantized model's final hidden states and NLL on `part` (computed once, then kept)."""
        if part not in self._references:
            windows = self.split.part(part)
            self.quantizer.restore()
            head = self.lm.model.get_output_embeddings()
            weight, bias = head.weight, getattr(head, "bias", None)
            store = None
            nll, window_nll = 0.0, torch.zeros(len(windows), dtype=torch.float64)
            for idx, hidden in self._hidden_states(windows, f"reference {part}"):
                if store is None:
                    store = torch.empty(*windows.shape, hidden.shape[-1], dtype=hidden.dtype)
                store[idx] = hidden.cpu()
                targets = _targets(windows[idx]).to(hidden.device)
                position_nll = torch.zeros(targets.shape[0], dtype=torch.float64)
                for chunk, lp in self._logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, bias):
                    picked = _picked(lp, targets[chunk])
                    nll -= float(picked.sum())
                    position_nll[chunk] = -picked.double().cpu()
                window_nll[idx] = position_nll.reshape(-1, windows.shape[1]).sum(1)
            self._references[part] = _Reference(store, weight, bias, nll, window_nll)
        return self._references[part]

    def _score(self, windows: torch.Tensor, label: str, reference: _Reference):
        """Yield (window slice, `_Scored`) per batch of the current (quantized) model against `reference`."""
        head = self.lm.model.get_output_embeddings()
        for idx, hidden in self._hidden_states(windows, label):
            targets = _targets(windows[idx]).to(hidden.device)
            flat = hidden.reshape(-1, hidden.shape[-1])
            ref_flat = reference.hidden[idx].reshape(flat.shape).to(hidden.device)
            ref_chunks = self._logprobs(ref_flat, reference.head_weight, reference.head_bias)
            kl, nll, agree = 0.0, 0.0, 0
            for (chunk, lp), (_, ref) in zip(self._logprobs(flat, head), ref_chunks, strict=True):
                kl += float((ref.exp() * (ref - lp)).sum())
                nll -= float(_picked(lp, targets[chunk]).sum())
                agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            yield idx, _Scored(kl, nll, agree)

    def _hidden_states(self, windows: torch.Tensor, label: str):
        """Yield (window slice, final hidden states [batch, seq_len, hidden]) per batch.

        The first batch is the `screen_windows` windows, then `batch_size` at a
        time. Every pass (reference included) batches the same way, so an
        unquantized strategy reproduces the reference bit for bit.
        """
        batch = self.settings.batch_size
        head = min(self.settings.screen_windows, len(windows))
        # Stops clipped to the windows given: a slice also indexes the reference, which may hold more.
        slices = [slice(0, head)] + [slice(s, min(s + batch, len(windows))) for s in range(head, len(windows), batch)]
        capture = HeadInput(self.lm.model)
        with torch.inference_mode():
            for idx in tqdm(slices, desc=label, disable=not self.progress, leave=False):
                with capture:
                    self.lm.model(input_ids=windows[idx].to(self.lm.device))
                yield idx, capture.hidden

    def _logprobs(self, hidden: torch.Tensor, head, bias: torch.Tensor | None = None):
        """Yield (row slice, log-probs [rows, vocab] fp32) for [n, hidden] final hidden states,
        `_LOGITS_CHUNK_BYTES` of logits at a time. `head` is the output head module (as
        currently quantized), or a [vocab, hidden] weight used with `bias`."""
        vocab = (head if isinstance(head, torch.Tensor) else head.weight).shape[0]
        rows = max(1, _LOGITS_CHUNK_BYTES // (4 * vocab))
        softcap = getattr(self.lm.model.config, "final_logit_softcapping", None)
        with torch.inference_mode():
            for start in range(0, hidden.shape[0], rows):
                chunk = slice(start, start + rows)
                if isinstance(head, torch.Tensor):
                    logits = torch.nn.functional.linear(hidden[chunk], head, bias)
                else:
                    logits = head(hidden[chunk])
                logits = logits.float()
                if softcap:  # Gemma-2 style: the model's forward would have done this after the head
                    logits = torch.tanh(logits / softcap) * softcap
                yield chunk, torch.log_softmax(logits, dim=-1)

    @property
    def calibration_windows(self) -> torch.Tensor:
        """The windows calibration statistics come from: [n, seq_len] token ids."""
        if self.settings.calibration == "apart":
            return self.split.calibration[: self.settings.calib_windows]
        return self.split.search[: self.settings.calib_windows]

    def _calibrate(self, hessians: bool) -> ActivationStats:
        """Statistics of the calibration windows: read from the disk cache, else collected
        (with the model unquantized, Hessians streamed to the cache in groups of layers
        that fit `calib_memory_mib`) and stored there."""
        windows = self.calibration_windows
        collect = functools.partial(
            collect_activation_stats,
            self.lm,
            windows,
            self.settings.batch_size,
            hessians,
            max_bytes=self.settings.calib_memory_mib * 2**20,
        )
        if not self.settings.calibration_cache:
            return collect()
        if self._model_hash is None:
            self._model_hash = model_fingerprint(self.lm.model)
        cache = CalibrationCache()
        path = cache.path(self._model_hash, tokens_fingerprint(windows), hessians)
        stored = cache.load(path)
        if stored is not None:
            return stored
        try:
            return cache.store(path, lambda folder: collect(folder=folder))
        except OSError:  # a read-only or full cache directory costs memory and speed, not correctness
            return collect()


@dataclass(frozen=True)
class _Scored:
    """Sums over one batch: KL (nats), NLL (nats), positions whose top-1 tokens agree."""

    kl: float
    nll: float
    agree: int


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """The next token of every position of [batch, seq_len] windows, flattened; -1 where
    none follows in the window (the last position)."""
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


def _picked(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs [rows, vocab] of each row's target token; 0 where the target is -1."""
    valid = targets >= 0
    picked = logprobs.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    return picked.masked_fill(~valid, 0.0)


def _ppl(nll_sum: float, windows: torch.Tensor) -> float:
    n = windows.shape[0] * (windows.shape[1] - 1)
    mean = nll_sum / n
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
