"""Measure a strategy: quality against the unquantized model, and true size.

Metrics, over all positions of every window in one part of the data:
- `kl`: mean KL(P_fp || P_q) of next-token distributions, in nats per token;
- `ppl`: perplexity of the quantized model on the text;
- `top1`: fraction of positions where both models' most likely token agree.
The unquantized model's log-probabilities are computed once per part and
cached in memory; quantized weights are cached per (module, config), and
calibration statistics on disk (`qopt.cache`).

Every part is scored in the same batches, the first of `screen_windows`
windows: after it, a strategy may be stopped (`Rejected`) because it
collapsed or because a caller's verdict finds it hopeless (multi-fidelity
screening), at a fraction of the full cost.
"""

from __future__ import annotations

import dataclasses
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
from qopt.model import LoadedModel
from qopt.quantizer import Quantizer
from qopt.strategy import Strategy

#: Refuse to cache more reference log-probs than this (bytes); use fewer windows.
REFERENCE_CACHE_LIMIT = 4 * 2**30


@dataclass(frozen=True)
class EvalSettings:
    """How text becomes evaluation windows.

    `seq_len` is tokens per window, capped by the model's context length.
    `search_windows` / `eval_windows` cap the windows used per part (a seeded
    subset); `calib_windows` are taken from the search part for calibration.
    `screen_windows` is the first batch: the low-fidelity look at a strategy.
    `weight_cache_mib` bounds the memory for quantized weights kept between
    strategies (0 turns the cache off); `calibration_cache` keeps calibration
    statistics on disk.
    """

    seq_len: int = 512
    search_fraction: float = 0.5
    search_windows: int = 16
    eval_windows: int = 64
    calib_windows: int = 8
    batch_size: int = 8
    screen_windows: int = 2
    seed: int = 0
    weight_cache_mib: int = 1024
    calibration_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "search_windows", "eval_windows", "calib_windows", "batch_size", "screen_windows"):
            if getattr(self, name) < 1:
                raise QoptError(f"eval.{name}: {getattr(self, name)} must be at least 1")
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
    logprobs: torch.Tensor  # [n_windows, seq_len, vocab], fp32
    nll: float  # summed next-token NLL of the unquantized model


class Evaluator:
    """Judges strategies on one model and one text, deterministically."""

    def __init__(
        self, lm: LoadedModel, split: TokenSplit, settings: EvalSettings = EvalSettings(), progress: bool = False
    ) -> None:
        self.lm = lm
        self.split = split
        self.settings = settings
        self.progress = progress
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
        )
        return cls(lm, split, settings, progress)

    def evaluate(
        self, strategy: Strategy, part: str = "search", collapse_kl: float | None = None, verdict: Verdict | None = None
    ) -> Metrics:
        """Quantize as `strategy` says, score it on `part` ("search" or "eval"), restore.

        After the first batch (`screen_windows` windows) the strategy is
        stopped with `Collapsed` if its KL there is not finite or exceeds
        `collapse_kl`, or with `Rejected` if `verdict(kl)` gives a reason
        (asked only when windows remain after the first batch).
        """
        self.quantizer.plan(strategy)  # reject a bad strategy before any forward pass
        windows = self.split.part(part)
        reference = self.reference(part)
        start = time.perf_counter()
        with self.quantizer.applied(strategy, seed=self.settings.seed) as report:
            kl_sum, nll_sum, agree = 0.0, 0.0, 0
            for idx, logprobs in self._forward(windows, f"eval {part}"):
                ids = windows[idx].to(logprobs.device)
                ref = reference.logprobs[idx].to(logprobs.device)
                kl_sum += float((ref.exp() * (ref - logprobs)).sum())
                nll_sum += _nll(logprobs, ids)
                agree += int((logprobs.argmax(-1) == ref.argmax(-1)).sum())
                if idx.start == 0:
                    screen_kl = kl_sum / ids.numel()
                    # A verdict on the whole part would discard a full measurement, not save one.
                    self._screen(screen_kl, ids.numel(), collapse_kl, verdict if idx.stop < len(windows) else None)
        seconds = time.perf_counter() - start
        positions = windows.numel()
        cost = report.cost
        return Metrics(
            part=part,
            bpw=cost.bpw,
            kl=kl_sum / positions,
            ppl=_ppl(nll_sum, windows),
            top1=agree / positions,
            fp_ppl=_ppl(reference.nll, windows),
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
        """The unquantized model's log-probs and NLL on `part` (computed once, then cached)."""
        if part not in self._references:
            windows = self.split.part(part)
            vocab = self.lm.model.get_output_embeddings().weight.shape[0]
            size = windows.numel() * vocab * 4
            if size > REFERENCE_CACHE_LIMIT:
                raise QoptError(
                    f"the reference log-probs of {len(windows)} windows would take {size / 2**30:.1f} GiB; "
                    "use fewer windows or a shorter seq_len"
                )
            self.quantizer.restore()
            store = torch.empty(*windows.shape, vocab)
            nll = 0.0
            for idx, logprobs in self._forward(windows, f"reference {part}"):
                store[idx] = logprobs.cpu()
                nll += _nll(logprobs, windows[idx].to(logprobs.device))
            self._references[part] = _Reference(store, nll)
        return self._references[part]

    def _forward(self, windows: torch.Tensor, label: str):
        """Yield (window slice, log-probs [batch, seq_len, vocab] fp32) per batch.

        The first batch is the `screen_windows` windows, then `batch_size` at a
        time. Every pass (reference included) batches the same way, so an
        unquantized strategy reproduces the reference bit for bit.
        """
        batch = self.settings.batch_size
        head = self.settings.screen_windows
        slices = [slice(0, head)] + [slice(s, s + batch) for s in range(head, len(windows), batch)]
        with torch.inference_mode():
            for idx in tqdm(slices, desc=label, disable=not self.progress, leave=False):
                logits = self.lm.model(input_ids=windows[idx].to(self.lm.device)).logits
                yield idx, torch.log_softmax(logits.float(), dim=-1)

    def _calibrate(self, hessians: bool) -> ActivationStats:
        """Statistics of the calibration windows: read from the disk cache, else collected
        (with the model unquantized) and stored there."""
        windows = self.split.search[: self.settings.calib_windows]
        if not self.settings.calibration_cache:
            return collect_activation_stats(self.lm, windows, self.settings.batch_size, hessians)
        if self._model_hash is None:
            self._model_hash = model_fingerprint(self.lm.model)
        cache = CalibrationCache()
        path = cache.path(self._model_hash, tokens_fingerprint(windows), hessians)
        stored = cache.load(path)
        if stored is not None:
            return ActivationStats(**stored)
        stats = collect_activation_stats(self.lm, windows, self.settings.batch_size, hessians)
        try:
            cache.store(path, dataclasses.asdict(stats))
        except OSError:  # a read-only or full cache directory costs speed, not correctness
            pass
        return stats


def _nll(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL: position t predicts token t+1."""
    return float(-logprobs[:, :-1].gather(-1, ids[:, 1:, None]).sum())


def _ppl(nll_sum: float, windows: torch.Tensor) -> float:
    n = windows.shape[0] * (windows.shape[1] - 1)
    mean = nll_sum / n
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
