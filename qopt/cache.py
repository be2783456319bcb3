"""Content-keyed caches that let a worker judge many strategies cheaply.

- `WeightCache`: quantized weights per (module, layer config), in memory and
  bounded in bytes, so a child that differs from its parent in three layers
  re-quantizes three layers. What a config does to a module's weight depends
  only on the config and the pristine weight (and the calibration statistics,
  fixed per worker), so a hit is exactly what quantizing again would give.
- `CalibrationCache`: calibration statistics (abs-maxes, Hessians) on disk,
  keyed by a hash of the model's weights and the calibration token ids, so
  every worker and every launch on a machine collects them once.

Caches live in `$QOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/qopt`, else
`~/.cache/qopt`: never inside the repository or the shared assets.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

#: Bump when the statistics' meaning changes, so old files are not reused.
_CALIBRATION_VERSION = 1


def cache_dir() -> Path:
    """The directory qopt's on-disk caches live under."""
    if os.environ.get("QOPT_CACHE_DIR"):
        return Path(os.environ["QOPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "qopt"


class WeightCache:
    """A least-recently-used map from a hashable key to a value holding tensors,
    bounded by the bytes the caller declares for each value. `max_bytes=0`
    disables the cache. `hits` and `misses` count lookups."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep `value` (of `nbytes` bytes), evicting the least recently used entries."""
        if not self.enabled or nbytes > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and values (hex, 32 chars).

    Reads each weight once (about 1 s per GB on a CPU core)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(_raw_bytes(param.detach()))
    return digest.hexdigest()


def tokens_fingerprint(ids: torch.Tensor) -> str:
    """A hash of a token-id tensor's shape and values (hex, 32 chars)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(tuple(ids.shape)).encode())
    digest.update(_raw_bytes(ids.to(torch.int64)))
    return digest.hexdigest()


class CalibrationCache:
    """Calibration statistics on disk, one file per (model, tokens, kind) key."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / "calibration"

    def path(self, model_hash: str, tokens_hash: str, hessians: bool) -> Path:
        kind = "hessian" if hessians else "absmax"
        return self.root / f"v{_CALIBRATION_VERSION}-{model_hash}-{tokens_hash}-{kind}.pt"

    def load(self, path: Path) -> Any | None:
        """The stored object, or None if absent or unreadable (a partial write, an old format)."""
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None

    def store(self, path: Path, value: Any) -> None:
        """Write atomically (temporary file, then rename), so readers never see half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(value, partial)
        partial.replace(path)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy())
