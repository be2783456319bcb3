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
import shutil
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qopt.calibration import ActivationStats

#: Bump when the statistics' meaning changes, so old files are not reused.
_CALIBRATION_VERSION = 2


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
    """Calibration statistics on disk, one folder per (model, tokens, kind) key.

    A folder holds abs-maxes and, for the Hessian kind, one safetensors file
    per group of layers (`qopt.calibration`); it is written under a temporary
    name and renamed when complete, so readers never see half of it.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / "calibration"

    def path(self, model_hash: str, tokens_hash: str, hessians: bool) -> Path:
        kind = "hessian" if hessians else "absmax"
        return self.root / f"v{_CALIBRATION_VERSION}-{model_hash}-{tokens_hash}-{kind}"

    def load(self, path: Path) -> ActivationStats | None:
        """The stored statistics, or None if absent or unreadable (a damaged file, an old format)."""
        from qopt.calibration import load_stats

        if not (path / "stats.json").is_file():
            return None
        try:
            return load_stats(path)
        except Exception:
            return None

    def store(self, path: Path, collect: Callable[[Path], ActivationStats]) -> ActivationStats:
        """Run `collect(folder)` into a fresh temporary folder, then publish it as `path`;
        returns the statistics as read back from `path`."""
        from qopt.calibration import save_absmax

        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            save_absmax(collect(partial), partial)
            try:
                partial.rename(path)
            except OSError:  # another worker published the same statistics first
                shutil.rmtree(partial, ignore_errors=True)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        stats = self.load(path)
        assert stats is not None, path
        return stats


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy())
