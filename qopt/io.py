"""Reading the YAML/JSON documents users write (strategies, study configs), and writing
output folders so that a failed or mistaken write destroys nothing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from qopt.errors import QoptError


def read_document(path: str | Path, what: str) -> Any:
    """Parse a .json file as JSON, anything else as YAML.

    `what` names the document in errors ("strategy file", "study config"),
    which say where the syntax broke: `strategy file s.yaml is not valid YAML:
    line 2, column 1: expected ',' or '}'`.
    """
    path = Path(path)
    if not path.is_file():
        raise QoptError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise QoptError(f"{what} {path} is not valid {kind}: {_where(exc)}") from None


def _where(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', '') or exc}"
    return " ".join(str(exc).split())


def check_output(target: str | Path, force: bool = False, protected: Sequence[str | Path] = ()) -> None:
    """Refuse (`QoptError`) an output folder path that is a file, is or lies inside one of the
    `protected` folders (a source model's), or is a non-empty folder while `force` is not set."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise QoptError(f"output {target} is a file; give a folder path")
    resolved = target.resolve()
    for folder in protected:
        folder = Path(folder).expanduser().resolve()
        if resolved == folder or folder in resolved.parents:
            raise QoptError(f"output {target} is inside the source model's folder {folder}; write elsewhere")
    if target.is_dir() and any(target.iterdir()) and not force:
        holds = "a model" if (target / "config.json").exists() else "files"
        raise QoptError(f"output {target} already holds {holds}; pass --force to replace it, or pick another folder")


@contextmanager
def fresh_folder(target: str | Path, force: bool = False, protected: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A temporary folder beside `target` to write into; renamed to `target` when the block
    succeeds, deleted when it fails, so nothing half-written is ever left at `target`.

    Refused before anything is written as `check_output` says; with `force` an old
    folder at `target` is replaced at the end.
    """
    target = Path(target).expanduser()
    check_output(target, force, protected)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    except OSError as exc:
        raise QoptError(f"cannot write output {target}: {exc.strerror or exc}") from None
    try:
        yield partial
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QoptError(f"cannot write output {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
