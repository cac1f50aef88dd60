"""``prepare()``: converts an MNIST source into sharded TFRecord files plus ``dataset_spec.json``.

Atomicity: every shard and the spec are written under a ``.tmp-`` name and renamed when
complete, and the spec is renamed last, so a folder is complete exactly when its spec exists.
An interrupted run leaves no spec (any old spec is deleted before writing starts), and the next
run deletes the stale temporary files and writes everything again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
import tqdm

from data_pipeline.errors import DataError
from data_pipeline.sources import PathLike, Source, load_source
from data_pipeline.spec import (
    COMPRESSIONS,
    IMAGE_SHAPE,
    MNIST_FEATURES,
    NUM_CLASSES,
    SPEC_NAME,
    TMP_PREFIX,
    DatasetSpec,
    ExampleEncoder,
    ShardSpec,
    SplitSpec,
    load_spec,
)

_FIX_OVERWRITE = "pass --overwrite to replace it, or choose another --data_dir"


def shard_name(split: str, index: int, count: int, compression: Optional[str]) -> str:
    """Returns a shard's file name, e.g. ``train-00000-of-00055.tfrecord`` (``.gz`` if GZIP)."""
    suffix = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
    return f"{split}-{index:05d}-of-{count:05d}{suffix}"


def normalize_compression(compression: Optional[str]) -> Optional[str]:
    """Maps ``None``/``""``/``"NONE"`` to None and ``"gzip"`` to ``"GZIP"``; rejects the rest."""
    value = (compression or "").upper() or None
    value = None if value == "NONE" else value
    if value not in COMPRESSIONS:
        raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")
    return value


def _fsync_dir(path: Path) -> None:
    # Makes the renames themselves durable; not every filesystem allows opening a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_shard(
    path: Path,
    records: Sequence[bytes],
    compression: Optional[str],
    on_record,
) -> int:
    """Writes ``records`` to ``path`` via a temporary name; returns the final size in bytes."""
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    with tf.io.TFRecordWriter(str(tmp), options) as writer:
        for start in range(0, len(records), 250):
            for record in records[start : start + 250]:
                writer.write(record)
            on_record(len(records[start : start + 250]))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return os.stat(path).st_size


def _clean_tmp(data_dir: Path) -> None:
    for entry in data_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.is_file():
            entry.unlink()


def _reusable(
    data_dir: Path, source: Source, records_per_shard: int, compression: Optional[str]
) -> Optional[DatasetSpec]:
    """Returns the existing spec if it is complete and matches; raises if it holds other data."""
    if not (data_dir / SPEC_NAME).exists():
        return None
    try:
        spec = load_spec(data_dir)  # Also checks that every shard exists with the recorded size.
    except DataError:
        return None  # Our own output, damaged: rewrite it.
    settings = (spec.source_checksum, spec.records_per_shard, spec.compression)
    wanted = (source.checksum, records_per_shard, compression)
    if settings != wanted:
        raise DataError(
            "holds shards prepared from another source or with other settings "
            f"(checksum {spec.source_checksum[:12]}..., records_per_shard "
            f"{spec.records_per_shard}, compression {spec.compression}; now "
            f"{source.checksum[:12]}..., {records_per_shard}, {compression})",
            path=data_dir,
            fix=_FIX_OVERWRITE,
        )
    counts = {split: spec.num_records(split) for split in spec.splits}
    if counts != {split: source.num_records(split) for split in source.splits}:
        return None
    return spec


def prepare(
    data_dir: PathLike,
    source_dir: Optional[PathLike] = None,
    records_per_shard: int = 1000,
    compression: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_download: bool = True,
    *,
    source: Optional[Source] = None,
    num_threads: Optional[int] = None,
) -> DatasetSpec:
    """Writes MNIST as sharded TFRecord files and ``dataset_spec.json`` (the prepare job).

    Args:
        data_dir: Output folder (created if needed).
        source_dir: Where to find MNIST; see :func:`data_pipeline.load_source` for the fallbacks.
        records_per_shard: Records per shard; every shard but a split's last one is full.
        compression: None or ``"GZIP"``.
        overwrite: Rewrite even if the folder already holds matching complete output, and
            replace output prepared from another source or with other settings.
        progress: Show a tqdm progress bar on stderr.
        allow_download: Allow the tf_keras download when no local source is found.
        source: An already loaded source (skips ``source_dir`` resolution).
        num_threads: Shard-writing threads (default: up to 4, by CPU count).

    Returns:
        The spec of the (new or reused) dataset.

    Raises:
        DataError: No usable source, or ``data_dir`` holds other data and ``overwrite`` is False,
            or the folder cannot be written.
        ValueError: Bad ``records_per_shard`` or ``compression``.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    compression = normalize_compression(compression)
    if source is None:
        source = load_source(source_dir, allow_download=allow_download)
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            spec = _reusable(data_dir, source, records_per_shard, compression)
            if spec is not None:
                return spec
        # From here on the folder must not look complete until the new spec is in place.
        (data_dir / SPEC_NAME).unlink(missing_ok=True)
        _clean_tmp(data_dir)
        spec = _write_all(data_dir, source, records_per_shard, compression, progress, num_threads)
    except OSError as e:
        raise DataError(
            f"cannot write ({e.strerror or e})",
            path=e.filename or data_dir,
            fix="check the --data_dir path, its permissions and free space",
        ) from e
    return spec


def _write_all(
    data_dir: Path,
    source: Source,
    records_per_shard: int,
    compression: Optional[str],
    progress: bool,
    num_threads: Optional[int],
) -> DatasetSpec:
    encoder = ExampleEncoder(MNIST_FEATURES)
    # (split, shard index, shard name, first record, record count) for every shard.
    plan: List[Tuple[str, int, str, int, int]] = []
    for split, (_, labels) in source.splits.items():
        n = len(labels)
        count = max(1, -(-n // records_per_shard))
        for i in range(count):
            start = i * records_per_shard
            plan.append(
                (
                    split,
                    i,
                    shard_name(split, i, count, compression),
                    start,
                    min(records_per_shard, n - start),
                )
            )
    total = sum(len(labels) for _, labels in source.splits.values())
    bar = tqdm.tqdm(
        total=total, unit="ex", desc="prepare", file=sys.stderr, disable=not progress, leave=True
    )
    lock = threading.Lock()

    def on_record(n: int) -> None:
        with lock:
            bar.update(n)

    def write(item) -> int:
        split, _, name, start, count = item
        images, labels = source.splits[split]
        records = encoder.encode_many(images[start : start + count], labels[start : start + count])
        return _write_shard(data_dir / name, records, compression, on_record)

    # TFRecordWriter releases the GIL while writing and compressing, so threads overlap the
    # Python encoding of one shard with the I/O (and GZIP) of others.
    workers = num_threads or min(4, os.cpu_count() or 1)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers, "shard-writer") as pool:
            sizes = list(pool.map(write, plan))
    finally:
        bar.close()
    shards: Dict[str, List[ShardSpec]] = {split: [] for split in source.splits}
    for (split, _, name, _, count), size in zip(plan, sizes):
        shards[split].append(ShardSpec(file=name, num_records=count, num_bytes=size))
    spec = DatasetSpec(
        features=dict(MNIST_FEATURES),
        splits={
            split: SplitSpec(num_records=int(len(source.splits[split][1])), shards=tuple(s))
            for split, s in shards.items()
        },
        num_classes=NUM_CLASSES,
        image_shape=IMAGE_SHAPE,
        compression=compression,
        source_checksum=source.checksum,
        source_name=source.name,
        records_per_shard=records_per_shard,
        data_dir=os.fspath(data_dir),
    )
    _remove_unlisted_shards(data_dir, spec)
    _fsync_dir(data_dir)
    _write_spec(data_dir, spec)
    return spec


def _remove_unlisted_shards(data_dir: Path, spec: DatasetSpec) -> None:
    # Shards of an earlier run with another shard count would otherwise linger beside the new ones.
    listed = {s.file for split in spec.splits.values() for s in split.shards}
    for split in spec.splits:
        for path in data_dir.glob(f"{split}-*-of-*.tfrecord*"):
            if path.name not in listed:
                path.unlink()


def _write_spec(data_dir: Path, spec: DatasetSpec) -> None:
    tmp = data_dir / f"{TMP_PREFIX}{os.getpid()}-{SPEC_NAME}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_json(), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / SPEC_NAME)
    _fsync_dir(data_dir)
