"""The record schema (``dataset_spec.json``) and the tf.train.Example encoding it describes.

The spec sits beside the shards and is written last, so its presence marks a complete dataset.
It records, per feature, what a tutorial's CSV schema held (name, type, shape, isbyte,
length_type, default) plus the dtype and encoding, and per split the exact record count and the
shard files with their record counts and byte sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from data_pipeline.errors import DataError

SPEC_NAME = "dataset_spec.json"
FORMAT_VERSION = 1
COMPRESSIONS = (None, "GZIP")
# Temporary files start with this prefix; nothing reads them and prepare() deletes stale ones.
TMP_PREFIX = ".tmp-"

PathLike = Union[str, os.PathLike]
_FIX_PREPARE = "re-run --mode=prepare with --overwrite for this --data_dir"


# Largest count or size a spec may hold: TensorFlow stores counts as int64 and the reader adds
# one to a shard's count, so anything near 2**63 would overflow inside the graph.
_MAX_COUNT = 2**62
# Deflate expands data at most about 1032-fold.
_GZIP_MAX_RATIO = 1100


def _count(value: Any, key: str) -> int:
    """Returns ``value`` if it is a JSON integer in [0, 2**62]; raises ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r:.40}")
    if not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"{key} must lie in [0, 2**62], got {value!r:.40}")
    return value


def _text(value: Any, key: str) -> str:
    """Returns ``value`` if it is a JSON string; raises ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r:.40}")
    return value


def _list(value: Any, key: str) -> list:
    """Returns ``value`` if it is a JSON array; raises ValueError otherwise."""
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, got {value!r:.40}")
    return value


def _shape(value: Any, key: str) -> Tuple[int, ...]:
    """Returns a JSON array of non-negative integers as a tuple; raises ValueError otherwise."""
    return tuple(_count(d, key) for d in _list(value, key))


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature of the stored tf.train.Example records.

    Attributes:
        dtype: Element dtype after decoding (``uint8``, ``int64``).
        shape: Shape of one example's value after decoding.
        encoding: ``raw_bytes`` (one BytesList entry holding the C-order array bytes) or
            ``int64_list`` (values in an Int64List).
        length_type: ``fixed`` (every record has exactly ``shape``) as in tf.io.FixedLenFeature.
        default: Value used when a record lacks the feature (None: the feature is required).
    """

    dtype: str
    shape: Tuple[int, ...]
    encoding: str
    length_type: str = "fixed"
    default: Any = None

    @property
    def isbyte(self) -> bool:
        """Whether the feature is stored as bytes (a tf.string), to be decoded with decode_raw."""
        return self.encoding == "raw_bytes"

    @property
    def tf_type(self) -> str:
        """The tf.train.Feature list type: ``bytes_list`` or ``int64_list``."""
        return "bytes_list" if self.isbyte else "int64_list"

    def to_json(self) -> Dict[str, Any]:
        """Returns the JSON form, including the derived ``isbyte`` and ``tf_type`` fields."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "encoding": self.encoding,
            "tf_type": self.tf_type,
            "isbyte": self.isbyte,
            "length_type": self.length_type,
            "default": self.default,
        }

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> FeatureSpec:
        """Builds a FeatureSpec from its JSON form (derived fields are ignored)."""
        return cls(
            dtype=_text(obj["dtype"], "dtype"),
            shape=_shape(obj["shape"], "shape"),
            encoding=_text(obj["encoding"], "encoding"),
            length_type=_text(obj.get("length_type", "fixed"), "length_type"),
            default=obj.get("default"),
        )


IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# The label default lets serving requests (which have no label) parse with the same spec.
MNIST_FEATURES = {
    "image": FeatureSpec(dtype="uint8", shape=IMAGE_SHAPE, encoding="raw_bytes"),
    "label": FeatureSpec(dtype="int64", shape=(), encoding="int64_list", default=-1),
}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One shard file: its name (relative to the data folder), record count and size in bytes."""

    file: str
    num_records: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One split: total record count and its shards in order."""

    num_records: int
    shards: Tuple[ShardSpec, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Contents of ``dataset_spec.json``, plus the folder it was loaded from.

    Attributes:
        features: Feature name -> FeatureSpec.
        splits: Split name -> SplitSpec.
        num_classes: Number of label classes.
        image_shape: Shape of one decoded image, [28, 28, 1].
        compression: None or ``"GZIP"`` (the TFRecord compression of every shard).
        source_checksum: Checksum of the source the shards were made from.
        source_name: Where that source was found (informational).
        records_per_shard: Records in every shard but possibly the last of a split.
        format_version: Version of this spec layout.
        data_dir: Folder holding the spec and shards ("" for a spec not yet on disk).
    """

    features: Dict[str, FeatureSpec]
    splits: Dict[str, SplitSpec]
    num_classes: int
    image_shape: Tuple[int, ...]
    compression: Optional[str]
    source_checksum: str
    source_name: str = ""
    records_per_shard: int = 0
    format_version: int = FORMAT_VERSION
    data_dir: str = ""

    def files(self, split: str) -> List[str]:
        """Returns the full paths of ``split``'s shard files, in record order."""
        return [os.path.join(self.data_dir, s.file) for s in self._split(split).shards]

    def num_records(self, split: str) -> int:
        """Returns the number of records in ``split``."""
        return self._split(split).num_records

    def shard_records(self, split: str) -> List[int]:
        """Returns the record count of each of ``split``'s shards, in order."""
        return [s.num_records for s in self._split(split).shards]

    def _split(self, split: str) -> SplitSpec:
        if split not in self.splits:
            raise DataError(
                f"no split {split!r} (has {', '.join(sorted(self.splits))})",
                path=os.path.join(self.data_dir, SPEC_NAME),
                fix=f"use one of: {', '.join(sorted(self.splits))}",
            )
        return self.splits[split]

    def to_json(self) -> Dict[str, Any]:
        """Returns the JSON form written to ``dataset_spec.json``."""
        return {
            "format_version": self.format_version,
            "source": {"name": self.source_name, "checksum": self.source_checksum},
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "compression": self.compression,
            "records_per_shard": self.records_per_shard,
            "features": {name: f.to_json() for name, f in self.features.items()},
            "splits": {
                name: {
                    "num_records": s.num_records,
                    "shards": [dataclasses.asdict(shard) for shard in s.shards],
                }
                for name, s in self.splits.items()
            },
        }

    @classmethod
    def from_json(cls, obj: Dict[str, Any], data_dir: PathLike = "") -> DatasetSpec:
        """Parses and validates the JSON form.

        Raises:
            DataError: A key is missing or a value is inconsistent (e.g. split count != sum of
                shard counts).
        """
        path = os.path.join(data_dir, SPEC_NAME)
        try:
            version = _count(obj["format_version"], "format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"format_version {version} is not supported (expected {FORMAT_VERSION})",
                    path=path,
                    fix=_FIX_PREPARE,
                )
            splits = {
                name: SplitSpec(
                    num_records=_count(s["num_records"], "num_records"),
                    shards=tuple(
                        ShardSpec(
                            _text(x["file"], "file"),
                            _count(x["num_records"], "num_records"),
                            _count(x["num_bytes"], "num_bytes"),
                        )
                        for x in _list(s["shards"], "shards")
                    ),
                )
                for name, s in obj["splits"].items()
            }
            spec = cls(
                features={n: FeatureSpec.from_json(f) for n, f in obj["features"].items()},
                splits=splits,
                num_classes=_count(obj["num_classes"], "num_classes"),
                image_shape=_shape(obj["image_shape"], "image_shape"),
                compression=obj["compression"] or None,
                source_checksum=_text(obj["source"]["checksum"], "checksum"),
                source_name=_text(obj["source"].get("name", ""), "name"),
                records_per_shard=_count(obj.get("records_per_shard", 0), "records_per_shard"),
                format_version=version,
                data_dir=os.fspath(data_dir),
            )
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            problem = f"missing key {e}" if isinstance(e, KeyError) else f"malformed ({e})"
            raise DataError(problem, path=path, fix=_FIX_PREPARE) from e
        spec._validate(path)
        return spec

    def _validate(self, path: str) -> None:
        def bad(problem):
            return DataError(problem, path=path, fix=_FIX_PREPARE)

        if self.compression not in COMPRESSIONS:
            raise bad(f"unknown compression {self.compression!r:.40}")
        # The writer only writes MNIST's layout and the networks only take it; anything else
        # would fail deep inside TensorFlow (or allocate absurd tensors) instead of here.
        if self.image_shape != IMAGE_SHAPE:
            raise bad(f"image_shape {list(self.image_shape)} is not {list(IMAGE_SHAPE)}")
        if self.num_classes != NUM_CLASSES:
            raise bad(f"num_classes {self.num_classes} is not {NUM_CLASSES}")
        for name in ("image", "label"):
            if name not in self.features:
                raise bad(f"no {name!r} feature")
        if set(self.features) != {"image", "label"}:
            raise bad(f"features must be image and label, got {sorted(self.features)!r:.80}")
        image, label = self.features["image"], self.features["label"]
        if (
            not image.isbyte
            or image.dtype != "uint8"
            or image.shape != self.image_shape
            or image.length_type != "fixed"
        ):
            raise bad("the image feature must be raw uint8 bytes of shape image_shape")
        default_ok = label.default is None or (
            isinstance(label.default, int)
            and not isinstance(label.default, bool)
            and -_MAX_COUNT <= label.default <= _MAX_COUNT
        )
        if (
            label.dtype != "int64"
            or label.shape != ()
            or label.encoding != "int64_list"
            or label.length_type != "fixed"
            or not default_ok
        ):
            raise bad("the label feature must be an int64 scalar with an integer default")
        for name, split in self.splits.items():
            if not split.shards:
                raise bad(f"split {name!r} lists no shards")
            total = sum(s.num_records for s in split.shards)
            if total != split.num_records:
                raise bad(
                    f"split {name!r} says {split.num_records} records but its shards add up to "
                    f"{total}"
                )
            for shard in split.shards:
                # A record takes at least 16 bytes, gzip shrinks at most ~1032-fold: a count beyond
                # even this loose bound is a lie (and would overflow the reader's int64 sizes).
                capacity = shard.num_bytes * (1 if self.compression is None else _GZIP_MAX_RATIO)
                if shard.num_records > capacity:
                    raise bad(
                        f"shard {shard.file!r:.80} says {shard.num_records} records, more than its "
                        f"{shard.num_bytes} bytes can hold"
                    )
                if (
                    os.path.basename(shard.file) != shard.file
                    or shard.file.startswith(".")
                    or not shard.file
                    or "\0" in shard.file
                    or len(shard.file.encode("utf-8", "replace")) > 255
                ):
                    raise bad(f"shard name {shard.file!r} must be a plain file name")

    def check_files(self) -> None:
        """Checks that every listed shard exists with the recorded size (a cheap stat each).

        Raises:
            DataError: Naming the first missing or wrongly sized shard.
        """
        for split in self.splits:
            for shard, full in zip(self.splits[split].shards, self.files(split)):
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:
                    raise DataError(
                        f"shard listed in {SPEC_NAME} is missing", path=full, fix=_FIX_PREPARE
                    ) from None
                except (OSError, ValueError) as e:
                    raise DataError(
                        f"cannot stat shard listed in {SPEC_NAME} ({e})",
                        path=full,
                        fix=_FIX_PREPARE,
                    ) from e
                if size != shard.num_bytes:
                    raise DataError(
                        f"shard is {size} bytes but {SPEC_NAME} says {shard.num_bytes} "
                        "(truncated or replaced)",
                        path=full,
                        fix=_FIX_PREPARE,
                    )


def load_spec(data_dir: PathLike, *, check_records: bool = False) -> DatasetSpec:
    """Loads and validates ``data_dir/dataset_spec.json``.

    Args:
        data_dir: A folder written by :func:`data_pipeline.prepare`.
        check_records: Also read every shard to verify its record count and CRCs
            (:func:`data_pipeline.check_shards`); slower (about a second for MNIST).

    Returns:
        The spec, with ``data_dir`` set so :meth:`DatasetSpec.files` gives full paths.

    Raises:
        DataError: The folder is missing or empty, the spec is missing or unreadable, or a
            listed shard is missing or has the wrong size.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError("data folder does not exist", path=data_dir, fix=_PREPARE_HINT)
    if not os.listdir(data_dir):
        raise DataError("data folder is empty", path=data_dir, fix=_PREPARE_HINT)
    path = os.path.join(data_dir, SPEC_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"no {SPEC_NAME}: the folder was never prepared or preparing was interrupted",
            path=data_dir,
            fix=_PREPARE_HINT,
        ) from None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError.
        raise DataError(f"unreadable ({e})", path=path, fix=_FIX_PREPARE) from e
    if not isinstance(obj, dict):
        raise DataError("not a JSON object", path=path, fix=_FIX_PREPARE)
    spec = DatasetSpec.from_json(obj, data_dir)
    spec.check_files()
    if check_records:
        from data_pipeline.checks import check_shards

        check_shards(spec)
    return spec


_PREPARE_HINT = "run main.py --mode=prepare --data_dir=DIR first"


# --- tf.train.Example wire format, hand-encoded -------------------------------------------------
# Protobuf fields used (all length-delimited, wire type 2): Example.features = 1,
# Features.feature (map entry) = 1, entry key = 1, entry value = 2, Feature.bytes_list = 1,
# Feature.int64_list = 3, BytesList.value = 1, Int64List.value = 1 (packed).
# Encoding by hand is ~20x faster than building tf.train.Example messages in Python, and the
# output parses to the same message (tests compare against tf.train.Example).


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are ten-byte two's complement varints.
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _feature_bytes(feature: FeatureSpec, value: Any) -> bytes:
    if feature.isbyte:
        array = np.asarray(value, dtype=feature.dtype)
        if array.size != int(np.prod(feature.shape, dtype=np.int64)):
            raise ValueError(f"expected {feature.shape} elements, got shape {array.shape}")
        return _delimited(0x0A, _delimited(0x0A, array.tobytes()))
    values = np.asarray(value, dtype=np.int64).reshape(-1)
    return _delimited(0x1A, _delimited(0x0A, b"".join(_varint(int(v)) for v in values)))


class ExampleEncoder:
    """Serializes records to tf.train.Example bytes following a feature schema.

    Args:
        features: Feature name -> FeatureSpec; records are encoded in this order.
    """

    def __init__(self, features: Dict[str, FeatureSpec]):
        self._features = dict(features)
        self._order = list(features)
        self._keys = {name: _delimited(0x0A, name.encode()) for name in features}

    def encode(self, values: Dict[str, Any]) -> bytes:
        """Returns one serialized tf.train.Example holding ``values`` (name -> value)."""
        return _delimited(0x0A, b"".join(self._entry(name, values[name]) for name in self._order))

    def _entry(self, name: str, value: Any) -> bytes:
        feature = _feature_bytes(self._features[name], value)
        return _delimited(0x0A, self._keys[name] + _delimited(0x12, feature))

    def encode_many(self, images: np.ndarray, labels: np.ndarray) -> List[bytes]:
        """Fast path for the MNIST layout: returns one record per (image, label) pair.

        The image's raw bytes end its map entry, so everything before them is the same for every
        record and is computed once; label entries are cached per class.
        """
        shape = self._features["image"].shape
        row = int(np.prod(shape, dtype=np.int64))
        flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(labels), row).tobytes()
        image_prefix = self._entry("image", np.zeros(shape, np.uint8))[:-row]
        label_entries: Dict[int, bytes] = {}
        records = []
        for i, label in enumerate(np.asarray(labels).tolist()):
            tail = label_entries.get(label)
            if tail is None:
                tail = label_entries[label] = self._entry("label", label)
            records.append(_delimited(0x0A, image_prefix + flat[i * row : (i + 1) * row] + tail))
        return records


_MNIST_ENCODER = ExampleEncoder(MNIST_FEATURES)


def encode_example(image: np.ndarray, label: int) -> bytes:
    """Serializes one MNIST example in the records' own format.

    Args:
        image: uint8 array of 784 pixels ([28, 28] or [28, 28, 1]).
        label: Class id.

    Returns:
        A serialized tf.train.Example with features ``image`` (raw uint8 bytes) and ``label``.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return _MNIST_ENCODER.encode({"image": image, "label": int(label)})
