"""The tf.data input pipeline over prepared shards, and the shared record decoding.

Shape of the pipeline: shard list from the spec (never a glob) -> optional per-worker file
sharding -> file shuffle -> parallel interleave of TFRecordDatasets (each shard's record count is
checked against the spec as it is read) -> cache -> record shuffle -> repeat -> batch ->
vectorised ``tf.io.parse_example`` + ``decode_raw`` -> prefetch. Parsing after batching does one
op call per batch instead of one per record, which is what makes 50k+ examples/s possible.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.sources import PathLike
from data_pipeline.spec import (
    IMAGE_SHAPE,
    MNIST_FEATURES,
    SPEC_NAME,
    DatasetSpec,
    load_spec,
    record_size_range,
)

AUTOTUNE = tf.data.AUTOTUNE
# Prefix of the in-graph record-count assertion; translate_errors() recognises it.
COUNT_MISMATCH = "data_pipeline: record count mismatch in shard "
# Messages of the in-graph label range and image size assertions; translate_errors() knows them.
LABEL_RANGE = "data_pipeline: label out of range"
IMAGE_SIZE_MISMATCH = "data_pipeline: image size mismatch"
# Files read at once when num_parallel_reads is AUTOTUNE: enough to hide I/O latency on a few
# cores without holding many decoded shards in memory.
_DEFAULT_CYCLE = 8
# Serialized records a shard reader hands on at once, and what all parallel readers may hold
# ahead of the pipeline: MNIST's whole shards fit, large images' shards are streamed.
_READ_CHUNK_BYTES = 8 << 20
_READ_AHEAD_BYTES = 256 << 20
# tf.data traces these through AutoGraph, which would rewrite their Python source first (0.4 s
# per process); they hold no Python control flow on tensors, so there is nothing to convert.
_NOT_CONVERTED = tf.autograph.experimental.do_not_convert


def _feature_description(
    features: Dict[str, Any], with_labels: bool
) -> Dict[str, tf.io.FixedLenFeature]:
    description = {}
    for name, feature in features.items():
        if name == "label" and not with_labels:
            continue
        if feature.isbyte:
            description[name] = tf.io.FixedLenFeature([], tf.string)
        else:
            description[name] = tf.io.FixedLenFeature(
                list(feature.shape), tf.as_dtype(feature.dtype), default_value=feature.default
            )
    return description


@_NOT_CONVERTED
def parse_serialized(
    serialized: tf.Tensor, spec: Optional[DatasetSpec] = None, *, with_labels: bool = True
) -> Tuple[Dict[str, tf.Tensor], Optional[tf.Tensor]]:
    """Decodes a batch of serialized tf.train.Example records (the reader's own decoding).

    Also meant for a SavedModel serving receiver: the label is optional (default -1), so
    requests built with :func:`data_pipeline.encode_example` or without a label both parse.

    Args:
        serialized: String tensor [batch] of serialized examples.
        spec: The dataset spec; None means the standard MNIST layout.
        with_labels: Whether to parse and return labels (False returns None as labels).

    Returns:
        ``({"image": float32 [batch, H, W, C] in [0, 1]}, labels int64 [batch] or None)`` with
        ``(H, W, C)`` the spec's ``image_shape`` (MNIST's (28, 28, 1) without a spec).
    """
    features = spec.features if spec is not None else MNIST_FEATURES
    image_shape = tuple(spec.image_shape) if spec is not None else IMAGE_SHAPE
    parsed = tf.io.parse_example(serialized, _feature_description(features, with_labels))
    pixels = tf.io.decode_raw(parsed["image"], tf.uint8)
    # Records whose images have another size would otherwise fail in the reshape below with a
    # message that names neither the data nor the spec.
    size = int(np.prod(image_shape))
    shape = tf.shape(pixels, out_type=tf.int64)
    assertion = tf.debugging.Assert(
        tf.equal(tf.size(pixels, out_type=tf.int64), shape[0] * size),
        [f"{IMAGE_SIZE_MISMATCH}: expected {size} bytes per image, records hold", shape[-1]],
        summarize=1,
    )
    with tf.control_dependencies([assertion]):
        pixels = tf.identity(pixels)
    image = tf.reshape(pixels, [-1, *image_shape])
    image.set_shape([serialized.shape[0], *image_shape])  # Keeps a static batch size.
    image = tf.cast(image, tf.float32) * (1.0 / 255.0)
    return {"image": image}, (parsed["label"] if with_labels else None)


@_NOT_CONVERTED
def check_labels(
    features: Dict[str, tf.Tensor], labels: tf.Tensor, num_classes: int
) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """Fails with a LABEL_RANGE assertion if a label lies outside ``[0, num_classes)``.

    Without it a bad label surfaces deep inside the model (a metric's scatter op, or the loss)
    as an error that names neither the data nor the fix. One reduction per batch.

    Args:
        features: The parsed features, passed through.
        labels: int64 [batch] labels.
        num_classes: Number of classes from the spec.

    Returns:
        ``(features, labels)``, labels gated on the check.
    """
    in_range = tf.reduce_all(tf.logical_and(labels >= 0, labels < num_classes))
    assertion = tf.debugging.Assert(
        in_range,
        [
            f"{LABEL_RANGE}: labels must lie in [0, {num_classes}), found",
            tf.reduce_min(labels),
            "..",
            tf.reduce_max(labels),
        ],
        summarize=1,
    )
    with tf.control_dependencies([assertion]):
        return features, tf.identity(labels)


@_NOT_CONVERTED
def random_shift(image: tf.Tensor, max_shift: int, seed: Optional[int] = None) -> tf.Tensor:
    """Shifts each image of a batch by its own random offset of up to ``max_shift`` pixels.

    Vacated pixels become 0 (background). Vectorised: one pad and two gathers per batch.

    Args:
        image: float32 [batch, height, width, channels].
        max_shift: Largest shift along each axis, in pixels.
        seed: Op seed for the offsets.

    Returns:
        The shifted batch, same shape as ``image``.
    """
    height, width = image.shape[1], image.shape[2]
    padded = tf.pad(image, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    offsets = tf.random.uniform(
        [tf.shape(image)[0], 2], 0, 2 * max_shift + 1, dtype=tf.int32, seed=seed
    )
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(shifted, cols, axis=2, batch_dims=1)


@_NOT_CONVERTED
def _read_shard(
    path: tf.Tensor, expected: tf.Tensor, partial: tf.Tensor, compression: str, chunk: int
):
    """Records of one shard, failing with a COUNT_MISMATCH assertion if the count is off.

    A full shard is read as up to expected+1 records (so one extra record is noticed); a shard
    cut short by ``limit`` as ``expected`` records. Records pass in batches of at most ``chunk``
    (the whole shard for small records, so memory stays bounded for large ones) while a scan
    counts them; an empty sentinel batch at the end checks the count, which makes an empty file
    fail too. The check costs a few ops per batch, not per record.
    """
    to_read = tf.where(partial, expected, expected + 1)
    batches = tf.data.TFRecordDataset(path, compression_type=compression).take(to_read)
    sentinel = tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))

    @_NOT_CONVERTED
    def check(count, records):
        size = tf.size(records, out_type=tf.int64)
        message = tf.strings.join(
            [
                COUNT_MISMATCH,
                path,
                ": read ",
                tf.strings.as_string(count),
                " records, ",
                SPEC_NAME,
                " says ",
                tf.strings.as_string(expected),
            ]
        )
        # Only the sentinel (the one empty batch) checks the total.
        ok = tf.logical_or(size > 0, tf.equal(count, expected))
        assertion = tf.debugging.Assert(ok, [message], summarize=1)
        with tf.control_dependencies([assertion]):
            return count + size, tf.identity(records)

    return (
        batches.batch(chunk).concatenate(sentinel).scan(tf.constant(0, tf.int64), check).unbatch()
    )


def _select_files(
    spec: DatasetSpec, split: str, limit: Optional[int]
) -> List[Tuple[str, int, bool]]:
    """Returns (path, records to yield, partial) per shard, cut to the first ``limit`` records."""
    entries = []
    remaining = spec.num_records(split) if limit is None else int(limit)
    if remaining < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    for path, count in zip(spec.files(split), spec.shard_records(split)):
        if remaining <= 0:
            break
        take = min(count, remaining)
        entries.append((path, take, take < count))
        remaining -= take
    return entries


def shuffle_buffer_records(spec: DatasetSpec, shuffle_buffer: int, shuffle_mb: float) -> int:
    """Records in the shuffle buffer: ``shuffle_buffer``, fewer if they exceed ``shuffle_mb``."""
    record_bytes = record_size_range(spec.features["image"])[1]
    return max(1, min(shuffle_buffer, int(shuffle_mb * 10**6 // record_bytes)))


def make_dataset(
    data_dir: PathLike,
    split: str,
    batch_size: int,
    *,
    num_epochs: Optional[int] = 1,
    shuffle: bool = False,
    seed: Optional[int] = None,
    deterministic: bool = False,
    drop_remainder: bool = False,
    cache: bool = False,
    shuffle_buffer: int = 10_000,
    shuffle_mb: float = 256,
    num_parallel_reads: int = AUTOTUNE,
    input_context: Optional[tf.distribute.InputContext] = None,
    limit: Optional[int] = None,
    augment_shift: int = 0,
) -> tf.data.Dataset:
    """Builds the input pipeline for one split of a prepared dataset.

    Args:
        data_dir: Folder written by :func:`data_pipeline.prepare`.
        split: ``train`` or ``test``.
        batch_size: Global batch size (divided by the replica count when ``input_context`` is
            given).
        num_epochs: Passes over the data; None repeats forever.
        shuffle: Shuffle shard order and records (buffer of ``shuffle_buffer``).
        seed: Seed for both shuffles.
        deterministic: Keep element order fixed in the parallel stages, so that with a ``seed``
            every run yields the same sequence (slightly slower). Without ``shuffle`` the order
            is always the stored order.
        drop_remainder: Drop a final short batch (for static batch shapes).
        cache: Cache the serialized records in memory after the first pass (opt-in: the
            split must fit in memory).
        shuffle_buffer: Record shuffle buffer size, in records.
        shuffle_mb: Also bound the shuffle buffer in MB of serialized records (10**6 bytes):
            the buffer holds ``min(shuffle_buffer, shuffle_mb / record size)`` records, so large
            images do not fill memory (MNIST: the full 10,000).
        num_parallel_reads: Shards read concurrently (AUTOTUNE: up to 8, parallelism tuned).
        input_context: A tf.distribute.InputContext: each input pipeline then reads only its own
            share of the shard files (``input_pipeline_id`` of ``num_input_pipelines``) and
            batches with the per-replica batch size.
        limit: Use only the first ``limit`` records of the split (in stored order, before any
            sharding or shuffling).
        augment_shift: If > 0, shift every image by a random offset of up to this many pixels
            per axis (training augmentation; seeded by ``seed``).

    Returns:
        A dataset of ``({"image": float32 [batch, H, W, C]}, labels int64 [batch])`` with
        ``(H, W, C)`` the spec's ``image_shape``.

    Raises:
        DataError: The folder, spec or shards are missing or inconsistent (errors found while
            iterating surface as TensorFlow errors; wrap the loop in
            :func:`data_pipeline.translate_errors`).
        ValueError: Bad ``batch_size`` or ``limit``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment_shift < 0:
        raise ValueError(f"augment_shift must be >= 0, got {augment_shift}")
    spec = load_spec(data_dir)
    entries = _select_files(spec, split, limit)
    if input_context is not None:
        pipelines = input_context.num_input_pipelines
        if len(entries) < pipelines:
            raise DataError(
                f"split {split!r} has {len(entries)} shard(s) for {pipelines} input pipelines",
                path=os.path.join(spec.data_dir, SPEC_NAME),
                fix="prepare with a smaller --records_per_shard so every worker gets a shard",
            )
        entries = entries[input_context.input_pipeline_id :: pipelines]
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ordered = deterministic or not shuffle
    paths = tf.constant([e[0] for e in entries], tf.string)
    counts = tf.constant([e[1] for e in entries], tf.int64)
    partial = tf.constant([e[2] for e in entries], tf.bool)
    files = tf.data.Dataset.from_tensor_slices((paths, counts, partial))
    if shuffle and not cache:
        # With a cache the first pass's file order is frozen anyway; record shuffling remains.
        files = files.shuffle(max(1, len(entries)), seed=seed, reshuffle_each_iteration=True)
    if num_parallel_reads == AUTOTUNE:
        cycle_length, parallel_calls = _DEFAULT_CYCLE, AUTOTUNE
    else:
        cycle_length, parallel_calls = max(1, num_parallel_reads), max(1, num_parallel_reads)
    record_bytes = record_size_range(spec.features["image"])[1]
    # Unshuffled: whole shards one after another (block = a full shard) keep the stored order
    # while the other open shards are read ahead in parallel, as far as the byte budget allows.
    block_length = 1 if shuffle else max([e[1] for e in entries] or [1])
    read_ahead = max(1, _READ_AHEAD_BYTES // (2 * block_length * record_bytes))
    cycle_length = max(1, min(cycle_length, len(entries), read_ahead))
    compression = spec.compression or ""
    chunk = max(1, _READ_CHUNK_BYTES // record_bytes)
    records = files.interleave(
        lambda path, count, cut: _read_shard(path, count, cut, compression, chunk),
        cycle_length=cycle_length,
        block_length=block_length,
        num_parallel_calls=parallel_calls,
        deterministic=ordered,
    )
    if cache:
        records = records.cache()
    if shuffle:
        records = records.shuffle(
            shuffle_buffer_records(spec, shuffle_buffer, shuffle_mb),
            seed=seed,
            reshuffle_each_iteration=True,
        )
    if num_epochs is None:
        records = records.repeat()
    elif num_epochs != 1:
        records = records.repeat(num_epochs)
    batches = records.batch(batch_size, drop_remainder=drop_remainder)
    dataset = batches.map(
        lambda serialized: check_labels(*parse_serialized(serialized, spec), spec.num_classes),
        num_parallel_calls=AUTOTUNE,
        deterministic=ordered,
    )
    if augment_shift:
        # A sequential map, so a seeded run draws the same offsets for the same batches.
        dataset = dataset.map(
            lambda features, labels: (
                {**features, "image": random_shift(features["image"], augment_shift, seed)},
                labels,
            )
        )
    return dataset.prefetch(AUTOTUNE)


def make_input_fn(
    data_dir: PathLike, split: str, batch_size: int, **kwargs: Any
) -> Callable[..., tf.data.Dataset]:
    """Returns an Estimator ``input_fn`` for :func:`make_dataset` with these arguments.

    The spec is checked now, so a bad ``data_dir`` fails before the Estimator starts.

    Args:
        data_dir: Folder written by :func:`data_pipeline.prepare`.
        split: ``train`` or ``test``.
        batch_size: Global batch size.
        **kwargs: Any keyword argument of :func:`make_dataset`.

    Returns:
        ``input_fn(input_context=None) -> tf.data.Dataset``; an ``input_context`` passed by a
        distribution strategy takes precedence over one given in ``kwargs``.
    """
    load_spec(data_dir).num_records(split)  # Fail fast on a bad folder or split name.

    def input_fn(input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        options = dict(kwargs)
        if input_context is not None:
            options["input_context"] = input_context
        return make_dataset(data_dir, split, batch_size, **options)

    return input_fn
