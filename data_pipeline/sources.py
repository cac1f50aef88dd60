"""Finding and reading the MNIST source files: IDX (gzip or raw) or Keras' ``mnist.npz``.

Resolution order in :func:`load_source`: the ``source_dir`` argument, then the ``MNIST_DIR``
environment variable, then the Keras cache (``~/.keras/datasets/mnist.npz``), then a download
through ``tf_keras`` with a short timeout. Every array is validated (28x28 uint8 images, labels in
``[0, 10)``, matching counts), and record counts always come from the files' own headers.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import BinaryIO, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from data_pipeline.errors import DataError

NUM_CLASSES = 10
IMAGE_SIZE = 28
SPLITS = ("train", "test")
# IDX file stem per (split, kind); each may be stored raw or with a .gz suffix.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
NPZ_NAME = "mnist.npz"
NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
# Same origin and hash as tf_keras.datasets.mnist.load_data().
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

_FIX_SOURCE = (
    "pass --source_dir=DIR (a folder of MNIST IDX files or an mnist.npz) or set MNIST_DIR=DIR"
)
# IDX element types (third magic byte); only uint8 is valid for MNIST.
_IDX_TYPES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate expands data at most about 1032-fold; bounds what a gzip file can claim to hold.
_GZIP_MAX_RATIO = 1100
# numpy (< 2) arrays have at most 32 dimensions; MNIST files have 1 or 3.
_MAX_IDX_DIMS = 32

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Source:
    """MNIST arrays loaded from one place.

    Attributes:
        name: Where the data came from, e.g. ``"idx:/data/mnist"`` or ``"npz:/x/mnist.npz"``.
        checksum: SHA-256 hex digest over the source files' bytes, in a fixed order; prepared
            shards record it so they can be reused only for the same source.
        splits: Split name (``train``, ``test``) -> (images uint8 [N, 28, 28], labels int64 [N]).
    """

    name: str
    checksum: str
    splits: Dict[str, Tuple[np.ndarray, np.ndarray]]

    def num_records(self, split: str) -> int:
        """Returns the number of examples in ``split``."""
        return int(self.splits[split][1].shape[0])


def read_idx(path: PathLike) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or raw, detected from its first bytes).

    Args:
        path: The IDX file.

    Returns:
        A uint8 array shaped as the header says, e.g. [N, 28, 28] for images or [N] for labels.

    Raises:
        DataError: The file is missing, unreadable, not gzip/IDX, not uint8, or its payload does
            not match the dimensions in its header.
    """
    return _parse_idx(_read_bytes(path), path)


def _read_bytes(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix=_FIX_SOURCE) from None
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror})", path=path, fix=_FIX_SOURCE) from e


def _parse_idx(data: bytes, path: PathLike) -> np.ndarray:
    fix = "replace it with an intact copy of the MNIST file"
    compressed = data[:2] == _GZIP_MAGIC
    # Streamed, so a header's claimed size is checked before anything that big is decompressed.
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if compressed else io.BytesIO(data)
    try:
        return _parse_idx_stream(stream, len(data), compressed, path, fix)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
        raise DataError(f"corrupt gzip data ({e})", path=path, fix=fix) from e


def _parse_idx_stream(
    stream: BinaryIO, file_size: int, compressed: bool, path: PathLike, fix: str
) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"too short for an IDX header ({len(head)} bytes)", path=path, fix=fix)
    zero0, zero1, dtype_code, ndim = head
    if zero0 != 0 or zero1 != 0 or ndim == 0:
        raise DataError(
            f"not an IDX file (magic bytes {head.hex()}, expected 0000 08 0N)",
            path=path,
            fix=fix,
        )
    if dtype_code != 0x08:
        name = _IDX_TYPES.get(dtype_code, "unknown")
        raise DataError(
            f"IDX element type 0x{dtype_code:02x} ({name}) is not supported; MNIST files hold "
            "uint8 (0x08)",
            path=path,
            fix=fix,
        )
    header_len = 4 + 4 * ndim
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(
            f"truncated IDX header ({4 + len(dims)} bytes, need {header_len} for {ndim} "
            "dimensions)",
            path=path,
            fix=fix,
        )
    if ndim > _MAX_IDX_DIMS:
        raise DataError(
            f"IDX header claims {ndim} dimensions (at most {_MAX_IDX_DIMS} are supported)",
            path=path,
            fix=fix,
        )
    shape = struct.unpack(f">{ndim}I", dims)
    expected = math.prod(shape)  # Python ints: no overflow for absurd dimensions.
    # The payload can be no larger than the file allows, so an absurd header fails here, before
    # any allocation: raw files hold exactly their size, deflate expands at most ~1032-fold.
    capacity = file_size * _GZIP_MAX_RATIO if compressed else file_size - header_len
    if expected > capacity:
        holds = f"at most {capacity} (gzip)" if compressed else str(capacity)
        raise DataError(
            f"IDX payload truncated: header says shape {list(shape)} = {expected} bytes, "
            f"file holds {holds}",
            path=path,
            fix=fix,
        )
    payload = stream.read(expected)
    extra = stream.read(1)
    if len(payload) != expected or extra:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        actual = file_size - header_len if not compressed else len(payload)
        holds = str(actual) if not extra or not compressed else "more"
        raise DataError(
            f"IDX payload {what}: header says shape {list(shape)} = {expected} bytes, "
            f"file holds {holds}",
            path=path,
            fix=fix,
        )
    try:
        return np.frombuffer(payload, np.uint8).reshape(shape)
    except ValueError as e:  # E.g. a zero dimension beside dimensions too big for numpy.
        raise DataError(
            f"IDX header shape {list(shape)} is not a valid array shape ({e})", path=path, fix=fix
        ) from e


def _check_arrays(
    images: np.ndarray, labels: np.ndarray, images_path: str, labels_path: str
) -> Tuple[np.ndarray, np.ndarray]:
    """Validates one split's arrays and returns them as (uint8 images, int64 labels)."""
    fix = "use the original MNIST files"
    if images.dtype != np.uint8:
        raise DataError(f"images have dtype {images.dtype}, expected uint8", path=images_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"images have shape {list(images.shape)}, expected [N, 28, 28]",
            path=images_path,
            fix=fix,
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels have shape {list(labels.shape)} and dtype {labels.dtype}, expected an "
            "integer vector",
            path=labels_path,
            fix=fix,
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels.shape[0]} labels but {images.shape[0]} images in {images_path}",
            path=labels_path,
            fix=fix,
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"labels must lie in [0, {NUM_CLASSES}); found {int(labels.min())}.."
            f"{int(labels.max())}",
            path=labels_path,
            fix=fix,
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_sha256sums(folder: Path) -> Dict[str, str]:
    sums_path = folder / "SHA256SUMS"
    if not sums_path.is_file():
        return {}
    try:
        text = sums_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror})", path=sums_path) from e
    sums = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def load_idx_folder(folder: PathLike) -> Source:
    """Loads the four MNIST IDX files from ``folder`` (each raw or ``.gz``).

    When the folder has a ``SHA256SUMS`` file, each file listed there is checked against it.

    Raises:
        DataError: A file is missing, corrupt, or inconsistent with its partner.
    """
    folder = Path(folder)
    sums = _read_sha256sums(folder)
    overall = hashlib.sha256()
    arrays = {}
    for (split, kind), stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"missing {stem}[.gz] ({split} {kind})", path=folder, fix=_FIX_SOURCE)
        data = _read_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        if path.name in sums and sums[path.name] != digest:
            raise DataError(
                f"SHA-256 {digest[:12]}... does not match SHA256SUMS ({sums[path.name][:12]}...)",
                path=path,
                fix="replace it with an intact copy",
            )
        overall.update(data)
        arrays[split, kind] = (_parse_idx(data, path), str(path))
    splits = {}
    for split in SPLITS:
        (images, images_path), (labels, labels_path) = (
            arrays[split, "images"],
            arrays[split, "labels"],
        )
        splits[split] = _check_arrays(images, labels, images_path, labels_path)
    return Source(name=f"idx:{folder}", checksum=overall.hexdigest(), splits=splits)


def load_npz(path: PathLike) -> Source:
    """Loads Keras' ``mnist.npz`` layout (``x_train``, ``y_train``, ``x_test``, ``y_test``).

    Raises:
        DataError: The file is missing, not an npz archive, lacks a key, or holds bad arrays.
    """
    path = Path(path)
    data = _read_bytes(path)
    checksum = hashlib.sha256(data).hexdigest()
    fix = "use Keras' mnist.npz (keys x_train, y_train, x_test, y_test)"
    try:
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for keys in NPZ_KEYS.values() for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"npz archive lacks {', '.join(missing)}", path=path, fix=fix)
            raw = {split: (npz[x], npz[y]) for split, (x, y) in NPZ_KEYS.items()}
    except DataError:
        raise
    except Exception as e:  # np.load raises many types (ValueError, BadZipFile, OSError, ...).
        raise DataError(f"not a readable npz archive ({e})", path=path, fix=fix) from e
    splits = {
        split: _check_arrays(images, labels, f"{path}[{NPZ_KEYS[split][0]}]", str(path))
        for split, (images, labels) in raw.items()
    }
    return Source(name=f"npz:{path}", checksum=checksum, splits=splits)


def _load_path(path: PathLike, origin: str) -> Source:
    """Loads a source from an npz file, a folder of IDX files, or a folder holding mnist.npz."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".npz":
            return load_npz(path)
        raise DataError(
            f"{origin} points at a file that is not an .npz archive", path=path, fix=_FIX_SOURCE
        )
    if not path.is_dir():
        raise DataError(f"{origin} does not exist", path=path, fix=_FIX_SOURCE)
    if any(_find_idx(path, stem) for stem in IDX_FILES.values()):
        return load_idx_folder(path)
    if (path / NPZ_NAME).is_file():
        return load_npz(path / NPZ_NAME)
    raise DataError(
        f"{origin} holds neither MNIST IDX files (train-images-idx3-ubyte[.gz], ...) "
        f"nor {NPZ_NAME}",
        path=path,
        fix=_FIX_SOURCE,
    )


def keras_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Returns the Keras cache folder (``$KERAS_HOME`` or ``$HOME/.keras``) for ``env``."""
    if env.get("KERAS_HOME"):
        return Path(env["KERAS_HOME"])
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".keras"


def _download(cache_dir: Path) -> Path:
    """Downloads mnist.npz into ``cache_dir/datasets`` with tf_keras, checking its SHA-256.

    Uses the same ``get_file`` call as ``tf_keras.datasets.mnist.load_data()`` but with an explicit
    cache folder, because ``get_file`` silently falls back to /tmp/.keras when ``~/.keras`` does
    not exist yet, and we need the path to checksum the file.
    """
    from tf_keras.utils import get_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(
        get_file(
            NPZ_NAME,
            origin=KERAS_ORIGIN,
            file_hash=KERAS_SHA256,
            cache_dir=str(cache_dir),
            cache_subdir="datasets",
        )
    )


def _download_with_deadline(cache_dir: Path, timeout: float) -> Path:
    """Runs :func:`_download` with a socket timeout and a hard deadline (DNS ignores timeouts)."""
    result: Dict[str, object] = {}

    def target():
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            result["path"] = _download(cache_dir)
        except BaseException as e:  # Reported to the caller below.
            result["error"] = e
        finally:
            socket.setdefaulttimeout(previous)

    # A daemon thread, so a download stuck in name resolution cannot keep the process alive.
    thread = threading.Thread(target=target, name="mnist-download", daemon=True)
    thread.start()
    thread.join(timeout * 2 + 1)
    if "path" in result:
        return result["path"]  # type: ignore[return-value]
    reason = result.get("error", f"no answer within {timeout * 2 + 1:.0f} s")
    raise DataError(
        f"no MNIST source found and the download failed ({reason})",
        path=cache_dir / "datasets" / NPZ_NAME,
        fix=_FIX_SOURCE,
    )


def load_source(
    source_dir: Optional[PathLike] = None,
    env: Mapping[str, str] = os.environ,
    allow_download: bool = True,
    timeout: float = 10,
) -> Source:
    """Finds and loads MNIST.

    Looks, in order, at ``source_dir``, ``$MNIST_DIR``, the Keras cache
    (``$KERAS_HOME`` or ``$HOME/.keras``, file ``datasets/mnist.npz``), then downloads it through
    tf_keras (with its hash check) into that cache. An explicit ``source_dir`` or ``MNIST_DIR``
    that is wrong is an error rather than a reason to fall through, so a typo never silently
    trains on other data.

    Args:
        source_dir: A folder of IDX files, an ``.npz`` file, or a folder holding ``mnist.npz``.
        env: Environment to read ``MNIST_DIR``, ``KERAS_HOME`` and ``HOME`` from.
        allow_download: Whether to try the download as a last resort.
        timeout: Network timeout in seconds for the download; the whole attempt is abandoned
            after ``2 * timeout + 1`` seconds.

    Returns:
        The loaded and validated :class:`Source`.

    Raises:
        DataError: Nothing usable was found, or the files found are malformed.
    """
    if source_dir is not None and os.fspath(source_dir) != "":
        return _load_path(source_dir, "--source_dir")
    if env.get("MNIST_DIR"):
        return _load_path(env["MNIST_DIR"], "MNIST_DIR")
    cache_dir = keras_cache_dir(env)
    cached = cache_dir / "datasets" / NPZ_NAME
    if cached.is_file():
        return load_npz(cached)
    if not allow_download:
        raise DataError(
            f"no MNIST source found (no --source_dir, no MNIST_DIR, no {cached}) and downloading "
            "is disabled",
            fix=_FIX_SOURCE,
        )
    return load_npz(_download_with_deadline(cache_dir, timeout))
