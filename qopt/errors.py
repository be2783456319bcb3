"""The one exception type users see: a bad input, explained in one sentence."""


class QoptError(ValueError):
    """A user-facing error: bad strategy, model path, data file or setting.

    The CLI prints its message as a single line and exits non-zero; anything
    else that escapes is a bug and keeps its traceback.
    """
