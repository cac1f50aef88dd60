"""``prepare()``: streams a source into sharded TFRecord files plus ``dataset_spec.json``.

Atomicity: every shard and the spec are written under a ``.tmp-`` name and renamed when
complete, and the spec is renamed last, so a folder is complete exactly when its spec exists.
An interrupted run leaves no spec (any old spec is deleted before writing starts). Resuming: each
completed shard is recorded in ``.prepare-progress.json`` under a fingerprint of the source
checksum, the settings and the shard plan; the next run with the same fingerprint deletes the
stale temporary files and writes only the shards not recorded there. Record order is fixed by
the source, so a resumed run writes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tensorflow as tf
import tqdm

from data_pipeline.diskfull import disk_full_error
from data_pipeline.errors import DataError
from data_pipeline.sources import CHUNK_BYTES, DataSource, PathLike, open_source
from data_pipeline.spec import (
    COMPRESSIONS,
    FORMAT_VERSION,
    SPEC_NAME,
    TMP_PREFIX,
    DatasetSpec,
    ExampleEncoder,
    ShardSpec,
    SplitSpec,
    image_features,
    load_spec,
    record_size_range,
)

_FIX_OVERWRITE = "pass --overwrite to replace it, or choose another --data_dir"
DEFAULT_RECORDS_PER_SHARD = 1000
DEFAULT_SHARD_MB = 200
PROGRESS_NAME = ".prepare-progress.json"
ENGINES = ("local", "beam")
_MB = 10**6


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


def _clean_tmp(data_dir: Path, keep_dirs: bool = False) -> None:
    """Deletes temporary files (and folders, such as the Beam engine's journal, unless kept)."""
    for entry in data_dir.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_file():
            entry.unlink()
        elif entry.is_dir() and not keep_dirs:
            shutil.rmtree(entry)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def records_per_shard_for(
    image_shape: Tuple[int, ...],
    records_per_shard: Optional[int] = None,
    shard_mb: Optional[float] = None,
) -> int:
    """Returns the records per shard for images of ``image_shape``.

    Args:
        image_shape: (H, W, C) of the images.
        records_per_shard: Exactly this many, if given.
        shard_mb: Else as many as fit in this many MB (10**6 bytes), at least one.

    Without either: 1,000 records (MNIST's shards), fewer if that would exceed
    ``DEFAULT_SHARD_MB`` (200 MB, the top of TensorFlow's 100-200 MB guidance for TFRecord files).

    Raises:
        ValueError: Both or a non-positive value given.
    """
    if records_per_shard is not None and shard_mb is not None:
        raise ValueError("pass records_per_shard or shard_mb, not both")
    if records_per_shard is not None:
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        return records_per_shard
    record = record_size_range(image_features(image_shape)["image"])[0]
    if shard_mb is not None:
        if not shard_mb > 0:
            raise ValueError(f"shard_mb must be > 0, got {shard_mb}")
        return max(1, int(shard_mb * _MB // record))
    return max(1, min(DEFAULT_RECORDS_PER_SHARD, DEFAULT_SHARD_MB * _MB // record))


@dataclasses.dataclass(frozen=True)
class _Shard:
    split: str
    name: str
    start: int
    count: int


def _plan(source: DataSource, records_per_shard: int, compression: Optional[str]) -> List[_Shard]:
    plan = []
    for split in source.split_names:
        n = source.num_records(split)
        count = max(1, -(-n // records_per_shard))
        for i in range(count):
            start = i * records_per_shard
            name = shard_name(split, i, count, compression)
            plan.append(_Shard(split, name, start, min(records_per_shard, n - start)))
    return plan


def _fingerprint(source: DataSource, records_per_shard: int, compression: Optional[str]) -> str:
    """Digest of everything that decides the shards' bytes: source, settings and shard plan."""
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source.checksum,
        "image_shape": list(source.image_shape),
        "class_names": list(source.class_names),
        "records": {split: source.num_records(split) for split in source.split_names},
        "records_per_shard": records_per_shard,
        "compression": compression,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def beam_fingerprint(fingerprint: str) -> str:
    """The fingerprint of the Beam engine's shards for the local engine's ``fingerprint``.

    Same records, other shard contents (hash-bucketed instead of in source order): a separate
    digest, so neither engine's resume journal ever mistakes the other's shards for its own,
    while a complete folder made by either engine is reused by both.
    """
    return hashlib.sha256(f"beam hash-bucketed shards v1 {fingerprint}".encode()).hexdigest()


class _Progress:
    """The shards an interrupted prepare completed, journalled in ``PROGRESS_NAME`` beside them.

    Shards are renamed to their final names only when complete, and each is appended to the
    journal (name and size) after its rename, under the fingerprint of the plan it belongs to.
    A rerun with the same fingerprint keeps every journalled shard that still has its size; a
    rerun with another fingerprint starts over. A torn last line only costs that shard's rewrite.
    """

    def __init__(self, data_dir: Path, fingerprint: str, resume: bool):
        self.path = data_dir / PROGRESS_NAME
        self.fingerprint = fingerprint
        self.done: Dict[str, int] = {}
        if resume:
            self.done = self.journalled(data_dir, fingerprint)
        lines = [fingerprint] + [f"{name} {size}" for name, size in self.done.items()]
        _atomic_write_text(self.path, "".join(line + "\n" for line in lines))
        self._journal = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    @staticmethod
    def journalled(data_dir: Path, fingerprint: Optional[str] = None) -> Dict[str, int]:
        """The journalled shards that still have their size (under ``fingerprint``, if given)."""
        try:
            lines = (data_dir / PROGRESS_NAME).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError):
            return {}
        if fingerprint is not None and lines[0] != fingerprint:
            return {}
        done = {}
        for line in lines[1:-1]:  # The last one is empty or torn.
            name, _, size = line.partition(" ")
            if size.isdigit() and _size(data_dir / name) == int(size):
                done[name] = int(size)
        return done

    def add(self, name: str, size: int) -> None:
        self.done[name] = size
        self._journal.write(f"{name} {size}\n")
        self._journal.flush()  # Survives the process being killed (not a power cut: harmless).

    def close(self) -> None:
        self._journal.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else -1
    except OSError:
        return -1


def _reusable(
    data_dir: Path,
    source: DataSource,
    records_per_shard: int,
    compression: Optional[str],
    fingerprint: str,
) -> Optional[DatasetSpec]:
    """Returns the existing spec if it is complete and matches; raises if it holds other data."""
    if not (data_dir / SPEC_NAME).exists():
        return None
    try:
        spec = load_spec(data_dir)  # Also checks that every shard exists with the recorded size.
    except DataError:
        return None  # Our own output, damaged: rewrite it.
    # Specs written before fingerprints existed are compared setting by setting.
    if spec.fingerprint in (fingerprint, beam_fingerprint(fingerprint)):
        return spec
    settings = (spec.source_checksum, spec.records_per_shard, spec.compression)
    wanted = (source.checksum, records_per_shard, compression)
    same_images = (spec.image_shape, spec.class_names) == (source.image_shape, source.class_names)
    if settings != wanted or not same_images or spec.fingerprint:
        raise DataError(
            "holds shards prepared from another source or with other settings "
            f"(checksum {spec.source_checksum[:12]}..., records_per_shard "
            f"{spec.records_per_shard}, compression {spec.compression}, image_shape "
            f"{list(spec.image_shape)}, {spec.num_classes} classes; now "
            f"{source.checksum[:12]}..., {records_per_shard}, {compression}, "
            f"{list(source.image_shape)}, {source.num_classes})",
            path=data_dir,
            fix=_FIX_OVERWRITE,
        )
    counts = {split: spec.num_records(split) for split in spec.splits}
    if counts != {split: source.num_records(split) for split in source.split_names}:
        return None
    return spec


def _import_beam_writer():
    """Imports the Beam engine (and apache_beam: optional for the rest of the project)."""
    root = logging.getLogger()
    # apache_beam's import logs a warning about Google Cloud clients it may not need.
    hide = logging.Filter("\0")  # Matches no logger name: drops every root record meanwhile.
    root.addFilter(hide)
    try:
        from data_pipeline import beam_writer
    except ImportError as e:
        if not (e.name or "").startswith("apache_beam"):
            raise
        raise DataError(
            f"--prepare_engine=beam needs Apache Beam ({e})",
            fix="pip install -e '.[beam]' (apache-beam[tfrecord]==2.78.0, pinned in setup.cfg)",
        ) from e
    finally:
        root.removeFilter(hide)
    return beam_writer


def prepare(
    data_dir: PathLike,
    source_dir: Optional[PathLike] = None,
    records_per_shard: Optional[int] = None,
    compression: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_download: bool = True,
    *,
    source: Optional[DataSource] = None,
    shard_mb: Optional[float] = None,
    image_size: Optional[Tuple[int, int]] = None,
    channels: Optional[int] = None,
    chunk_bytes: int = CHUNK_BYTES,
    engine: str = "local",
    beam_options: Optional[str] = None,
) -> DatasetSpec:
    """Writes a source as sharded TFRecord files and ``dataset_spec.json`` (the prepare job).

    Streams: records are read, decoded and written chunk by chunk, so memory stays bounded by
    ``chunk_bytes`` whatever the dataset's size. An interrupted run, rerun with the same
    arguments, keeps the shards it completed and writes only the rest; the result equals that
    of an uninterrupted run.

    Args:
        data_dir: Output folder (created if needed).
        source_dir: Where to find the source; see :func:`data_pipeline.open_source` for the
            kinds of source and the fallbacks.
        records_per_shard: Records per shard; every shard but a split's last one is full.
        compression: None or ``"GZIP"``.
        overwrite: Rewrite even if the folder already holds matching complete (or partly
            written) output, and replace output prepared from another source or with other
            settings.
        progress: Show a tqdm progress bar on stderr (when it is a terminal).
        allow_download: Allow the tf_keras download of MNIST when no local source is found.
        source: An already opened source (skips ``source_dir`` resolution).
        shard_mb: Instead of ``records_per_shard``: shards of about this many MB. With neither,
            see :func:`records_per_shard_for` (1,000 records, at most 200 MB).
        image_size: Image folders: resize every image to (height, width).
        channels: Image folders: 1 or 3 channels (default: the first train image's).
        chunk_bytes: Decoded images held at once (per chunk).
        engine: ``"local"`` (this process, streaming) or ``"beam"`` (an Apache Beam pipeline,
            see :mod:`data_pipeline.beam_writer`: the same records, hash-bucketed into shards).
        beam_options: Beam engine: Beam's own pipeline options as one string, e.g.
            ``"--direct_num_workers=2"`` or ``"--runner=FlinkRunner --flink_master=host:8081"``.

    Returns:
        The spec of the (new or reused) dataset.

    Raises:
        DataError: No usable source, a bad source file, or ``data_dir`` holds other data and
            ``overwrite`` is False, or the folder cannot be written.
        ValueError: Bad ``records_per_shard``, ``shard_mb`` or ``compression``.
    """
    compression = normalize_compression(compression)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if beam_options and engine != "beam":
        raise DataError(
            "--beam_options applies only to --prepare_engine=beam", fix="drop it or add the engine"
        )
    if source is None:
        source = open_source(
            source_dir, allow_download=allow_download, image_size=image_size, channels=channels
        )
    records_per_shard = records_per_shard_for(source.image_shape, records_per_shard, shard_mb)
    if engine == "beam":
        beam_writer = _import_beam_writer()
        return beam_writer.prepare_beam(
            data_dir, source, records_per_shard, compression, overwrite, beam_options, chunk_bytes
        )
    fingerprint = _fingerprint(source, records_per_shard, compression)
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            spec = _reusable(data_dir, source, records_per_shard, compression, fingerprint)
            if spec is not None:
                (data_dir / PROGRESS_NAME).unlink(missing_ok=True)
                return spec
        # From here on the folder must not look complete until the new spec is in place.
        (data_dir / SPEC_NAME).unlink(missing_ok=True)
        _clean_tmp(data_dir)
        spec = _write_all(
            data_dir,
            source,
            records_per_shard,
            compression,
            _Progress(data_dir, fingerprint, resume=not overwrite),
            progress,
            chunk_bytes,
        )
    except Exception as e:
        error = write_error(e, data_dir, lambda: len(_Progress.journalled(data_dir)))
        if error is None:
            raise
        raise error from e
    return spec


def write_error(error: Exception, data_dir: Path, completed) -> Optional[Exception]:
    """What a failed prepare (either engine) raises: DiskFullError, DataError, or None (as is).

    A full disk (whichever writer met it: TFRecord, journal, spec, in a worker or here) removes
    this run's temporary files, which hold space and are useless to the rerun, and keeps the
    journal (a folder such as the Beam engine's too); any other OSError is a DataError.

    Args:
        error: What the prepare raised.
        data_dir: The folder being prepared.
        completed: Returns how many shards are complete and journalled (called after cleaning).
    """
    full = disk_full_error(error, data_dir)
    if full is not None:
        _clean_tmp(data_dir, keep_dirs=True)
        return full.with_kept(
            f"no {SPEC_NAME} was written; the {completed()} shards completed are kept and the "
            "rerun writes only the rest"
        )
    if isinstance(error, OSError):
        return DataError(
            f"cannot write ({error.strerror or error})",
            path=error.filename or data_dir,
            fix="check the --data_dir path, its permissions and free space",
        )
    return None


def _runs(shards: List[_Shard]) -> List[List[_Shard]]:
    """Splits shards into runs of consecutive ones (by record index)."""
    runs: List[List[_Shard]] = []
    for shard in shards:
        if runs and runs[-1][-1].start + runs[-1][-1].count == shard.start:
            runs[-1].append(shard)
        else:
            runs.append([shard])
    return runs


def _write_run(
    data_dir: Path,
    source: DataSource,
    run: List[_Shard],
    encoder: ExampleEncoder,
    compression: Optional[str],
    chunk_bytes: int,
    finish,
    on_records,
) -> None:
    """Writes consecutive shards from one stream of chunks, each to a temporary name.

    ``finish(tmp, path, name)`` completes each shard (fsync and rename), possibly later.
    """
    chunks = source.chunks(run[0].split, run[0].start, run[-1].start + run[-1].count, chunk_bytes)
    images = labels = None
    offset = 0
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    for shard in run:
        path = data_dir / shard.name
        tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{shard.name}")
        need = shard.count
        # A failed write (a full disk: TFRecordWriter raises ResourceExhaustedError, at a write
        # or at close) leaves no temporary shard behind.
        with _removed_on_error(tmp), tf.io.TFRecordWriter(str(tmp), options) as writer:
            while need:
                if labels is None or offset == len(labels):
                    images, labels = next(chunks)
                    offset = 0
                take = min(need, len(labels) - offset)
                for record in encoder.encode_many(
                    images[offset : offset + take], labels[offset : offset + take]
                ):
                    writer.write(record)
                offset += take
                need -= take
                on_records(take)
        finish(tmp, path, shard.name)


@contextlib.contextmanager
def _removed_on_error(path: Path):
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_all(
    data_dir: Path,
    source: DataSource,
    records_per_shard: int,
    compression: Optional[str],
    done: _Progress,
    progress: bool,
    chunk_bytes: int,
) -> DatasetSpec:
    plan = _plan(source, records_per_shard, compression)
    encoder = ExampleEncoder(image_features(source.image_shape))
    bar = tqdm.tqdm(
        total=sum(shard.count for shard in plan),
        initial=sum(shard.count for shard in plan if shard.name in done.done),
        unit="ex",
        desc="prepare",
        file=sys.stderr,
        # On a terminal only: in a pipe or log the redrawn bar is noise before a one-line error.
        disable=not progress or not sys.stderr.isatty(),
        leave=True,
    )

    def finish(tmp: Path, path: Path, name: str) -> None:
        # The shard's bytes are on disk and renamed before it is journalled as done.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done.add(name, os.stat(path).st_size)

    # A second thread finishes each shard (fsync is slow) while the next one is being written.
    finisher = concurrent.futures.ThreadPoolExecutor(1, "shard-finisher")
    pending: List[concurrent.futures.Future] = []

    def submit(*args) -> None:
        for future in pending:
            if future.done():
                future.result()  # Stops at the first shard that could not be finished.
        pending.append(finisher.submit(finish, *args))

    try:
        for split in source.split_names:
            todo = [s for s in plan if s.split == split and s.name not in done.done]
            for run in _runs(todo):
                _write_run(
                    data_dir,
                    source,
                    run,
                    encoder,
                    compression,
                    chunk_bytes,
                    submit,
                    bar.update,
                )
    except BaseException:
        bar.leave = False  # Cleared, so an error is the last line on the terminal.
        raise
    finally:
        finisher.shutdown(wait=True)
        bar.close()
        done.close()
    for future in pending:
        future.result()  # Raises the first failure to finish a shard.
    shards: Dict[str, List[ShardSpec]] = {split: [] for split in source.split_names}
    for shard in plan:
        shards[shard.split].append(ShardSpec(shard.name, shard.count, done.done[shard.name]))
    manifests = {}
    for split in source.split_names:
        files = source.record_files(split)
        if files is not None:
            manifests[split] = f"{split}-files.txt"
            _atomic_write_text(data_dir / manifests[split], "".join(f + "\n" for f in files))
    spec = spec_of(
        source, data_dir, shards, compression, records_per_shard, manifests, done.fingerprint
    )
    _remove_unlisted_shards(data_dir, spec)
    _fsync_dir(data_dir)
    _write_spec(data_dir, spec)
    done.path.unlink()
    return spec


def spec_of(
    source: DataSource,
    data_dir: Path,
    shards: Dict[str, List[ShardSpec]],
    compression: Optional[str],
    records_per_shard: int,
    manifests: Dict[str, str],
    fingerprint: str = "",
) -> DatasetSpec:
    """The spec of ``source`` written into ``data_dir`` as ``shards`` (either engine)."""
    return DatasetSpec(
        features=image_features(source.image_shape),
        splits={
            split: SplitSpec(num_records=source.num_records(split), shards=tuple(s))
            for split, s in shards.items()
        },
        num_classes=source.num_classes,
        image_shape=tuple(source.image_shape),
        compression=compression,
        source_checksum=source.checksum,
        source_name=source.name,
        records_per_shard=records_per_shard,
        data_dir=os.fspath(data_dir),
        class_names=tuple(source.class_names),
        fingerprint=fingerprint,
        manifests=manifests,
        resize=getattr(source, "resize", None),
    )


def _remove_unlisted_shards(data_dir: Path, spec: DatasetSpec) -> None:
    # Shards (or manifests) of an earlier run with other settings would otherwise linger.
    listed = {s.file for split in spec.splits.values() for s in split.shards}
    listed |= set(spec.manifests.values())
    for split in spec.splits:
        for path in [*data_dir.glob(f"{split}-*-of-*.tfrecord*"), data_dir / f"{split}-files.txt"]:
            if path.name not in listed and path.is_file():
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
