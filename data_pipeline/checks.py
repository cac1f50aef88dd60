"""Thorough shard verification and translation of TensorFlow read errors into DataError."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, Iterator, Optional, Union

import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.reader import (
    COUNT_MISMATCH,
    IMAGE_SIZE_MISMATCH,
    LABEL_RANGE,
    parse_serialized,
)
from data_pipeline.sources import PathLike
from data_pipeline.spec import SPEC_NAME, DatasetSpec, load_spec, record_size_range

_FIX = "re-run --mode=prepare with --overwrite for this --data_dir"
_SHARD_PATH = re.compile(r"(/?[^\s\"'\[\]{}():,]+\.tfrecord(?:\.gz)?)")


def check_shards(
    data_dir: Union[PathLike, DatasetSpec], split: Optional[str] = None, *, parse: bool = True
) -> Dict[str, int]:
    """Reads every shard and verifies its CRCs, record count and (optionally) records.

    Args:
        data_dir: A prepared folder, or its already loaded spec.
        split: Only this split (default: all).
        parse: Also decode every record as the reader does (catches records that pass the CRC
            check but do not match the schema).

    Returns:
        Split name -> records verified.

    Raises:
        DataError: Naming the first bad shard (missing, wrong size, corrupt, wrong count).
    """
    spec = data_dir if isinstance(data_dir, DatasetSpec) else load_spec(data_dir)
    splits = [split] if split is not None else list(spec.splits)
    verified = {}
    for name in splits:
        for path, expected in zip(spec.files(name), spec.shard_records(name)):
            count = _count_records(spec, path, parse)
            if count != expected:
                raise DataError(
                    f"holds {count} records but {SPEC_NAME} says {expected}",
                    path=path,
                    fix=_FIX,
                )
        verified[name] = spec.num_records(name)
    return verified


def _count_records(spec: DatasetSpec, path: str, parse: bool) -> int:
    if not os.path.isfile(path):
        raise DataError(f"shard listed in {SPEC_NAME} is missing", path=path, fix=_FIX)
    # Batches of at most 1024 records and about 16 MB, whatever the image size.
    batch = max(1, min(1024, (16 << 20) // record_size_range(spec.features["image"])[1]))
    batches = tf.data.TFRecordDataset(path, compression_type=spec.compression or "").batch(batch)
    count = 0
    try:
        for batch in batches:
            if parse:
                _, labels = parse_serialized(batch, spec)
                labels = labels.numpy()
                bad = (labels < 0) | (labels >= spec.num_classes)
                if bad.any():
                    first = int(bad.argmax())
                    raise DataError(
                        f"record {count + first} has label {int(labels[first])}; labels must lie "
                        f"in [0, {spec.num_classes})",
                        path=path,
                        fix=_FIX,
                    )
            count += int(batch.shape[0])
    except tf.errors.DataLossError as e:
        raise DataError(
            f"corrupt shard (after {count} good records: {_first_line(e)})", path=path, fix=_FIX
        ) from e
    except tf.errors.InvalidArgumentError as e:
        raise DataError(
            f"records do not match the schema in {SPEC_NAME} ({_first_line(e)})",
            path=path,
            fix=_FIX,
        ) from e
    return count


def _first_line(error: tf.errors.OpError) -> str:
    # TF prefixes messages with "{{function_node ...}}" and appends op traces; keep the gist.
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message or str(error))
    text = re.sub(r"\s*\[\[\{\{node .*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*", "", text)
    return " ".join(text.split()[:40])


def to_data_error(
    error: tf.errors.OpError, data_dir: Optional[PathLike] = None, split: Optional[str] = None
) -> Optional[DataError]:
    """Returns the DataError a TensorFlow read error stands for, or None if it is not one.

    The shard is taken from the message when it names one; otherwise, for a data-looking error
    with ``data_dir`` known, :func:`check_shards` finds the bad shard.
    """
    message = error.message or str(error)
    if COUNT_MISMATCH in message:
        tail = message.split(COUNT_MISMATCH, 1)[1]
        match = re.match(r"(.+?): read (\d+) records, \S+ says (\d+)", tail)
        if match:
            path, read, expected = match.group(1), int(match.group(2)), int(match.group(3))
            found = f"more than {expected}" if read > expected else str(read)
            return DataError(
                f"holds {found} records but {SPEC_NAME} says {expected}", path=path, fix=_FIX
            )
    is_data_loss = isinstance(error, tf.errors.DataLossError)
    looks_like_data = is_data_loss or any(
        marker in message
        for marker in (
            "Could not parse example",
            "DecodeRaw",
            "Feature: image",
            "Feature: label",
            LABEL_RANGE,
            IMAGE_SIZE_MISMATCH,
        )
    )
    if not looks_like_data and COUNT_MISMATCH not in message:
        return None
    match = _SHARD_PATH.search(message)
    if match:
        return DataError(f"cannot read shard ({_first_line(error)})", path=match.group(1), fix=_FIX)
    if data_dir is not None:
        try:
            check_shards(data_dir, split)
        except DataError as found:
            return found
    return DataError(
        f"corrupt or inconsistent data while reading ({_first_line(error)})",
        path=data_dir,
        fix=f"{_FIX} (data_pipeline.check_shards names the bad shard)",
    )


@contextlib.contextmanager
def translate_errors(
    data_dir: Optional[PathLike] = None, split: Optional[str] = None
) -> Iterator[None]:
    """Turns TensorFlow read errors raised inside the block into a one-line DataError.

    ``tf.errors.DataLossError`` (CRC failure, bad gzip) and data-related
    ``tf.errors.InvalidArgumentError`` (record count different from the spec, unparsable record)
    become a DataError naming the shard; other errors pass through unchanged. Also usable as a
    decorator.

    Args:
        data_dir: The prepared folder being read; lets the bad shard be found by
            :func:`check_shards` when TensorFlow's message does not name it.
        split: The split being read, to limit that search.
    """
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        translated = to_data_error(e, data_dir, split)
        if translated is None:
            raise
        raise translated from e
