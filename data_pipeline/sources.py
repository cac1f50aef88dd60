"""Sources for prepare: IDX files (gzip or raw), Keras-layout ``.npz`` archives, image folders.

A source is a :class:`DataSource`: per split a record count and chunks of uint8 images and int64
labels from any record index, so the writer streams datasets bigger than memory.
:func:`open_source` opens one without reading its images; :func:`load_source` also reads them
into arrays (a :class:`Source`, for MNIST-sized data and existing callers).

Resolution order: the ``source_dir`` argument, then the ``MNIST_DIR`` environment variable, then
the Keras cache (``~/.keras/datasets/mnist.npz``), then a download of MNIST through ``tf_keras``
with a short timeout. Images may have any height, width and 1, 3 or 4 channels; every file is
validated before a record is written (headers against file sizes, gzip CRCs, label ranges,
matching counts and shapes), and record counts always come from the files' own headers.
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
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.spec import (
    MAX_CLASSES,
    check_class_names,
    check_image_shape,
    default_class_names,
)

SPLITS = ("train", "test")
# IDX file stems per (split, kind), first match wins; each may be raw or have a .gz suffix.
# The order of this dict is the order of the bytes in an IDX source's checksum.
IDX_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images-idx4-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte",),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images-idx4-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte",),
}
# Decoded images handed to the writer at once: bounds prepare's memory, whatever the dataset.
CHUNK_BYTES = 8 << 20
_BLOCK = 1 << 20
NPZ_NAME = "mnist.npz"
NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
# Same origin and hash as tf_keras.datasets.mnist.load_data().
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

_FIX_SOURCE = (
    "pass --source_dir=DIR (a folder of IDX files, an .npz archive or an image folder "
    "DIR/train/<class>/*.png) or set MNIST_DIR=DIR"
)
# IDX element types (third magic byte); only uint8 is supported.
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
# numpy (< 2) arrays have at most 32 dimensions; image and label files have 1, 3 or 4.
_MAX_IDX_DIMS = 32

PathLike = Union[str, os.PathLike]


class DataSource:
    """A labelled image dataset read split by split, in chunks of bounded size.

    The writer only talks to this interface, so a dataset never has to fit in memory: each
    split has a record count and :meth:`chunks` yields its records in a fixed order from any
    record index (which is what lets an interrupted prepare resume at its first missing shard).

    Attributes:
        name: Where the data came from, e.g. ``"idx:/data/mnist"`` or ``"folder:/data/flowers"``.
        checksum: Hex digest identifying the source's content; prepared shards record it so they
            are reused only for the same source.
        image_shape: (H, W, C) of every image.
        class_names: One name per class, in label order.
        resize: How images were fitted to ``image_shape``: None (they had that size) or
            ``"bilinear"`` (image folders prepared with an ``image_size``).
    """

    name: str
    checksum: str
    image_shape: Tuple[int, int, int]
    class_names: Tuple[str, ...]
    resize: Optional[str] = None

    @property
    def split_names(self) -> Tuple[str, ...]:
        """The splits, in writing order."""
        return SPLITS

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def num_records(self, split: str) -> int:
        """Returns the number of examples in ``split``."""
        raise NotImplementedError

    def chunks(
        self, split: str, start: int = 0, stop: Optional[int] = None, max_bytes: int = CHUNK_BYTES
    ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yields ``split``'s records ``[start, stop)`` in order, in chunks.

        Args:
            split: ``train`` or ``test``.
            start: First record.
            stop: One past the last record (default: the end of the split).
            max_bytes: Largest chunk of decoded images, in bytes (at least one image).

        Yields:
            ``(images uint8 [n, H, W, C], labels int64 [n])``.

        Raises:
            DataError: A file turns out to be unreadable or inconsistent while being read.
        """
        raise NotImplementedError

    def record_files(self, split: str) -> Optional[Sequence[str]]:
        """Each record's source file (relative to the source), or None if records have none."""
        del split
        return None

    def chunk_records(self, max_bytes: int) -> int:
        """Records per chunk so a chunk of decoded images stays within ``max_bytes``."""
        return max(1, max_bytes // math.prod(self.image_shape))


@dataclasses.dataclass(frozen=True)
class Source(DataSource):
    """A source held in memory as arrays (MNIST loaded by :func:`load_source`, or built in code).

    Attributes:
        name: Where the data came from.
        checksum: Identifies the content (SHA-256 over the source files' bytes for IDX/npz).
        splits: Split name -> (images uint8 [N, H, W] or [N, H, W, C], labels int64 [N]).
        class_names: Class names (default: ``"0" .. "K-1"`` with K = 1 + the largest train
            label). The arrays are trusted: validation belongs to whoever built them.
    """

    name: str
    checksum: str
    splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
    class_names: Tuple[str, ...] = ()

    def __post_init__(self):
        if not self.class_names:
            labels = self.splits["train"][1]
            count = int(labels.max()) + 1 if labels.size else 0
            object.__setattr__(self, "class_names", default_class_names(count))

    @property
    def split_names(self) -> Tuple[str, ...]:
        return tuple(self.splits)

    @property
    def image_shape(self) -> Tuple[int, int, int]:  # type: ignore[override]
        shape = self.splits["train"][0].shape[1:]
        return (*shape, 1) if len(shape) == 2 else tuple(shape)  # type: ignore[return-value]

    def num_records(self, split: str) -> int:
        return int(self.splits[split][1].shape[0])

    def chunks(self, split, start=0, stop=None, max_bytes=CHUNK_BYTES):
        images, labels = self.splits[split]
        stop = len(labels) if stop is None else stop
        step = self.chunk_records(max_bytes)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            yield (
                images[first:last].reshape(last - first, *self.image_shape),
                np.asarray(labels[first:last], np.int64),
            )


def _source_error(problem: str, path: PathLike, fix: Optional[str] = None) -> DataError:
    return DataError(problem, path=path, fix=fix or "replace it with an intact copy")


def _class_names_from_labels(
    train: np.ndarray,
    test: np.ndarray,
    train_path: PathLike,
    test_path: PathLike,
    names: Optional[Tuple[str, ...]] = None,
) -> Tuple[str, ...]:
    """Checks both splits' labels against the class count (given, or 1 + largest train label)."""
    fix = "labels must be class ids 0..K-1 with every test class also in train"
    for labels, path in ((train, train_path), (test, test_path)):
        if labels.size and labels.min() < 0:
            raise _source_error(f"negative label {int(labels.min())}", path, fix)
    count = len(names) if names else (int(train.max()) + 1 if train.size else 0)
    for labels, path in ((train, train_path), (test, test_path)):
        if labels.size and labels.max() >= count:
            raise _source_error(
                f"labels must lie in [0, {count}); found {int(labels.min())}..{int(labels.max())}",
                path,
                fix,
            )
    names = names or default_class_names(count)
    problem = check_class_names(names, count)
    if problem:
        raise _source_error(problem, train_path, fix)
    return names


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


_IDX_FIX = "replace it with an intact copy of the IDX file"


def _parse_idx(data: bytes, path: PathLike) -> np.ndarray:
    compressed = data[:2] == _GZIP_MAGIC
    # Streamed, so a header's claimed size is checked before anything that big is decompressed.
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if compressed else io.BytesIO(data)
    try:
        shape, header_len = _idx_header(stream, len(data), compressed, path)
        expected = math.prod(shape)
        payload = stream.read(expected)
        extra = stream.read(1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
        raise DataError(f"corrupt gzip data ({e})", path=path, fix=_IDX_FIX) from e
    actual = len(payload) if compressed else len(data) - header_len
    _check_idx_payload(shape, len(payload), bool(extra), actual, compressed, path)
    try:
        return np.frombuffer(payload, np.uint8).reshape(shape)
    except ValueError as e:  # E.g. a zero dimension beside dimensions too big for numpy.
        raise DataError(
            f"IDX header shape {list(shape)} is not a valid array shape ({e})",
            path=path,
            fix=_IDX_FIX,
        ) from e


def _idx_header(
    stream: BinaryIO, file_size: int, compressed: bool, path: PathLike
) -> Tuple[Tuple[int, ...], int]:
    """Reads and checks an IDX header; returns (shape, header length in bytes)."""
    fix = _IDX_FIX
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
            f"IDX element type 0x{dtype_code:02x} ({name}) is not supported; image and label "
            "files hold uint8 (0x08)",
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
    return shape, header_len


def _check_idx_payload(
    shape: Tuple[int, ...], got: int, extra: bool, actual: int, compressed: bool, path: PathLike
) -> None:
    expected = math.prod(shape)
    if got != expected or extra:
        what = "truncated" if got < expected else "has trailing bytes"
        holds = str(actual) if not extra or not compressed else "more"
        raise DataError(
            f"IDX payload {what}: header says shape {list(shape)} = {expected} bytes, "
            f"file holds {holds}",
            path=path,
            fix=_IDX_FIX,
        )


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that feeds every byte read through it into a hash."""

    def __init__(self, raw: BinaryIO, digest: Any):
        super().__init__()
        self._raw, self._digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        self._digest.update(memoryview(buffer)[:n])
        return n


def _open_stream(path: PathLike, compressed: bool) -> BinaryIO:
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class _IdxFile:
    path: Path
    shape: Tuple[int, ...]
    header_len: int
    compressed: bool


def _scan_idx(path: Path, digest: Any) -> _IdxFile:
    """Checks an IDX file end to end in one streamed pass (header, payload size, gzip CRC).

    Every raw byte also goes into ``digest``; memory stays at one read block however big the
    file is.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            compressed = f.read(2) == _GZIP_MAGIC
            f.seek(0)
            raw = io.BufferedReader(_HashingReader(f, digest), _BLOCK)
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            shape, header_len = _idx_header(stream, file_size, compressed, path)
            expected, got = math.prod(shape), 0
            while got < expected:
                block = stream.read(min(_BLOCK, expected - got))
                if not block:
                    break
                got += len(block)
            extra = bool(stream.read(1))
            while raw.read(_BLOCK):  # The rest of the file, so the digest covers all of it.
                pass
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix=_FIX_SOURCE) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"corrupt gzip data ({e})", path=path, fix=_IDX_FIX) from e
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror or e})", path=path, fix=_IDX_FIX) from e
    actual = got if compressed else file_size - header_len
    _check_idx_payload(shape, got, extra, actual, compressed, path)
    return _IdxFile(path, shape, header_len, compressed)


def _idx_image_shape(info: _IdxFile) -> Tuple[int, int, int]:
    shape = info.shape[1:]
    image_shape = (*shape, 1) if len(shape) == 2 else tuple(shape)
    problem = None if len(info.shape) in (3, 4) else "must be [N, H, W] or [N, H, W, C]"
    problem = problem or check_image_shape(image_shape)  # type: ignore[arg-type]
    if problem:
        raise _source_error(
            f"images have shape {list(info.shape)}: {problem}",
            info.path,
            "IDX images are uint8 [N, H, W] (idx3) or [N, H, W, C] with C in 1, 3, 4 (idx4)",
        )
    return image_shape  # type: ignore[return-value]


def _find_idx(folder: Path, stems: Sequence[str]) -> Optional[Path]:
    for stem in stems:
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


class IdxSource(DataSource):
    """MNIST-style IDX files, streamed: images are read chunk by chunk, never all at once.

    File names are MNIST's (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``); images may
    instead be ``[N, H, W, C]`` in ``*-images-idx4-ubyte``. Opening checks every file in one
    streamed pass (headers, sizes, gzip CRCs, the folder's ``SHA256SUMS`` if present) and reads
    the labels; the class count is 1 + the largest train label.

    Raises (on construction):
        DataError: A file is missing, corrupt, or inconsistent with its partner.
    """

    def __init__(self, folder: PathLike):
        folder = Path(folder)
        sums = _read_sha256sums(folder)
        overall = hashlib.sha256()
        self._images: Dict[str, _IdxFile] = {}
        self._labels: Dict[str, np.ndarray] = {}
        label_paths = {}
        for split in SPLITS:
            for kind in ("images", "labels"):
                stems = IDX_NAMES[split, kind]
                path = _find_idx(folder, stems)
                if path is None:
                    raise DataError(
                        f"missing {stems[0]}[.gz] ({split} {kind})", path=folder, fix=_FIX_SOURCE
                    )
                digest = hashlib.sha256()
                info = _scan_idx(path, _Tee(digest, overall))
                if path.name in sums and sums[path.name] != digest.hexdigest():
                    raise DataError(
                        f"SHA-256 {digest.hexdigest()[:12]}... does not match SHA256SUMS "
                        f"({sums[path.name][:12]}...)",
                        path=path,
                        fix="replace it with an intact copy",
                    )
                if kind == "images":
                    self._images[split] = info
                else:
                    label_paths[split] = path
                    self._labels[split] = self._read_labels(info)
        self.name = f"idx:{folder}"
        self.checksum = overall.hexdigest()
        self.image_shape = _idx_image_shape(self._images["train"])
        for split in SPLITS:
            images, labels = self._images[split], self._labels[split]
            if _idx_image_shape(images) != self.image_shape:
                raise _source_error(
                    f"images have shape {list(images.shape)}, expected [N, "
                    f"{', '.join(map(str, self._images['train'].shape[1:]))}] like "
                    f"{self._images['train'].path.name}",
                    images.path,
                )
            if len(labels) != images.shape[0]:
                raise _source_error(
                    f"{len(labels)} labels but {images.shape[0]} images in {images.path}",
                    label_paths[split],
                )
        self.class_names = _class_names_from_labels(
            self._labels["train"], self._labels["test"], label_paths["train"], label_paths["test"]
        )

    @staticmethod
    def _read_labels(info: _IdxFile) -> np.ndarray:
        labels = read_idx(info.path)
        if labels.ndim != 1:
            raise _source_error(
                f"labels have shape {list(labels.shape)}, expected [N]", info.path, _IDX_FIX
            )
        return labels.astype(np.int64)

    def num_records(self, split: str) -> int:
        return len(self._labels[split])

    def chunks(self, split, start=0, stop=None, max_bytes=CHUNK_BYTES):
        info, labels = self._images[split], self._labels[split]
        stop = len(labels) if stop is None else stop
        row = math.prod(self.image_shape)
        step = self.chunk_records(max_bytes)
        try:
            with _open_stream(info.path, info.compressed) as stream:
                stream.seek(info.header_len + start * row)  # gzip: decompresses up to there.
                for first in range(start, stop, step):
                    n = min(step, stop - first)
                    data = stream.read(n * row)
                    if len(data) != n * row:
                        raise _source_error("file shrank while being read", info.path)
                    images = np.frombuffer(data, np.uint8).reshape(n, *self.image_shape)
                    yield images, labels[first : first + n]
        except (EOFError, zlib.error, OSError) as e:
            raise _source_error(f"cannot read file ({e})", info.path) from e


class _Tee:
    """Feeds the same bytes to several hashes."""

    def __init__(self, *digests: Any):
        self._digests = digests

    def update(self, data) -> None:
        for digest in self._digests:
            digest.update(data)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix=_FIX_SOURCE) from None
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror})", path=path, fix=_FIX_SOURCE) from e
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _NpyMember:
    name: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    header_len: int


class NpzSource(DataSource):
    """A Keras-layout ``.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``), streamed.

    Members are read through ``zipfile`` (``np.savez`` and ``np.savez_compressed`` alike):
    each ``.npy`` header is checked against the size the archive records for the member before
    anything is read, labels are read whole, images chunk by chunk. Images are uint8
    ``[N, H, W]`` or ``[N, H, W, C]``; an optional ``class_names`` member (a string vector)
    names the classes, else the class count is 1 + the largest train label.

    Raises (on construction):
        DataError: The file is missing, not an npz archive, lacks a key, or holds bad arrays.
    """

    _FIX = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.checksum = _hash_file(self.path)
        self.name = f"npz:{self.path}"
        self._members: Dict[str, _NpyMember] = {}
        labels: Dict[str, np.ndarray] = {}
        names = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                keys = [k for pair in NPZ_KEYS.values() for k in pair]
                missing = [k for k in keys if not self._has(archive, k)]
                if missing:
                    raise _source_error(
                        f"npz archive lacks {', '.join(missing)}", self.path, self._FIX
                    )
                for split, (x, y) in NPZ_KEYS.items():
                    self._members[split] = self._member(archive, x)
                    labels[split] = self._read_labels(archive, self._member(archive, y))
                if self._has(archive, "class_names"):
                    names = self._read_names(archive)
        except DataError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
            raise _source_error(f"not a readable npz archive ({e})", self.path, self._FIX) from e
        self._labels = labels
        first = self._members["train"]
        self.image_shape = self._image_shape(first)
        for split in SPLITS:
            member = self._members[split]
            if self._image_shape(member) != self.image_shape:
                raise _source_error(
                    f"{member.name} has shape {list(member.shape)}, expected [N, "
                    f"{', '.join(map(str, first.shape[1:]))}] like {first.name}",
                    self.path,
                    self._FIX,
                )
            if len(labels[split]) != member.shape[0]:
                raise _source_error(
                    f"{len(labels[split])} labels but {member.shape[0]} images in {member.name}",
                    self.path,
                    self._FIX,
                )
        self.class_names = _class_names_from_labels(
            labels["train"], labels["test"], self.path, self.path, names
        )

    @staticmethod
    def _has(archive: zipfile.ZipFile, key: str) -> bool:
        return f"{key}.npy" in archive.NameToInfo

    def _member(self, archive: zipfile.ZipFile, key: str) -> _NpyMember:
        """Reads and checks one member's .npy header against the archive's own sizes."""
        info = archive.getinfo(f"{key}.npy")
        archive_size = self.path.stat().st_size
        stored = info.compress_type == zipfile.ZIP_STORED
        bound = info.compress_size * (1 if stored else _GZIP_MAX_RATIO)
        if info.compress_size > archive_size or info.file_size > bound:
            raise _source_error(
                f"member {key} claims {info.file_size} bytes, more than the archive holds",
                self.path,
            )
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{key}: .npy format version {version} is not supported")
            header_len = f.tell()
        claimed = math.prod(shape) * dtype.itemsize
        if claimed != info.file_size - header_len:
            raise _source_error(
                f"{key}: .npy header claims shape {list(shape)} of {dtype} = {claimed} bytes but "
                f"the archive member holds {info.file_size - header_len}",
                self.path,
            )
        if dtype.hasobject or (fortran and len(shape) > 1):
            raise _source_error(
                f"{key} is a {'Fortran-order' if fortran else 'object'} array", self.path, self._FIX
            )
        return _NpyMember(key, tuple(shape), dtype, header_len)

    def _read_labels(self, archive: zipfile.ZipFile, member: _NpyMember) -> np.ndarray:
        if len(member.shape) != 1 or member.dtype.kind not in "iu":
            raise _source_error(
                f"{member.name} has shape {list(member.shape)} and dtype {member.dtype}, "
                "expected an integer vector",
                self.path,
                self._FIX,
            )
        with archive.open(f"{member.name}.npy") as f:
            data = f.read()[member.header_len :]
        return np.frombuffer(data, member.dtype).astype(np.int64)

    def _read_names(self, archive: zipfile.ZipFile) -> Tuple[str, ...]:
        member = self._member(archive, "class_names")
        if len(member.shape) != 1 or member.dtype.kind != "U" or member.shape[0] > MAX_CLASSES:
            raise _source_error(
                f"class_names has shape {list(member.shape)} and dtype {member.dtype}, expected "
                "a vector of strings",
                self.path,
                self._FIX,
            )
        with archive.open("class_names.npy") as f:
            return tuple(str(n) for n in np.lib.format.read_array(f, allow_pickle=False))

    def _image_shape(self, member: _NpyMember) -> Tuple[int, int, int]:
        shape = member.shape[1:]
        image_shape = (*shape, 1) if len(shape) == 2 else tuple(shape)
        problem = (
            None if member.dtype == np.uint8 else f"dtype {member.dtype}, expected uint8"
        ) or (None if len(member.shape) in (3, 4) else "must be [N, H, W] or [N, H, W, C]")
        problem = problem or check_image_shape(image_shape)  # type: ignore[arg-type]
        if problem:
            raise _source_error(
                f"{member.name} has shape {list(member.shape)}: {problem}", self.path, self._FIX
            )
        return image_shape  # type: ignore[return-value]

    def num_records(self, split: str) -> int:
        return len(self._labels[split])

    def chunks(self, split, start=0, stop=None, max_bytes=CHUNK_BYTES):
        member, labels = self._members[split], self._labels[split]
        stop = len(labels) if stop is None else stop
        row = math.prod(self.image_shape)
        step = self.chunk_records(max_bytes)
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{member.name}.npy") as f:
                f.seek(member.header_len + start * row)
                for first in range(start, stop, step):
                    n = min(step, stop - first)
                    data = f.read(n * row)
                    if len(data) != n * row:
                        raise _source_error(f"{member.name} ends early", self.path)
                    images = np.frombuffer(data, np.uint8).reshape(n, *self.image_shape)
                    yield images, labels[first : first + n]
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise _source_error(f"cannot read {member.name} ({e})", self.path) from e


def _open_path(path: PathLike, origin: str, image_size, channels) -> DataSource:
    """Opens an npz file, a folder of IDX files, a folder holding mnist.npz or an image folder."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "train").is_dir():
        from data_pipeline.images import ImageFolderSource  # Imports TensorFlow.

        return ImageFolderSource(path, image_size=image_size, channels=channels)
    if image_size is not None or channels is not None:
        raise DataError(
            "--image_size and --channels apply only to image folders (SRC/train/<class>/...)",
            path=path,
            fix="drop them for IDX or npz sources",
        )
    if path.is_file():
        if path.suffix == ".npz":
            return NpzSource(path)
        raise DataError(
            f"{origin} points at a file that is not an .npz archive", path=path, fix=_FIX_SOURCE
        )
    if not path.is_dir():
        raise DataError(f"{origin} does not exist", path=path, fix=_FIX_SOURCE)
    if any(_find_idx(path, stems) for stems in IDX_NAMES.values()):
        return IdxSource(path)
    if (path / NPZ_NAME).is_file():
        return NpzSource(path / NPZ_NAME)
    raise DataError(
        f"{origin} holds neither MNIST IDX files (train-images-idx3-ubyte[.gz], ...), "
        f"nor {NPZ_NAME}, nor an image folder (train/<class>/*.png)",
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


def open_source(
    source_dir: Optional[PathLike] = None,
    env: Mapping[str, str] = os.environ,
    allow_download: bool = True,
    timeout: float = 10,
    *,
    image_size: Optional[Tuple[int, int]] = None,
    channels: Optional[int] = None,
) -> DataSource:
    """Finds and opens a source, checking its files but not reading its images yet.

    Looks, in order, at ``source_dir``, ``$MNIST_DIR``, the Keras cache
    (``$KERAS_HOME`` or ``$HOME/.keras``, file ``datasets/mnist.npz``), then downloads MNIST
    through tf_keras (with its hash check) into that cache. An explicit ``source_dir`` or
    ``MNIST_DIR`` that is wrong is an error rather than a reason to fall through, so a typo never
    silently trains on other data.

    Args:
        source_dir: A folder of IDX files, an ``.npz`` file, a folder holding ``mnist.npz``, or
            an image folder (``train/<class>/*.png|jpg``, ``test/<class>/...``).
        env: Environment to read ``MNIST_DIR``, ``KERAS_HOME`` and ``HOME`` from.
        allow_download: Whether to try the download as a last resort.
        timeout: Network timeout in seconds for the download; the whole attempt is abandoned
            after ``2 * timeout + 1`` seconds.
        image_size: Image folders only: resize every image to (height, width).
        channels: Image folders only: 1 or 3 (default: the first train image's).

    Returns:
        The validated source.

    Raises:
        DataError: Nothing usable was found, or the files found are malformed.
    """
    if source_dir is not None and os.fspath(source_dir) != "":
        return _open_path(source_dir, "--source_dir", image_size, channels)
    if env.get("MNIST_DIR"):
        return _open_path(env["MNIST_DIR"], "MNIST_DIR", image_size, channels)
    cache_dir = keras_cache_dir(env)
    cached = cache_dir / "datasets" / NPZ_NAME
    if cached.is_file():
        return NpzSource(cached)
    if not allow_download:
        raise DataError(
            f"no MNIST source found (no --source_dir, no MNIST_DIR, no {cached}) and downloading "
            "is disabled",
            fix=_FIX_SOURCE,
        )
    return NpzSource(_download_with_deadline(cache_dir, timeout))


def load_source(
    source_dir: Optional[PathLike] = None,
    env: Mapping[str, str] = os.environ,
    allow_download: bool = True,
    timeout: float = 10,
) -> Source:
    """Finds a source like :func:`open_source` and reads it into memory.

    Returns:
        A :class:`Source` whose ``splits`` hold (images uint8 [N, H, W] for one channel, else
        [N, H, W, C]; labels int64 [N]), e.g. MNIST's [N, 28, 28].

    Raises:
        DataError: Nothing usable was found, or the files found are malformed.
    """
    return materialize(open_source(source_dir, env, allow_download, timeout))


def materialize(source: DataSource) -> Source:
    """Reads every record of ``source`` into an in-memory :class:`Source`."""
    shape = source.image_shape if source.image_shape[-1] != 1 else source.image_shape[:2]
    splits = {}
    for split in source.split_names:
        images = np.empty((source.num_records(split), *shape), np.uint8)
        labels = np.empty(source.num_records(split), np.int64)
        first = 0
        for chunk_images, chunk_labels in source.chunks(split):
            images[first : first + len(chunk_labels)] = chunk_images.reshape(-1, *shape)
            labels[first : first + len(chunk_labels)] = chunk_labels
            first += len(chunk_labels)
        splits[split] = (images, labels)
    return Source(source.name, source.checksum, splits, source.class_names)
