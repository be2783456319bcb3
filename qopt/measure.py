"""The jobs behind `qopt eval` and `qopt export`, from files and names to results.

Each job loads what it is pointed at (a model by hub name, folder or .gguf
file; text; a strategy file, a study trial or an exported checkpoint), runs the
library on it and returns plain results; the CLI only parses options and
prints. `on_note` receives one-line notes for the user (e.g. that a GGUF
source was already quantized).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qopt.data import PARTS, load_text
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator, Metrics
from qopt.model import LoadedModel, load_model, parse_dtype
from qopt.strategy import Strategy

Note = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """What an export quantizes: a model (hub name, folder or .gguf file), the text that
    calibrates GPTQ/AWQ/smoothing (None: no calibration), and the evaluation settings."""

    model: str
    data: str | None = None
    settings: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    device: str | None = None
    dtype: str = "float32"
    on_note: Note | None = None

    def folders(self) -> list[Path]:
        """Folders an export must never write into: the model's own (a .gguf file's folder)."""
        path = Path(self.model).expanduser()
        return [path] if path.is_dir() else [path.parent] if path.is_file() else []

    def quantizer(self):
        """The loaded model's quantizer, calibrated on `data` when given."""
        from qopt.quantizer import Quantizer

        lm = _load(self.model, self.device, self.dtype, self.on_note)
        if self.data is None:
            return Quantizer(lm)
        return Evaluator.from_text(lm, load_text(self.data), self.settings).quantizer


@dataclass(frozen=True)
class Measurement:
    """One strategy measured on one part of a text: metrics, and what was measured."""

    metrics: Metrics
    strategy: Strategy
    label: str  # the strategy file or checkpoint it came from
    model: str
    n_windows: int
    device: str


def measure(
    *,
    part: str,
    model: str | None = None,
    data: str | None = None,
    strategy: Path | None = None,
    checkpoint: Path | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    on_note: Note | None = None,
) -> Measurement:
    """Measure a strategy file, or an exported checkpoint's packed weights, on `part`
    ("search" or "eval") of `data` against the unquantized `model`.

    A checkpoint supplies its model, data and evaluation settings unless given;
    `overrides` replace `EvalSettings` fields (None values are ignored).
    """
    from qopt.export import load_checkpoint, read_manifest, use_checkpoint

    if part not in PARTS:
        raise QoptError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    if (strategy is None) == (checkpoint is None):
        raise QoptError("give exactly one of --strategy FILE or --checkpoint DIR")
    settings = EvalSettings()
    if checkpoint is not None:
        manifest = read_manifest(checkpoint)
        model = model or manifest["model"]
        data = data or manifest.get("data")
        settings = EvalSettings(**manifest.get("eval", {}))
    if model is None:
        raise QoptError("give --model")
    if data is None:
        raise QoptError("give --data (the checkpoint does not record its data)")
    settings = dataclasses.replace(settings, **{k: v for k, v in (overrides or {}).items() if v is not None})
    evaluator = evaluator_for(model, data, settings, device, dtype, on_note, progress=True)
    lm = evaluator.lm
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, lm.device)
        use_checkpoint(evaluator.quantizer, loaded)
        parsed, label = loaded.strategy, f"checkpoint {checkpoint}"
    else:
        assert strategy is not None
        parsed, label = Strategy.load(strategy), str(strategy)
    metrics = evaluator.evaluate(parsed, part)
    n_windows = len(evaluator.split.part(part))
    return Measurement(metrics, parsed, label, model, n_windows, f"{lm.device} ({dtype})")


@dataclass(frozen=True)
class Export:
    """What `export` wrote: the checkpoint's manifest and llama.cpp's view of its tensors."""

    strategy: Strategy
    manifest: dict[str, Any]
    n_tensors: int
    n_lost: int  # tensors with genes llama.cpp cannot express


def export(
    output: Path,
    strategy: Strategy,
    source: Source,
    *,
    force: bool = False,
) -> Export:
    """Write `strategy` applied to the source model as a packed checkpoint in `output`
    (see `qopt.export`), with a llama-quantize override list beside it; the model's own
    folder is never written into."""
    from qopt.export import export_checkpoint
    from qopt.io import check_output, fresh_folder
    from qopt.llamacpp import override_file, tensor_types

    protected = source.folders()
    check_output(output, force=force, protected=protected)  # refuse a bad output before loading anything
    quantizer = source.quantizer()
    lm = quantizer.lm
    recorded = {"data": source.data, "eval": dataclasses.asdict(source.settings)} if source.data is not None else {}
    with fresh_folder(output, force=force, protected=protected) as folder:
        manifest = export_checkpoint(quantizer, strategy, folder, seed=source.settings.seed, source=recorded)
        types = tensor_types(lm.units, quantizer.plan(strategy))
        (folder / "llama-tensor-types.txt").write_text(override_file(types, strategy.name or str(output)))
    return Export(strategy, manifest, len(types), sum(bool(t.lost) for t in types))


def export_gguf_file(
    output: Path,
    strategy: Strategy,
    source: Source,
    *,
    force: bool = False,
    nearest: bool = False,
) -> dict[str, Any]:
    """Write `strategy` applied to the source model as one GGUF file that llama.cpp runs, with qopt's
    own codes and scales (`qopt.gguf_export`). An existing `output` is refused unless
    `force`; the file appears whole or not at all. With `nearest`, matrices no type holds
    are re-rounded to the nearest type (listed in `changed`), and, given `data`, the file is
    measured against the strategy on the held-out part (`measured`: both perplexities)."""
    from qopt.gguf_export import export_gguf

    output = Path(output).expanduser()
    if output.is_dir():
        raise QoptError(f"output {output} is a folder; give a file path ending in .gguf")
    if output.exists() and not force:
        raise QoptError(f"output {output} exists; pass --force to replace it")
    if output.resolve() == Path(source.model).expanduser().resolve():
        raise QoptError(f"output {output} is the source model; write elsewhere")
    if not output.parent.is_dir():
        raise QoptError(f"cannot write {output}: folder {output.parent} does not exist")
    settings = source.settings
    quantizer = source.quantizer()
    try:
        summary = export_gguf(quantizer, strategy, output, seed=settings.seed, nearest=nearest)
    except OSError as exc:
        raise QoptError(f"cannot write {output}: {exc.strerror or exc}") from None
    if summary["changed"] and source.data is not None:  # what the changes cost, measured
        text = load_text(source.data)
        ours = Evaluator.from_text(quantizer.lm, text, settings).evaluate(strategy, "eval")
        written = _load(str(output), source.device, source.dtype, None)
        theirs = Evaluator.from_text(written, text, settings).evaluate(Strategy(), "eval")
        summary["measured"] = {"strategy_ppl": ours.ppl, "file_ppl": theirs.ppl, "tokens": ours.tokens}
    return summary


def export_compressed_tensors_folder(
    output: Path,
    strategy: Strategy,
    source: Source,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Write `strategy` applied to the source model as a compressed-tensors checkpoint
    folder that vLLM and transformers load (`qopt.ct_export`), under a temporary name first."""
    from qopt.ct_export import export_compressed_tensors
    from qopt.io import check_output, fresh_folder

    protected = source.folders()
    check_output(output, force=force, protected=protected)
    quantizer = source.quantizer()
    with fresh_folder(output, force=force, protected=protected) as folder:
        return export_compressed_tensors(quantizer, strategy, folder, seed=source.settings.seed)


def evaluator_for(
    model: str,
    data: str,
    settings: EvalSettings,
    device: str | None = None,
    dtype: str = "float32",
    on_note: Note | None = None,
    progress: bool = True,
) -> Evaluator:
    """An evaluator of `model` on the text `data` (a file, a JSON list, or hf:NAME)."""
    text = load_text(data)  # a bad data source fails before the model loads
    return Evaluator.from_text(_load(model, device, dtype, on_note), text, settings, progress=progress)


def _load(model: str, device: str | None, dtype: str, on_note: Note | None) -> LoadedModel:
    lm = load_model(model, device=device, dtype=parse_dtype(dtype))
    if lm.source_note and on_note is not None:
        on_note(lm.source_note)
    return lm
