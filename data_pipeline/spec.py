"""The record schema (``dataset_spec.json``) and the tf.train.Example encoding it describes.

The spec sits beside the shards and is written last, so its presence marks a complete dataset.
It records, per feature, what a tutorial's CSV schema held (name, type, shape, isbyte,
length_type, default) plus the dtype and encoding, the image shape, class count and class names,
and per split the exact record count and the shard files with their record counts and byte sizes.
Specs written before class names existed load with the names ``"0" .. "N-1"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from data_pipeline.errors import DataError

SPEC_NAME = "dataset_spec.json"
FORMAT_VERSION = 1
COMPRESSIONS = (None, "GZIP")
# How prepare may have fitted image files to the spec's image_shape (None: not resized).
RESIZE_METHODS = (None, "bilinear")
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


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a file name inside the data folder (no folder part, not hidden)."""
    return (
        bool(name)
        and os.path.basename(name) == name
        and not name.startswith(".")
        and "\0" not in name
        and len(name.encode("utf-8", "replace")) <= 255
    )


def _delimited_size(payload: int) -> int:
    return 1 + len(_varint(payload)) + payload


def record_size_range(image: FeatureSpec) -> Tuple[int, int]:
    """Returns the smallest and largest TFRecord record (framing included) for ``image``.

    Computed from the wire format without building a record; the two differ only by the
    label's varint (1 byte for labels 0..127, 10 for negative labels).
    """
    pixels = int(np.prod(image.shape, dtype=np.int64))
    image_entry = _delimited_size(7 + _delimited_size(_delimited_size(_delimited_size(pixels))))
    sizes = []
    for label_bytes in (1, 10):
        label_entry = _delimited_size(7 + _delimited_size(_delimited_size(label_bytes)))
        sizes.append(_delimited_size(image_entry + label_entry) + 16)  # TFRecord framing.
    return sizes[0], sizes[1]


def _dict(value: Any, key: str) -> dict:
    """Returns ``value`` if it is a JSON object; raises ValueError otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object, got {value!r:.40}")
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
CHANNELS = (1, 3, 4)
# Bounds a spec must respect: one image of at most 8192x8192 RGBA (256 MiB decoded as uint8,
# 1 GiB as the reader's float32) and a class count a softmax layer can take.
MAX_IMAGE_SIDE = 65536
MAX_IMAGE_BYTES = 2**28
MAX_CLASSES = 100_000
_MAX_CLASS_NAME = 200


def image_features(image_shape: Tuple[int, ...]) -> Dict[str, FeatureSpec]:
    """Returns the record schema for uint8 images of ``image_shape`` (H, W, C) and int64 labels."""
    # The label default lets serving requests (which have no label) parse with the same spec.
    return {
        "image": FeatureSpec(dtype="uint8", shape=tuple(image_shape), encoding="raw_bytes"),
        "label": FeatureSpec(dtype="int64", shape=(), encoding="int64_list", default=-1),
    }


MNIST_FEATURES = image_features(IMAGE_SHAPE)


def default_class_names(num_classes: int) -> Tuple[str, ...]:
    """Returns ``("0", "1", ..., str(num_classes - 1))``, the names of unnamed classes."""
    return tuple(str(i) for i in range(num_classes))


def check_image_shape(image_shape: Tuple[int, ...]) -> Optional[str]:
    """Returns what is wrong with an (H, W, C) image shape, or None if it is usable."""
    if len(image_shape) != 3:
        return f"image_shape {list(image_shape)!s:.60} must have 3 dimensions (H, W, C)"
    height, width, channels = image_shape
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE):
        return f"image_shape {list(image_shape)!s:.60} needs sides in [1, {MAX_IMAGE_SIDE}]"
    if channels not in CHANNELS:
        return f"image_shape {list(image_shape)!s:.60} needs 1, 3 or 4 channels"
    if height * width * channels > MAX_IMAGE_BYTES:
        return f"image_shape {list(image_shape)} exceeds {MAX_IMAGE_BYTES} bytes per image"
    return None


def check_class_names(class_names: Tuple[str, ...], num_classes: int) -> Optional[str]:
    """Returns what is wrong with a class count and its names, or None if they are usable."""
    if not 2 <= num_classes <= MAX_CLASSES:
        return f"num_classes {num_classes!s:.40} must lie in [2, {MAX_CLASSES}]"
    if len(class_names) != num_classes:
        return f"{len(class_names)} class_names for num_classes {num_classes}"
    for name in class_names:
        if (
            not isinstance(name, str)
            or not name
            or len(name) > _MAX_CLASS_NAME
            or not name.isprintable()
        ):
            return f"class name {name!r:.60} must be 1-{_MAX_CLASS_NAME} printable characters"
    if len(set(class_names)) != len(class_names):
        return "class_names must be unique"
    return None


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
        num_classes: Number of label classes (at least 2).
        image_shape: Shape of one decoded image (H, W, C), e.g. (28, 28, 1) for MNIST.
        compression: None or ``"GZIP"`` (the TFRecord compression of every shard).
        source_checksum: Checksum of the source the shards were made from.
        source_name: Where that source was found (informational).
        records_per_shard: Records in every shard but possibly the last of a split.
        format_version: Version of this spec layout.
        data_dir: Folder holding the spec and shards ("" for a spec not yet on disk).
        class_names: One name per class, in label order (default ``"0" .. "N-1"``).
        fingerprint: Digest of the source checksum, settings and shard plan that produced the
            shards ("" in specs written before prepare could resume).
        manifests: Split -> file (beside the shards) listing each record's source file, one
            per line, for sources made of files (image folders).
        resize: How prepare fitted decoded image files to ``image_shape``: None (no resizing:
            every image had that size, or the source held arrays) or ``"bilinear"``. Image
            files are decoded to ``image_shape[2]`` channels (grey <-> RGB converted). Specs
            written before this key existed load as None. Predicting new image files
            (``data_pipeline.inputs``) decodes them the same way.
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
    class_names: Tuple[str, ...] = ()
    fingerprint: str = ""
    manifests: Dict[str, str] = dataclasses.field(default_factory=dict)
    resize: Optional[str] = None

    def __post_init__(self):
        # Specs written before class names existed: classes are named by their index. Only
        # for a sane count, so a spec lying about it fails validation instead of allocating.
        if not self.class_names and 2 <= self.num_classes <= MAX_CLASSES:
            object.__setattr__(self, "class_names", default_class_names(self.num_classes))

    def files(self, split: str) -> List[str]:
        """Returns the full paths of ``split``'s shard files, in record order."""
        return [os.path.join(self.data_dir, s.file) for s in self._split(split).shards]

    def num_records(self, split: str) -> int:
        """Returns the number of records in ``split``."""
        return self._split(split).num_records

    @property
    def dataset_id(self) -> str:
        """A digest of what the records hold (16 hex digits).

        It covers the source's checksum, the image shape, the resizing, the class names and each
        split's record count, and not how the records are stored (shard size, compression,
        folder): the same data prepared into another folder or with other shards has the same
        id. Checkpoints record it (``provenance``) to tell which dataset a model was trained on.
        """
        content = {
            "source": self.source_checksum,
            "image_shape": list(self.image_shape),
            "resize": self.resize,
            "class_names": list(self.class_names),
            "records": {name: split.num_records for name, split in sorted(self.splits.items())},
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

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
            "class_names": list(self.class_names),
            "compression": self.compression,
            "records_per_shard": self.records_per_shard,
            "fingerprint": self.fingerprint,
            "manifests": dict(self.manifests),
            "resize": self.resize,
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
                class_names=tuple(
                    _text(n, "class name") for n in _list(obj.get("class_names", []), "class_names")
                ),
                fingerprint=_text(obj.get("fingerprint", ""), "fingerprint"),
                manifests={
                    _text(k, "split"): _text(v, "manifest")
                    for k, v in _dict(obj.get("manifests", {}), "manifests").items()
                },
                resize=obj.get("resize"),
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
        if self.resize not in RESIZE_METHODS:
            raise bad(f"unknown resize {self.resize!r:.40}")
        # Anything outside these bounds would fail deep inside TensorFlow (or allocate absurd
        # tensors) instead of here.
        problem = check_image_shape(self.image_shape) or check_class_names(
            self.class_names, self.num_classes
        )
        if problem:
            raise bad(problem)
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
                if not _plain_name(shard.file):
                    raise bad(f"shard name {shard.file!r} must be a plain file name")
        for split, manifest in self.manifests.items():
            if split not in self.splits or not _plain_name(manifest):
                raise bad(f"manifest {split!r:.40}: {manifest!r:.80} is not a plain file name")

    def record_files(self, split: str) -> Optional[List[str]]:
        """Returns the source file of each of ``split``'s records, or None if not recorded.

        Image-folder sources record them (paths relative to the source folder, in record
        order); IDX and npz sources have no per-record files.

        Raises:
            DataError: The manifest is listed but missing, unreadable or of the wrong length.
        """
        self._split(split)
        if split not in self.manifests:
            return None
        path = os.path.join(self.data_dir, self.manifests[split])
        try:
            with open(path, encoding="utf-8") as f:
                names = f.read().split("\n")[:-1]
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable manifest ({e})", path=path, fix=_FIX_PREPARE) from e
        if len(names) != self.num_records(split):
            raise DataError(
                f"manifest lists {len(names)} files for {self.num_records(split)} records",
                path=path,
                fix=_FIX_PREPARE,
            )
        return names

    def check_record_size(self) -> None:
        """Checks the first record of each split's first shard against ``image_shape``.

        Reads 8 bytes per split (TFRecord's length field; uncompressed shards only), so a spec
        whose image shape differs from the records' fails on loading, not deep inside training.

        Raises:
            DataError: Naming the spec, the shard and the sizes.
        """
        if self.compression is not None:
            return
        low, high = (size - 16 for size in record_size_range(self.features["image"]))
        for split in self.splits:
            path = self.files(split)[0]
            try:
                with open(path, "rb") as f:
                    head = f.read(8)
            except OSError as e:
                raise DataError(f"cannot read ({e})", path=path, fix=_FIX_PREPARE) from e
            if len(head) == 8 and not low <= int.from_bytes(head, "little") <= high:
                raise DataError(
                    f"image_shape {list(self.image_shape)} does not match the records: the "
                    f"first record of {os.path.basename(path)} has "
                    f"{int.from_bytes(head, 'little')} bytes, not {low}..{high} (or the shard "
                    "is corrupt)",
                    path=os.path.join(self.data_dir, SPEC_NAME),
                    fix=_FIX_PREPARE,
                )

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
    spec.check_record_size()
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
        """Fast path for the image + label layout: returns one record per (image, label) pair.

        The image's raw bytes end its map entry, so everything before them is the same for every
        record and is computed once; the label entry and the record's own header are cached per
        class (images all have the same size).
        """
        shape = self._features["image"].shape
        row = int(np.prod(shape, dtype=np.int64))
        flat = memoryview(
            np.ascontiguousarray(images, dtype=np.uint8).reshape(len(labels), row).tobytes()
        )
        image_prefix = self._entry("image", np.zeros(shape, np.uint8))[:-row]
        ends: Dict[int, Tuple[bytes, bytes]] = {}
        records = []
        for i, label in enumerate(np.asarray(labels).tolist()):
            end = ends.get(label)
            if end is None:
                tail = self._entry("label", label)
                head = bytes((0x0A,)) + _varint(len(image_prefix) + row + len(tail))
                end = ends[label] = (head + image_prefix, tail)
            records.append(b"".join((end[0], flat[i * row : (i + 1) * row], end[1])))
        return records


def encode_example(image: np.ndarray, label: int) -> bytes:
    """Serializes one example in the records' own format, for any image shape.

    Args:
        image: uint8 array, [H, W] (one channel) or [H, W, C]; MNIST's is [28, 28] or
            [28, 28, 1].
        label: Class id.

    Returns:
        A serialized tf.train.Example with features ``image`` (raw uint8 bytes) and ``label``.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {list(image.shape)}")
    shape = image.shape if image.ndim == 3 else (*image.shape, 1)
    return ExampleEncoder(image_features(shape)).encode({"image": image, "label": int(label)})
