"""Text sources, tokenization, and the search / evaluation split.

The token stream is cut once: the first `search_fraction` of it is the
*search* part (calibration and the search's objective), the rest the
*evaluation* part, which the search never sees. Each part is cut into
non-overlapping windows of `seq_len` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qopt.errors import QoptError, first_line

PARTS = ("search", "validation", "eval")


def load_text(source: str) -> str:
    """Read a text source.

    - a `.txt` (or any text) file: its contents;
    - a `.json` file holding a list of strings: the rows joined by blank lines
      (the WikiText convention of the GPTQ/AWQ papers);
    - `hf:NAME[:CONFIG[:SPLIT]]`: a `datasets` data set's `text` column, rows
      joined by blank lines (needs the hub or a local datasets cache).
    """
    if source.startswith("hf:"):
        return _load_hub_text(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise QoptError(
            f"data file {source} does not exist (give a text file, a JSON list of strings, or hf:NAME[:CONFIG[:SPLIT]])"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QoptError(
            f"data file {source} is not UTF-8 text (undecodable byte at offset {exc.start}); give a text file, "
            "a JSON list of strings, or hf:NAME[:CONFIG[:SPLIT]]"
        ) from None
    except OSError as exc:
        raise QoptError(f"cannot read data file {source}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QoptError(f"data file {source} is not valid JSON: {exc}") from exc
        if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            raise QoptError(f"data file {source} must hold a JSON list of strings")
        text = "\n\n".join(rows)
    if not text.strip():
        raise QoptError(f"data file {source} is empty")
    return text


def _load_hub_text(source: str) -> str:
    import datasets

    name, config, split = (source[3:].split(":") + [None, None])[:3]
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "test")["text"]
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise QoptError(f"could not load data set {source!r}: {first_line(exc)}") from exc
    return "\n\n".join(rows)


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids [n_tokens] (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TokenSplit:
    """Windows of each part: `search` is [n_search, seq_len], `eval` is [n_eval, seq_len].

    `validation` ([n_validation, seq_len], possibly empty) are windows of the search
    half that the search never scores: what picks among a search's best members
    without touching the held-out `eval` part. `calibration` ([n_calibration, seq_len],
    possibly empty) are further search-half windows, neither scored nor validating: what
    GPTQ/AWQ statistics come from when calibration is kept apart from the scored text.
    """

    search: torch.Tensor
    eval: torch.Tensor
    validation: torch.Tensor | None = None
    calibration: torch.Tensor | None = None

    def part(self, name: str) -> torch.Tensor:
        if name not in PARTS:
            raise QoptError(f"part {name!r} is not one of {', '.join(PARTS)}")
        if name == "validation":
            if self.validation is None or len(self.validation) == 0:
                raise QoptError(
                    "no validation windows: the search half of the text has no windows beyond "
                    "eval.search_windows (use a longer text, fewer search windows or eval.validation_windows > 0)"
                )
            return self.validation
        return self.search if name == "search" else self.eval


def split_windows(
    ids: torch.Tensor,
    seq_len: int,
    search_fraction: float = 0.5,
    max_windows: tuple[int | None, int | None] = (None, None),
    seed: int = 0,
    validation_windows: int = 0,
    calibration_windows: int = 0,
) -> TokenSplit:
    """Cut a token stream into the search and evaluation parts, then into windows.

    The parts are contiguous and disjoint (search first). If a part has more
    windows than its cap in `max_windows` (search, eval), a seeded random
    subset is kept, in stream order. Up to `validation_windows` of the search
    half's windows left out of that subset form the validation part, and up to
    `calibration_windows` of those left after it the calibration part.
    """
    if not 0.0 < search_fraction < 1.0:
        raise QoptError(f"search_fraction must be in (0, 1), got {search_fraction}")
    cut = int(len(ids) * search_fraction)
    parts, spare, calibration = [], [], []
    for tokens, cap, offset in ((ids[:cut], max_windows[0], 0), (ids[cut:], max_windows[1], 1)):
        n = len(tokens) // seq_len
        if n == 0:
            raise QoptError(f"the text is too short: a part of {len(tokens)} tokens has no window of {seq_len} tokens")
        windows = tokens[: n * seq_len].view(n, seq_len)
        order = torch.arange(n)
        if cap is not None and n > cap:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 2 + offset))
        parts.append(windows[order[:cap].sort().values])
        rest = order[cap:] if cap is not None else order[:0]
        spare.append(windows[rest[:validation_windows].sort().values])
        calibration.append(windows[rest[validation_windows:][:calibration_windows].sort().values])
    return TokenSplit(search=parts[0], eval=parts[1], validation=spare[0], calibration=calibration[0])
