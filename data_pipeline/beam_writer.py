"""``prepare`` on Apache Beam: the same records as the local engine, from a laptop to a cluster.

As in TensorFlow Datasets' ``BeamWriter``, each record is keyed by a salted MD5 of its
``(split, index)``, bucketed by hash range into the split's shards, and each shard is sorted by
key, so the shards' bytes depend only on the source and the settings, not on the runner, the
worker count or the bundle boundaries: two runs give byte-identical shards. Each shard holds
about ``records_per_shard`` records (hash buckets are not exactly equal).

The key depends on the record's position, not its content, so the driver knows every record's
shard and place in it before anything is read. Two pipeline shapes follow from the sources:

- Image folders (one file per record, the sources that grow to millions): the driver lists each
  shard's files in key order; one work item per shard, in which a worker reads, decodes,
  encodes (the local engine's :class:`~data_pipeline.spec.ExampleEncoder`) and writes the whole
  shard. No record crosses Beam's shuffle: only file names travel, memory stays flat, and the
  work spreads over the workers shard by shard.
- IDX and ``.npz`` sources (one file, read from its start): ranges of records are read and
  encoded in the workers, grouped by shard (Beam's ``GroupByKey``: every record crosses the
  shuffle), sorted and written.

Every shard is written under a temporary name and renamed into place, then journalled as a
small JSON file in ``.tmp-beam-work/`` (its record count, size and, for image folders, its
records' files). The driver writes the manifests and ``dataset_spec.json`` last, after the
pipeline succeeded, so a failed or killed run leaves no spec. A rerun with the same source and
settings keeps the journalled shards and writes only the others (image folders read only the
missing shards' files; IDX and ``.npz`` sources are read whole again).

Runner: without ``--runner`` in ``beam_options``, Beam's Python ``FnApiRunner`` runs the
pipeline here with one worker process per core (``direct_running_mode=multi_processing``,
``direct_num_workers``); it is named explicitly because ``DirectRunner`` first tries the Go
Prism runner, downloaded from GitHub. With ``--runner=...`` (Flink, Spark, Dataflow) Beam's
options are passed through unchanged.

Errors: the source is opened (and IDX/npz files checked) in the driver before anything is
written; a file that fails in a worker (an image that does not decode, or of another size)
stops the pipeline, and its :class:`DataError` is carried back through Beam's error text and
raised again here as the same one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import threading
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from data_pipeline.diskfull import disk_full_error
from data_pipeline.errors import DataError
from data_pipeline.sources import DataSource
from data_pipeline.spec import (
    SPEC_NAME,
    TMP_PREFIX,
    DatasetSpec,
    ExampleEncoder,
    ShardSpec,
    image_features,
    load_spec,
)
from data_pipeline.writer import (
    _FIX_OVERWRITE,
    PROGRESS_NAME,
    _atomic_write_text,
    _clean_tmp,
    _fingerprint,
    _fsync_dir,
    _remove_unlisted_shards,
    _reusable,
    _write_spec,
    beam_fingerprint,
    shard_name,
    spec_of,
    write_error,
)

WORK_DIR = f"{TMP_PREFIX}beam-work"
LOG_NAME = "beam-log.txt"  # In WORK_DIR: Beam's and the workers' logs, kept after a failure.
_FINGERPRINT_FILE = "FINGERPRINT"
# Changing the salt changes every Beam-prepared dataset's shard contents.
_SALT = b"data_pipeline.beam_writer v1\0"
# A worker's DataError crosses Beam (as text in the runner's error) between these markers.
_ERROR_START, _ERROR_END = "<<data_pipeline.DataError ", " data_pipeline.DataError>>"
_ERROR_TEXT = re.compile(re.escape(_ERROR_START) + r"(\{.*?\})" + re.escape(_ERROR_END))
# Work items per worker for sources read by seeking into one file (IDX, npz): few, because
# each item reads (gzip: decompresses) its file up to its first record.
_ITEMS_PER_WORKER = 4


def record_key(split: str, index: int) -> bytes:
    """The 16-byte key a record is bucketed and sorted by (salted MD5, as TFDS hashes keys)."""
    return hashlib.md5(_SALT + f"{split}\0{index}".encode()).digest()


def bucket(key: bytes, num_shards: int) -> int:
    """The shard of ``key``: by hash range (not modulo), as TFDS' ``get_bucket_number``."""
    return int.from_bytes(key, "big") * num_shards >> 128


def _error_text(error: DataError) -> str:
    payload = {"problem": error.problem, "path": error.path, "fix": error.fix}
    return _ERROR_START + json.dumps(payload) + _ERROR_END


def _error_from_text(text: str) -> Optional[DataError]:
    match = _ERROR_TEXT.search(text)
    if match is None:
        return None
    payload = json.loads(match.group(1))
    return DataError(payload["problem"], path=payload["path"], fix=payload["fix"])


class _WorkerDoFn(beam.DoFn):
    """Imports TensorFlow in ``setup``, in the worker, with one thread for its ops.

    Holds only plain Python state when pickled.
    """

    def __init__(self, image_shape):
        self._image_shape = tuple(image_shape)
        self._tf = self._encoder = None

    def setup(self):
        import tfenv  # noqa: F401 - before TensorFlow, in this worker process

        # isort: split
        import tensorflow as tf  # Imported once per worker, not per bundle.

        # One thread per TensorFlow pool: the workers are the parallelism (one per core here;
        # Dataflow and Flink's process environments also run one Python worker per core).
        # Without this, each worker's decoding would spread over every core and the workers
        # contend. Decoding still overlaps encoding and writing in the main thread, so a
        # worker keeps about 1.3 cores busy (docs/preparing-at-scale.md). Only possible
        # before the worker's first TensorFlow op; later calls raise.
        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
            tf.config.threading.set_intra_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow already ran in this process (e.g. Beam's in-process runner).
        self._tf = tf
        self._encoder = ExampleEncoder(image_features(self._image_shape))


def _write_shard(tf, records, path: str, compression: str, journal: str, files) -> None:
    """Writes ``records`` as the shard ``path`` (temporary name, fsync, rename), then journals it.

    ``files``: the records' source files, for image folders (else None).
    """
    folder, name = os.path.split(path)
    # Unique per attempt: a runner may retry a shard, or run it twice, at the same time.
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    count = 0
    try:
        options = tf.io.TFRecordOptions(compression_type=compression)
        with tf.io.TFRecordWriter(tmp, options) as writer:
            for record in records:
                writer.write(record)
                count += 1
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    entry = {"num_records": count, "num_bytes": os.stat(path).st_size, "files": files}
    _atomic_write_text(Path(journal), json.dumps(entry))


class _EncodeShard(_WorkerDoFn):
    """Image folders: reads one shard's files (already in key order), encodes and writes it."""

    def __init__(self, image_shape, data_dir, names, compression, work_dir, chunk_bytes):
        super().__init__(image_shape)
        self._data_dir = data_dir
        self._names = dict(names)
        self._compression = compression or ""
        self._work_dir = work_dir
        self._chunk_bytes = chunk_bytes

    def process(self, item):
        split, shard, part = item
        name = self._names[split, shard]

        def records():
            for images, labels in part.chunks(split, 0, None, self._chunk_bytes):
                yield from self._encoder.encode_many(images, labels)

        try:
            _write_shard(
                self._tf,
                records(),
                os.path.join(self._data_dir, name),
                self._compression,
                os.path.join(self._work_dir, f"{name}.json"),
                list(part.record_files(split)),
            )
        except DataError as e:
            # Beam reports a worker's failure as text; the driver finds this line in it.
            raise RuntimeError(_error_text(e)) from None
        yield name


class _ReadEncode(_WorkerDoFn):
    """IDX/npz: reads one range of records, encodes them and keys each by (split, shard)."""

    def __init__(self, source, num_shards, done, chunk_bytes):
        super().__init__(source.image_shape)
        self._source = source
        self._num_shards = dict(num_shards)
        self._done = frozenset(done)
        self._chunk_bytes = chunk_bytes

    def process(self, item):
        split, start, stop = item
        index = start
        try:
            for images, labels in self._source.chunks(split, start, stop, self._chunk_bytes):
                for i, record in enumerate(self._encoder.encode_many(images, labels)):
                    key = record_key(split, index + i)
                    shard = bucket(key, self._num_shards[split])
                    if (split, shard) not in self._done:
                        yield (split, shard), (key, record)
                index += len(labels)
        except DataError as e:
            raise RuntimeError(_error_text(e)) from None


class _WriteShard(_WorkerDoFn):
    """IDX/npz: sorts one shard's records by key and writes it."""

    def __init__(self, image_shape, data_dir, names, compression, work_dir):
        super().__init__(image_shape)
        self._data_dir = data_dir
        self._names = dict(names)
        self._compression = compression or ""
        self._work_dir = work_dir

    def process(self, element):
        (split, shard), values = element
        name = self._names[split, shard]
        _write_shard(
            self._tf,
            (record for _, record in sorted(values, key=lambda value: value[0])),
            os.path.join(self._data_dir, name),
            self._compression,
            os.path.join(self._work_dir, f"{name}.json"),
            None,
        )
        yield name


def shard_plan(
    source: DataSource, records_per_shard: int, compression: Optional[str]
) -> Tuple[Dict[str, int], Dict[Tuple[str, int], str]]:
    """Each split's shard count (as the local engine's), and each ``(split, shard)``'s file name."""
    num_shards = {
        split: max(1, math.ceil(source.num_records(split) / records_per_shard))
        for split in source.split_names
    }
    names = {
        (split, i): shard_name(split, i, count, compression)
        for split, count in num_shards.items()
        for i in range(count)
    }
    return num_shards, names


def _options(beam_options: Optional[str]) -> Tuple[PipelineOptions, object]:
    """Beam's options from the user's string, and the runner to name (None: Beam's choice)."""
    try:
        args = shlex.split(beam_options or "")
    except ValueError as e:
        raise DataError(f"--beam_options cannot be split into options ({e})") from e
    options = PipelineOptions(args)
    if options.view_as(StandardOptions).runner:
        return options, None  # --runner=FlinkRunner, SparkRunner, DataflowRunner, ...
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers in (None, 0):
        direct.direct_num_workers = os.cpu_count() or 1
    if "--direct_running_mode" in " ".join(args):
        return options, FnApiRunner()  # The user's choice, with Beam's own workers.
    # What direct_running_mode=multi_processing does (one worker process each), with Beam's
    # worker wrapped in data_pipeline.beam_worker, which skips the interpreter's slow teardown.
    # (FnApiRunner would replace this environment under multi_processing; under the default
    # mode it keeps it, and logs a warning, into the Beam log, that the mode is in_memory.)
    command = f"{shlex.quote(sys.executable)} -m data_pipeline.beam_worker"
    environment = SubprocessSDKEnvironment.from_command_string(command_string=command)
    return options, FnApiRunner(default_environment=environment)


def _shard_items(source: DataSource, num_shards: Dict[str, int], skip) -> Iterator[tuple]:
    """Image folders: (split, shard, the shard's records in key order) for each shard to write.

    A shard's records are those whose keys fall in its hash range, so sorting a split's keys
    once gives every shard's records, in order, one shard after the other.
    """
    for split in source.split_names:
        n = source.num_records(split)
        keys = [record_key(split, index) for index in range(n)]
        order = sorted(range(n), key=keys.__getitem__)
        shards = [bucket(keys[index], num_shards[split]) for index in order]
        first = 0
        for shard in range(num_shards[split]):
            last = first
            while last < n and shards[last] == shard:
                last += 1
            if last > first and (split, shard) not in skip:
                yield split, shard, source.subset(split, order[first:last])
            first = last


def _range_items(source: DataSource, workers: int) -> Iterator[Tuple[str, int, int]]:
    """IDX/npz: (split, start, stop), a few ranges of records per worker."""
    for split in source.split_names:
        n = source.num_records(split)
        step = max(1, -(-n // (workers * _ITEMS_PER_WORKER)))
        for start in range(0, n, step):
            yield split, start, min(n, start + step)


def _read_journal(data_dir: Path, work_dir: Path, fingerprint: str, resume: bool) -> Dict:
    """The shards a killed run with the same fingerprint completed (name -> journal entry)."""
    stamp = work_dir / _FINGERPRINT_FILE
    try:
        same = resume and stamp.read_text(encoding="utf-8") == fingerprint
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir()
        _atomic_write_text(stamp, fingerprint)
        return {}
    return _journalled(data_dir, work_dir)


def _journalled(data_dir: Path, work_dir: Path) -> Dict:
    """The journal's shards that still have their size (name -> journal entry)."""
    done = {}
    for entry in work_dir.glob("*.json"):
        try:
            record = json.loads(entry.read_text(encoding="utf-8"))
            size = os.stat(data_dir / entry.name[: -len(".json")]).st_size
        except (OSError, ValueError):
            continue
        if size == record.get("num_bytes"):
            done[entry.name[: -len(".json")]] = record
    return done


def prepare_beam(
    data_dir,
    source: DataSource,
    records_per_shard: int,
    compression: Optional[str],
    overwrite: bool,
    beam_options: Optional[str],
    chunk_bytes: int,
) -> DatasetSpec:
    """Writes ``source`` into ``data_dir`` with a Beam pipeline (see the module docstring).

    Called by :func:`data_pipeline.prepare` with ``engine="beam"``, which has opened the source
    and settled the shard size.

    Returns:
        The spec of the new (or reused) dataset.

    Raises:
        DataError: A bad source file (named), ``data_dir`` holds other data, or a write failed.
    """
    local_fingerprint = _fingerprint(source, records_per_shard, compression)
    fingerprint = beam_fingerprint(local_fingerprint)
    data_dir = Path(data_dir)
    options, runner = _options(beam_options)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            spec = _reusable(data_dir, source, records_per_shard, compression, local_fingerprint)
            if spec is not None:
                shutil.rmtree(data_dir / WORK_DIR, ignore_errors=True)
                return spec
        # From here on the folder must not look complete until the new spec is in place.
        (data_dir / SPEC_NAME).unlink(missing_ok=True)
        (data_dir / PROGRESS_NAME).unlink(missing_ok=True)  # The local engine's journal.
        _clean_tmp(data_dir, keep_dirs=True)
        work_dir = data_dir / WORK_DIR
        done = _read_journal(data_dir, work_dir, fingerprint, resume=not overwrite)
        num_shards, names = shard_plan(source, records_per_shard, compression)
        skip = {key for key, name in names.items() if name in done}
        _run(source, options, runner, num_shards, skip, names, compression, chunk_bytes, data_dir)
        spec = _finish(data_dir, work_dir, source, names, records_per_shard, compression)
        spec = dataclasses.replace(spec, fingerprint=fingerprint)
        _remove_unlisted_shards(data_dir, spec)
        _fsync_dir(data_dir)
        _write_spec(data_dir, spec)
        shutil.rmtree(work_dir)
    except Exception as e:
        error = write_error(e, data_dir, lambda: len(_journalled(data_dir, data_dir / WORK_DIR)))
        if error is None:
            raise
        raise error from e
    return load_spec(data_dir)


def _run(source, options, runner, num_shards, skip, names, compression, chunk_bytes, data_dir):
    """Builds and runs the pipeline; a worker's DataError comes back as itself.

    ``skip``: the (split, shard)s a killed run completed.

    Beam's own logs and everything local worker processes print (they inherit this process'
    stderr, and log every start-up step at INFO before they read any option) go to
    ``log_path``, kept on failure: prepare stays quiet and its errors one line.
    """
    log_path = data_dir / WORK_DIR / LOG_NAME
    build = _pipeline_builder(
        source, options, num_shards, skip, names, compression, chunk_bytes, data_dir
    )
    # Worker processes import this package by name: they need the repository on their path.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, old_path]))
    # Everything goes to the log through a pipe that a thread copies: a log on a full disk
    # loses lines but fails no write (Beam's worker hangs when printing a failure to a full
    # stderr raises: its bundle's error is never sent back).
    read_fd, write_fd = os.pipe()
    copier = threading.Thread(target=_copy_to_log, args=(read_fd, log_path), daemon=True)
    copier.start()
    beam_logger = logging.getLogger("apache_beam")
    handler = logging.StreamHandler(open(os.dup(write_fd), "w", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_state = beam_logger.level, beam_logger.propagate
    beam_logger.addHandler(handler)
    beam_logger.setLevel(logging.INFO)
    beam_logger.propagate = False
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        pipeline = beam.Pipeline(runner=runner, options=options)
        build(pipeline)
        pipeline.run().wait_until_finish()
    except DataError:
        raise
    except Exception as e:  # Beam wraps a worker's failure in runner-specific exceptions.
        text = _chain_text(e)
        error = _error_from_text(text)
        if error is not None:
            raise error from None
        if disk_full_error(e) is not None:
            raise  # prepare_beam names the file and what was kept
        beam_logger.exception("the pipeline failed")
        raise DataError(
            f"the Beam pipeline failed ({type(e).__name__}: {text.strip()[:300]})",
            path=log_path,
            fix="see this log (Beam's and the workers' output); a rerun resumes",
        ) from e
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        beam_logger.removeHandler(handler)
        handler.close()
        handler.stream.close()
        # Ends once every writer (this process, its workers) has closed the pipe.
        copier.join(timeout=10)
        beam_logger.setLevel(old_state[0])
        beam_logger.propagate = old_state[1]
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def _copy_to_log(read_fd: int, log_path) -> None:
    """Copies the pipe to ``log_path`` until its writers close it; a failed write drops lines."""
    with open(read_fd, "rb", buffering=0) as pipe:
        try:
            log = open(log_path, "ab", buffering=0)
        except OSError:
            log = None
        while chunk := pipe.read(1 << 16):
            try:
                if log is not None:
                    log.write(chunk)
            except OSError:  # a full disk: read on, so that no writer blocks
                pass
        if log is not None:
            log.close()


def _pipeline_builder(source, options, num_shards, skip, names, compression, chunk_bytes, data_dir):
    """A function that adds the transforms for ``source`` to a pipeline (see the module doc)."""
    work_dir = os.fspath(data_dir / WORK_DIR)
    data_dir = os.fspath(data_dir)
    if hasattr(source, "subset"):  # One file per record: one work item per shard.
        items = list(_shard_items(source, num_shards, skip))
        encode = _EncodeShard(
            source.image_shape, data_dir, names, compression, work_dir, chunk_bytes
        )

        def build(pipeline):
            # Create reshuffles its items, so the runner spreads the shards over the workers.
            _ = pipeline | "ListShards" >> beam.Create(items) | "WriteShard" >> beam.ParDo(encode)

        return build
    workers = options.view_as(DirectOptions).direct_num_workers or os.cpu_count() or 1
    items = list(_range_items(source, workers))
    read = _ReadEncode(source, num_shards, skip, chunk_bytes)
    write = _WriteShard(source.image_shape, data_dir, names, compression, work_dir)

    def build(pipeline):
        _ = (
            pipeline
            | "ListRecords" >> beam.Create(items)
            | "ReadDecodeEncode" >> beam.ParDo(read)
            | "GroupByShard" >> beam.GroupByKey()
            | "SortAndWriteShard" >> beam.ParDo(write)
        )

    return build


def _chain_text(error: BaseException) -> str:
    texts = []
    while error is not None and len(texts) < 20:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _finish(data_dir, work_dir, source, names, records_per_shard, compression) -> DatasetSpec:
    """Checks the journal covers every record, writes empty buckets and manifests; the spec."""
    shards: Dict[str, List[ShardSpec]] = {split: [] for split in source.split_names}
    files: Dict[str, List[str]] = {split: [] for split in source.split_names}
    for (split, _), name in sorted(names.items()):
        entry = work_dir / f"{name}.json"
        if entry.exists():
            record = json.loads(entry.read_text(encoding="utf-8"))
        else:
            # No record hashed into this bucket (tiny splits only): an empty shard, as the
            # local engine writes for an empty split.
            (data_dir / name).write_bytes(b"")
            record = {"num_records": 0, "num_bytes": 0, "files": []}
        shards[split].append(ShardSpec(name, record["num_records"], record["num_bytes"]))
        files[split] += record["files"] or []
    manifests = {}
    for split in source.split_names:
        total = sum(s.num_records for s in shards[split])
        if total != source.num_records(split):
            raise DataError(
                f"the pipeline wrote {total} {split} records, the source has "
                f"{source.num_records(split)}",
                path=data_dir,
                fix=f"re-run with --overwrite; {_FIX_OVERWRITE}",
            )
        if source.record_files(split) is not None:
            manifests[split] = f"{split}-files.txt"
            text = "".join(f + "\n" for f in files[split])
            _atomic_write_text(data_dir / manifests[split], text)
    return spec_of(source, data_dir, shards, compression, records_per_shard, manifests)
