"""A full disk (ENOSPC) or an exhausted quota (EDQUOT) as one error, whichever writer met it.

TensorFlow's writers (the Estimator's ``Saver``, ``tf.io.TFRecordWriter``, the SavedModel
builder) raise ``tf.errors.ResourceExhaustedError`` or ``UnknownError`` with "No space left on
device" in the message; Python's ``open``/``write``/``close``, numpy and matplotlib raise
``OSError`` with ``errno`` 28 or 122; h5py raises an ``OSError`` without ``errno`` whose message
says ``errno = 28``; Apache Beam re-raises a worker's error as another exception carrying its
text. :func:`disk_full_error` recognises all of these (through ``__cause__``/``__context__``
too), :func:`translate_disk_full` turns them into :class:`DiskFullError` at a job's boundary,
:func:`atomic_output` writes any file or folder under a temporary name that a failure
removes, and :func:`quiet_background_writers` keeps writer threads from printing the same
failure as a traceback. Standard library only: the bottom of the imports, beside ``errors``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# errno values and the texts C libraries, TensorFlow and h5py put in their messages.
_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_TEXTS = (
    ("no space left on device", "no space left on device"),
    ("disk quota exceeded", "disk quota exceeded"),
    (f"errno = {errno.ENOSPC},", "no space left on device"),
    (f"errno = {errno.EDQUOT},", "disk quota exceeded"),
)
# A path right before "; No space left" (TensorFlow), right after it (Python's OSError as text,
# e.g. in a Beam worker's traceback) or h5py's "filename = '...'".
_TF_PATH = re.compile(r"(/[^\s;'\"]+)\s*[;:]\s*(?:No space left on device|Disk quota exceeded)")
_OS_PATH = re.compile(r"(?:No space left on device|Disk quota exceeded): '(/[^']+)'")
_H5_PATH = re.compile(r"filename = '([^']+)'")
# Temporary names mapped back to what was being written: the Saver's ``PREFIX_temp/part-...``
# and ``.tempstate<N>``, the Estimator's export folder ``temp-<second>/...`` (its parent is
# named), this project's ``.tmp-<pid or uuid hex>-NAME`` and ``NAME.tmp[.ext]``.
_TEMP_NAMES = (
    (re.compile(r"/temp-\d+(?:/.*)?$"), ""),
    (re.compile(r"_temp(?:_[0-9a-f]+)?/part-.*$|\.tempstate\d+$"), ""),
    (re.compile(r"(^|/)\.tmp-[0-9a-f]+-([^/]+)$"), r"\1\2"),
    (re.compile(r"\.tmp(?:\.\w+)?$"), ""),
)


class DiskFullError(Exception):
    """A write failed because the file system is full or the user's quota is used up.

    ``str(error)`` is one line: the path, that the disk is full, what was kept, and the fix
    (free space, rerun the same command). Entry points print it and exit with ``exit_code``.

    Attributes:
        path: The file that could not be written (or the folder being written to).
        reason: ``"no space left on device"`` or ``"disk quota exceeded"``.
        kept: What the failed job left complete, or None.
        exit_code: 75 (``EX_TEMPFAIL`` in ``sysexits.h``: a temporary failure; retrying the same
            command later is expected to work). Distinct from bad input (2) and a failed
            training (1).
    """

    exit_code = 75

    def __init__(self, path: PathLike, reason: str = "no space left on device", kept=None):
        self.path = os.fspath(path)
        self.reason = reason
        self.kept = " ".join(str(kept).split()) if kept else None
        fix = "free space on that file system (or raise the quota) and rerun the same command"
        kept_text = f"{self.kept}; " if self.kept else ""
        super().__init__(f"{self.path}: the disk is full ({reason}); {kept_text}{fix}")

    def with_kept(self, kept: str) -> DiskFullError:
        """The same error saying what was kept."""
        return DiskFullError(self.path, self.reason, kept)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full_error(
    error: BaseException, path: Optional[PathLike] = None
) -> Optional[DiskFullError]:
    """The :class:`DiskFullError` ``error`` stands for, or None if it is not about a full disk.

    Args:
        error: Any exception; its causes and contexts are searched too.
        path: The path to name when the error does not say which file it was writing.
    """
    for link in _chain(error):
        if isinstance(link, DiskFullError):
            return link
        reason = _ERRNOS.get(getattr(link, "errno", None)) if isinstance(link, OSError) else None
        text = str(getattr(link, "message", None) or link)
        reason = reason or _reason(text)
        if reason is None:
            continue
        found = getattr(link, "filename", None) if isinstance(link, OSError) else None
        if not found:
            match = _TF_PATH.search(text) or _OS_PATH.search(text) or _H5_PATH.search(text)
            found = match.group(1) if match else None
        found = _final_name(os.fspath(found)) if found else path
        return DiskFullError(found if found is not None else "(unknown path)", reason)
    return None


def _reason(text: str) -> Optional[str]:
    lowered = text.lower()
    return next((why for needle, why in _TEXTS if needle in lowered), None)


def _final_name(path: str) -> str:
    for pattern, replacement in _TEMP_NAMES:
        path = pattern.sub(replacement, path)
    return path


@contextlib.contextmanager
def translate_disk_full(path: Optional[PathLike] = None) -> Iterator[None]:
    """Re-raises a full disk met inside the block as :class:`DiskFullError`; the rest unchanged.

    Args:
        path: Named when the error does not say which file it was writing.
    """
    try:
        yield
    except Exception as error:
        full = disk_full_error(error, path)
        if full is None or full is error:
            raise
        raise full from error


@contextlib.contextmanager
def quiet_background_writers() -> Iterator[None]:
    """Hides what writer threads report about a full disk while the block runs.

    TensorFlow's summary ``EventFileWriter`` flushes in a thread that logs the error, dies with
    a traceback (``threading.excepthook``) and hands the error to the main thread, which raises
    it at the next write or close: that one becomes the job's single line. Other errors and
    other threads' reports are untouched.
    """
    previous = threading.excepthook

    def hook(args):
        if args.exc_value is None or disk_full_error(args.exc_value) is None:
            previous(args)

    def not_disk_full(record: logging.LogRecord) -> bool:
        return _reason(record.getMessage()) is None

    logger = logging.getLogger("tensorflow")
    threading.excepthook = hook
    logger.addFilter(not_disk_full)
    try:
        yield
    finally:
        threading.excepthook = previous
        logger.removeFilter(not_disk_full)


def remove(path: PathLike) -> None:
    """Removes a file or folder if it exists (what a failed write left), ignoring errors."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_output(path: PathLike, tmp: Optional[PathLike] = None) -> Iterator[str]:
    """Yields a temporary name to write ``path`` to; renames it into place when the block ends.

    If the block raises (a full disk, an interrupt, anything), the temporary file or folder is
    removed and ``path`` is untouched: it is either the old complete one, the new complete one,
    or absent. Works for any writer that takes a path (``model.save``, ``savefig``, ONNX, ...).

    Args:
        path: The final file or folder.
        tmp: The temporary name (default ``PATH.tmp``, in the same folder so the rename is
            atomic). Writers that pick a format from the extension need one that keeps it.
    """
    path = os.fspath(path)
    tmp = os.fspath(tmp) if tmp is not None else f"{path}.tmp"
    remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        remove(tmp)
        # Python reports a failed flush at close without a file name: name the file here.
        full = disk_full_error(error, path) if isinstance(error, Exception) else None
        if full is None or full is error:
            raise
        raise full from error
