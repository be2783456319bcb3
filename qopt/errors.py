"""The one exception type users see: a bad input, explained in one sentence."""


class QoptError(ValueError):
    """A user-facing error: bad strategy, model path, data file or setting.

    The CLI prints its message as a single line and exits non-zero; anything
    else that escapes is a bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def listing(lines: list[str], most: int = 20) -> str:
    """Lines for an error message, one indented per line, at most `most` of them."""
    shown = "\n  ".join(lines[:most])
    rest = f"\n  ... and {len(lines) - most} more" if len(lines) > most else ""
    return f"\n  {shown}{rest}"
