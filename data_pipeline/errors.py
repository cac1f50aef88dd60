"""The one exception type the data pipeline raises for bad input or bad prepared data."""

from __future__ import annotations

import os
from typing import Optional, Union


class DataError(Exception):
    """A data problem the user can fix: a missing, malformed or inconsistent file.

    ``str(error)`` is a single line naming the file, the problem and the fix, so command-line
    entry points can print it as-is and exit with ``exit_code``.

    Attributes:
        path: The file or folder at fault, or None when no single file is to blame.
        problem: What is wrong, one sentence.
        fix: What the user should do about it, or None.
        exit_code: Process exit status for entry points that catch this error (2, like a usage
            error, because the fix is in the user's input, not in the code).
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        path: Optional[Union[str, os.PathLike]] = None,
        fix: Optional[str] = None,
    ):
        self.path = os.fspath(path) if path is not None else None
        self.problem = _one_line(problem)
        self.fix = _one_line(fix) if fix else None
        message = self.problem if self.path is None else f"{self.path}: {self.problem}"
        if self.fix:
            message = f"{message}; fix: {self.fix}"
        super().__init__(message)


def _one_line(text: str) -> str:
    # TensorFlow messages span lines and carry op traces; collapse so the message stays one line.
    return " ".join(str(text).split())
