"""Reading the YAML/JSON documents users write (strategies, study configs)."""

from __future__ import annotations

import json
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
