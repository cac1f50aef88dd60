"""Faults in the data path and in export: fuzzed inputs, bad data through the CLI, SIGKILL.

Contract under test: whatever bytes sit in an IDX source, a ``dataset_spec.json`` or a shard,
the data pipeline raises only :class:`data_pipeline.DataError` (one line naming the file), the CLI
turns it into one ``error: ...`` line and exit code 2, and a SIGKILL during ``prepare`` or
``export`` never leaves something that passes for complete output.

How TF 2.15's Estimator exports (``Estimator._export_all_saved_models``): it picks
``EXPORT_DIR/<unix seconds>``, writes the whole SavedModel into the sibling
``EXPORT_DIR/temp-<unix seconds>`` (variables first, ``saved_model.pb`` last) and renames the temp
folder onto the numeric name with one ``gfile.Rename`` (``rename(2)``, atomic on a local file
system). ``jobs.export`` saves the ``.keras`` file as ``<name>.tmp.keras`` and
``os.replace``-s it. Killed mid-way, only the ``temp-*`` folder or ``*.tmp.keras`` file remains,
and an export started within the same second waits for the next one (the Estimator would fail
on the leftover ``temp-<second>``).
"""

import copy
import gzip
import json
import os
import random
import re
import shutil
import signal
import struct
import time
import tracemalloc

import cli_helpers
import numpy as np
import pytest
import tensorflow as tf
from cli_helpers import assert_cli_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data_pipeline
from data_pipeline import (
    DataError,
    check_shards,
    load_source,
    load_spec,
    make_dataset,
    prepare,
    read_idx,
    translate_errors,
)
from data_pipeline.spec import MNIST_FEATURES, ExampleEncoder, FeatureSpec
from keras_models import keras3

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SHARD_NAME = re.compile(r"^(train|test)-\d{5}-of-\d{5}\.tfrecord(\.gz)?$")


# --- helpers ------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def small_arrays(n=6, m=4, size=28):
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        rng.integers(0, 10, n).astype(np.uint8),
        rng.integers(0, 256, (m, size, size), dtype=np.uint8),
        rng.integers(0, 10, m).astype(np.uint8),
    ]


def write_idx_folder(folder, arrays, raw=None):
    """Writes the four IDX files (gzip); ``raw`` maps a stem to bytes written instead."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(IDX_STEMS, arrays):
        data = (raw or {}).get(stem)
        if data is None:
            data = gzip.compress(idx_bytes(array), compresslevel=1)
        (folder / (stem + ".gz")).write_bytes(data)
    return folder


def assert_data_error(error: BaseException, *names: str) -> None:
    assert type(error) is DataError, f"{type(error).__name__}: {error}"
    text = str(error)
    assert text and "\n" not in text and error.exit_code == 2, text
    for name in names:
        assert str(name) in text, text


def only_data_error(call, *names):
    """Runs ``call``; anything raised must be a one-line DataError naming ``names``."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the point is to see every type that escapes.
        assert_data_error(error, *names)
        return error
    return None


def edit_spec(data_dir, change):
    path = data_dir / "dataset_spec.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def read_everything(data_dir, split=None):
    for name in [split] if split else ("train", "test"):
        for _ in make_dataset(data_dir, name, 64):
            pass


@pytest.fixture
def small_data_dir(tmp_path, mnist_small_npz):
    """1000 train / 300 test examples in shards of 100 (private: tests damage it)."""
    data_dir = tmp_path / "data"
    prepare(data_dir, mnist_small_npz, records_per_shard=100, progress=False)
    return data_dir


# --- 1. fuzzing the IDX reader ------------------------------------------------------------------

GOOD_IMAGES = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)


@st.composite
def idx_files(draw):
    """IDX-looking bytes: mutated magic/type/ndim/dims, wrong payload, maybe gzip, maybe cut."""
    ndim = draw(st.sampled_from([0, 1, 2, 3, 4, 33, 255]) | st.integers(0, 40))
    big = st.integers(0, 2**32 - 1)
    dims = draw(st.lists(st.integers(0, 30) | big, min_size=ndim, max_size=ndim))
    zeros = draw(st.sampled_from([b"\0\0", b"\0\1", b"\xff\0"]))
    type_code = draw(st.sampled_from([0x08, 0x08, 0x09, 0x0D, 0x00, 0xFF]))
    header = zeros + bytes([type_code, ndim]) + struct.pack(f">{ndim}I", *dims)
    expected = int(np.prod(dims, dtype=object)) if dims else 0
    size = draw(st.sampled_from(["exact", "short", "long", "random"]))
    if size == "random" or expected > 4096:
        payload = draw(st.binary(max_size=300))
    else:
        payload = bytes(expected) + (b"\1" * draw(st.integers(1, 5)) if size == "long" else b"")
        if size == "short":
            payload = payload[: max(0, expected - draw(st.integers(1, 5)))]
    data = header + payload
    if draw(st.booleans()):
        data = gzip.compress(data, compresslevel=1)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()) and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    return data


gzip_garbage = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\x1f\x8b" + b),
    st.binary(max_size=200).map(gzip.compress),
    st.tuples(st.binary(max_size=200), st.binary(min_size=1, max_size=20)).map(
        lambda t: gzip.compress(idx_bytes(GOOD_IMAGES)) + t[1]  # Garbage after the member.
    ),
    st.integers(0, 60).map(lambda n: gzip.compress(idx_bytes(GOOD_IMAGES))[:n]),
)


@FUZZ
@given(data=st.binary(max_size=400) | idx_files() | gzip_garbage)
def test_fuzz_read_idx_raises_only_data_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("idx") / "train-images-idx3-ubyte"
    path.write_bytes(data)
    only_data_error(lambda: read_idx(path), path)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    which=st.sampled_from(IDX_STEMS),
    data=idx_files() | gzip_garbage | st.binary(max_size=100),
    sums=st.none() | st.binary(max_size=120),
)
def test_fuzz_idx_folder_raises_only_data_error(tmp_path_factory, which, data, sums):
    folder = write_idx_folder(tmp_path_factory.mktemp("src"), small_arrays(), {which: data})
    if sums is not None:
        (folder / "SHA256SUMS").write_bytes(sums)  # Binary garbage where text is expected.
    error = only_data_error(lambda: load_source(folder, env={}))
    if error is not None:
        assert str(folder) in str(error), str(error)


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_absurd_header_fails_fast_without_allocating(tmp_path, compressed):
    # 4,294,967,295 records of 28x28 (3.4 TB) claimed by a file of a few kB: the size check must
    # come from the file's real size, before anything that big is allocated or decompressed.
    data = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 28, 28) + bytes(5000)
    if compressed:
        data = gzip.compress(data)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError) as info:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 10 * 2**20, peak
    assert_data_error(info.value, path, str((2**32 - 1) * 784))  # The bytes claimed.


def test_gzip_bomb_is_not_decompressed(tmp_path):
    # 16 MiB of zeros gzip to ~16 kB; the header claims 10**12-ish bytes, far more than a 16 kB
    # gzip file can expand to, so reading stops at the header.
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 28, 28)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(16 * 2**20), compresslevel=9))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    assert_data_error(info.value, path, "gzip")


@pytest.mark.parametrize(
    "data, problem",
    [
        (bytes([0, 0, 8, 40]) + struct.pack(">40I", *[1] * 40) + b"x", "40 dimensions"),
        (bytes([0, 0, 8, 4]) + struct.pack(">4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1), "shape"),
        (bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**32 - 1, 2**32 - 1), "truncated"),
    ],
    ids=["too-many-dims", "zero-times-huge", "product-overflows-int64"],
)
def test_idx_header_numpy_cannot_represent(tmp_path, data, problem):
    # Each used to escape as ValueError from numpy (or pass an int64-overflowed size check).
    path = tmp_path / "labels"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert_data_error(info.value, path, problem)


# --- 1. fuzzing the spec loader -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
nasty_values = st.sampled_from(
    [
        -1,
        0,
        2**62 + 1,
        2**63,
        10**30,
        1.5,
        True,
        None,
        "100",
        "",
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        "a\0b",
        "x" * 300,
        ".tmp-1-train-00000-of-00010.tfrecord",
        [],
        {},
        [28, 28],
        [32, 32, 1],
        [10**12, 28, 1],
        float("inf"),
        float("nan"),
    ]
)


def json_paths(obj, prefix=()):
    yield prefix
    children = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in children:
        yield from json_paths(value, prefix + (key,))


@st.composite
def mutated_specs(draw, original):
    spec = copy.deepcopy(original)
    paths = list(json_paths(original))[1:]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = spec
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.integers(0, 3)) == 0:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(nasty_values | json_values)
        except (KeyError, IndexError, TypeError):
            pass  # An earlier mutation removed or replaced this path.
    return json.dumps(spec)


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory, mnist_source):
    """(folder, its original spec bytes): a tiny prepared folder whose spec tests overwrite."""
    splits = {k: (x[:300], y[:300]) for k, (x, y) in mnist_source.splits.items()}
    source = data_pipeline.Source("test", mnist_source.checksum, splits)
    data_dir = tmp_path_factory.mktemp("spec_fuzz")
    prepare(data_dir, source=source, records_per_shard=100, progress=False)
    return data_dir, (data_dir / "dataset_spec.json").read_bytes()


def load_spec_text(data_dir, text):
    (data_dir / "dataset_spec.json").write_bytes(text)
    return only_data_error(lambda: load_spec(data_dir), data_dir)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_spec_raises_only_data_error(spec_dir, data):
    data_dir, original = spec_dir
    text = data.draw(mutated_specs(json.loads(original)))
    load_spec_text(data_dir, text.encode())


@FUZZ
@given(
    text=json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_fuzz_arbitrary_spec_bytes_raise_only_data_error(spec_dir, text):
    error = load_spec_text(spec_dir[0], text)
    assert error is not None, text  # Nothing random may pass for a spec.


def _set(path, value):
    def change(raw):
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value

    return change


SHARD0 = ("splits", "test", "shards", 0)
SPEC_LIES = {
    "negative-count": _set((*SHARD0, "num_records"), -1),
    "count-as-string": _set((*SHARD0, "num_records"), "100"),
    "count-as-float": _set((*SHARD0, "num_records"), 100.0),
    "count-as-bool": _set(("num_classes",), True),
    "count-huge": _set(("splits", "test", "num_records"), 10**30),
    "count-infinite": _set(("format_version",), float("inf")),
    "split-total-lies": _set(("splits", "test", "num_records"), 299),
    "shard-traversal": _set((*SHARD0, "file"), "../test-00000-of-00003.tfrecord"),
    "shard-absolute": _set((*SHARD0, "file"), "/etc/passwd"),
    "shard-hidden": _set((*SHARD0, "file"), ".tmp-1-test-00000-of-00003.tfrecord"),
    "shard-nul": _set((*SHARD0, "file"), "test\0.tfrecord"),
    "shard-name-too-long": _set((*SHARD0, "file"), "x" * 300),
    "shard-name-not-string": _set((*SHARD0, "file"), 7),
    "shard-bytes-lie": _set((*SHARD0, "num_bytes"), 83801),
    "shards-not-list": _set(("splits", "test", "shards"), {"file": "x"}),
    "image-shape-32": lambda raw: (
        raw.update(image_shape=[32, 32, 1]),
        raw["features"]["image"].update(shape=[32, 32, 1]),
    ),
    "image-shape-huge": lambda raw: (
        raw.update(image_shape=[10**12, 28, 1]),
        raw["features"]["image"].update(shape=[10**12, 28, 1]),
    ),
    "image-shape-string": _set(("image_shape",), "28"),
    "num-classes-lies": _set(("num_classes",), 12),
    "num-classes-one": lambda raw: raw.update(num_classes=1, class_names=["a"]),
    "class-names-count": _set(("class_names",), ["0", "1"]),
    "class-names-duplicate": _set(("class_names",), ["0"] * 10),
    "class-name-empty": _set(("class_names",), ["", *"123456789"]),
    "class-name-line-break": _set(("class_names",), ["a\nb", *"123456789"]),
    "class-names-string": _set(("class_names",), "0123456789"),
    "image-shape-2-channels": lambda raw: (
        raw.update(image_shape=[28, 14, 2]),
        raw["features"]["image"].update(shape=[28, 14, 2]),
    ),
    "image-shape-2d": lambda raw: (
        raw.update(image_shape=[28, 28]),
        raw["features"]["image"].update(shape=[28, 28]),
    ),
    "image-shape-too-big": lambda raw: (
        raw.update(image_shape=[65536, 65536, 3]),
        raw["features"]["image"].update(shape=[65536, 65536, 3]),
    ),
    "manifest-traversal": _set(("manifests",), {"test": "../test-files.txt"}),
    "manifest-unknown-split": _set(("manifests",), {"valid": "valid-files.txt"}),
    "fingerprint-not-string": _set(("fingerprint",), 7),
    "label-default-string": _set(("features", "label", "default"), "x"),
    "extra-feature": _set(("features", "extra"), {"dtype": "bogus", "shape": [], "encoding": "x"}),
    "compression-unknown": _set(("compression",), "ZLIB"),
    "compression-list": _set(("compression",), ["GZIP"]),
    "missing-source": lambda raw: raw.pop("source"),
    "features-list": _set(("features",), []),
}


@pytest.mark.parametrize("change", SPEC_LIES.values(), ids=SPEC_LIES.keys())
def test_spec_lies_are_one_line_data_errors(small_data_dir, change):
    edit_spec(small_data_dir, change)
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir)
    assert_data_error(info.value, small_data_dir)


def test_deeply_nested_spec(small_data_dir):
    (small_data_dir / "dataset_spec.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as info:  # json raised RecursionError here.
        load_spec(small_data_dir)
    assert_data_error(info.value, "dataset_spec.json", "unreadable")


# --- 2. bad shards, in process ------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(bit=st.integers(0, 8 * 3 * 838 - 1))
def test_any_bit_flip_in_a_shard_is_caught(spec_dir, tmp_path_factory, bit):
    # TFRecord framing CRCs the length and the data, so every single flipped bit in the first
    # three records must be reported by check_shards as a DataError naming the shard.
    data_dir = tmp_path_factory.mktemp("flip") / "data"
    shutil.copytree(spec_dir[0], data_dir, ignore=shutil.ignore_patterns("train-*"))
    (data_dir / "dataset_spec.json").write_bytes(spec_dir[1])
    edit_spec(data_dir, lambda raw: raw["splits"].pop("train"))
    shard = data_dir / "test-00001-of-00003.tfrecord"
    content = bytearray(shard.read_bytes())
    content[bit // 8] ^= 1 << (bit % 8)
    shard.write_bytes(bytes(content))
    with pytest.raises(DataError) as info:
        check_shards(data_dir)
    assert_data_error(info.value, shard)


def write_labels_out_of_range(data_dir):
    """Prepares 200 train records with good labels and 200 test records with labels 0..11."""
    images = np.zeros((200, 28, 28), np.uint8)
    good = np.arange(200, dtype=np.int64) % 10
    bad = np.arange(200, dtype=np.int64) % 12  # 10 and 11 are not classes.
    splits = {"train": (images, good), "test": (images, bad)}
    source = data_pipeline.Source("bad-labels", "0" * 64, splits)
    prepare(data_dir, source=source, records_per_shard=100, progress=False)


def write_32x32_records(data_dir):
    """Replaces test shard 1 with records holding 32x32 images; the spec keeps saying 28x28."""
    shard = data_dir / "test-00001-of-00003.tfrecord"
    encoder = ExampleEncoder(
        {"image": FeatureSpec("uint8", (32, 32, 1), "raw_bytes"), "label": MNIST_FEATURES["label"]}
    )
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for i in range(100):
            writer.write(
                encoder.encode({"image": np.zeros((32, 32, 1), np.uint8), "label": i % 10})
            )
    size = shard.stat().st_size
    edit_spec(data_dir, lambda raw: raw["splits"]["test"]["shards"][1].update(num_bytes=size))
    return shard


def test_labels_outside_classes_in_shards(tmp_path):
    data_dir = tmp_path / "data"
    write_labels_out_of_range(data_dir)
    shard = data_dir / "test-00000-of-00002.tfrecord"
    with pytest.raises(DataError) as info:
        check_shards(data_dir, "test")
    assert_data_error(info.value, shard, "label 10", "[0, 10)")
    # The reader asserts the range per batch, so training never feeds a bad class to the loss.
    with pytest.raises(DataError) as info, translate_errors(data_dir, "test"):
        read_everything(data_dir, "test")
    assert_data_error(info.value, shard, "label 10")


def test_records_with_wrong_image_size(small_data_dir):
    shard = write_32x32_records(small_data_dir)
    load_spec(small_data_dir)  # Sizes agree: only reading can tell.
    with pytest.raises(DataError) as info:
        check_shards(small_data_dir, "test")
    assert_data_error(info.value, shard, "schema")
    with pytest.raises(DataError) as info, translate_errors(small_data_dir, "test"):
        read_everything(small_data_dir, "test")
    assert_data_error(info.value, shard)


@pytest.mark.parametrize("claimed", [2**62 - 200, 10**9])
def test_spec_claims_huge_record_count(small_data_dir, claimed):
    # Such a count used to reach tf.data, where the interleave's int64 buffer size overflowed
    # (an InvalidArgumentError no translation recognised); the spec is now checked against the
    # shard's byte size.
    def change(raw):
        raw["splits"]["test"]["shards"][2]["num_records"] = claimed
        raw["splits"]["test"]["num_records"] = 200 + claimed

    edit_spec(small_data_dir, change)
    with pytest.raises(DataError) as info, translate_errors(small_data_dir, "test"):
        read_everything(small_data_dir, "test")
    assert_data_error(info.value, "dataset_spec.json", "test-00002-of-00003.tfrecord", claimed)


# --- 2. bad data through the CLI ----------------------------------------------------------------


def _magic(arrays):
    return {IDX_STEMS[0]: b"\x01\x02" + idx_bytes(arrays[0])[2:]}


def _truncated(arrays):
    return {IDX_STEMS[2]: gzip.compress(idx_bytes(arrays[2])[:-100])}


def _gzip_crc(arrays):
    data = bytearray(gzip.compress(idx_bytes(arrays[3])))
    data[-8] ^= 0xFF  # The member's CRC-32.
    return {IDX_STEMS[3]: bytes(data)}


BAD_SOURCES = {
    "malformed-header": (_magic, IDX_STEMS[0], "not an IDX file"),
    "truncated-idx": (_truncated, IDX_STEMS[2], "truncated"),
    "gzip-bad-crc": (_gzip_crc, IDX_STEMS[3], "corrupt gzip"),
    "labels-out-of-range": (None, IDX_STEMS[3], "[0, 6)"),
    "images-32x32": (None, IDX_STEMS[2], "28, 28"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=BAD_SOURCES.keys())
def test_cli_prepare_bad_source(tmp_path, case):
    make_raw, stem, problem = BAD_SOURCES[case]
    arrays = small_arrays()
    if case == "labels-out-of-range":  # Train labels 0..5 make 6 classes; a test label is 6.
        arrays[1][:] = np.arange(6)
        arrays[3][:] = [0, 1, 6, 2]
    if case == "images-32x32":
        arrays[2] = small_arrays(size=32)[2]
    source = write_idx_folder(tmp_path / "src", arrays, make_raw(arrays) if make_raw else None)
    out = tmp_path / "out"
    run = run_cli("--mode=prepare", f"--data_dir={out}", f"--source_dir={source}")
    assert_cli_error(run, stem, problem)
    assert not (out / "dataset_spec.json").exists()


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, mnist_data_dir):
    """A cnn trained for 5 steps of 16 on the session's shards (a checkpoint to evaluate/export)."""
    import estimator_bridge
    import jobs

    model_dir = tmp_path_factory.mktemp("cnn_model")
    jobs.train(
        estimator_bridge.Config(
            model="cnn",
            data_dir=str(mnist_data_dir),
            model_dir=str(model_dir),
            train_steps=5,
            batch_size=16,
            progress=False,
        )
    )
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("model.ckpt-5")
    return model_dir


def _truncate_shard(data_dir):
    shard = data_dir / "test-00001-of-00003.tfrecord"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    return shard, "bytes"


def _cut_record_same_size_in_spec(data_dir):
    shard = data_dir / "test-00001-of-00003.tfrecord"
    size = shard.stat().st_size - 400  # Half of the last record.
    with open(shard, "r+b") as f:
        f.truncate(size)
    edit_spec(data_dir, lambda raw: raw["splits"]["test"]["shards"][1].update(num_bytes=size))
    return shard, "corrupt"


def _flip_bit(data_dir):
    shard = data_dir / "test-00002-of-00003.tfrecord"
    content = bytearray(shard.read_bytes())
    content[5000] ^= 0x10
    shard.write_bytes(bytes(content))
    return shard, "corrupt"


def _count_lies(data_dir):
    def change(raw):
        raw["splits"]["test"]["shards"][0]["num_records"] = 101
        raw["splits"]["test"]["num_records"] = 301

    edit_spec(data_dir, change)
    return data_dir / "test-00000-of-00003.tfrecord", "says 101"


def _shape_lies(data_dir):
    def change(raw):
        raw["image_shape"] = [32, 32, 1]
        raw["features"]["image"]["shape"] = [32, 32, 1]

    edit_spec(data_dir, change)
    return data_dir / "dataset_spec.json", "image_shape"


def _labels_out_of_range(data_dir):
    shutil.rmtree(data_dir)
    write_labels_out_of_range(data_dir)
    return data_dir / "test-00000-of-00002.tfrecord", "[0, 10)"


def _records_32x32(data_dir):
    return write_32x32_records(data_dir), "schema"


BAD_SHARDS = {
    "truncated-shard": _truncate_shard,
    "record-cut-spec-size-fixed": _cut_record_same_size_in_spec,
    "bit-flip": _flip_bit,
    "spec-count-lies": _count_lies,
    "spec-shape-lies": _shape_lies,
    "labels-out-of-range": _labels_out_of_range,
    "records-32x32": _records_32x32,
}


@pytest.mark.parametrize("damage", BAD_SHARDS.values(), ids=BAD_SHARDS.keys())
def test_cli_evaluate_bad_shards(small_data_dir, trained_model_dir, damage):
    bad_file, problem = damage(small_data_dir)
    with pytest.raises(DataError) as info:
        check_shards(small_data_dir, "test")
    assert_data_error(info.value, bad_file)
    run = run_cli(
        "--mode=evaluate",
        "--model=cnn",
        f"--data_dir={small_data_dir}",
        f"--model_dir={trained_model_dir}",
        "--eval_batch_size=100",
    )
    assert_cli_error(run, bad_file, problem)


# --- 3. SIGKILL during prepare through the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def fork_main():
    """Starts ``main.py ARGS`` as a forked child of a warm interpreter: ``fork_main(*args)``.

    Keyword ``pause_at`` (an export step) and ``ready_file`` make the child create that file at
    that step and wait there to be killed (``cli_helpers.fork_main``).
    """
    return cli_helpers.fork_main


def poll(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def final_shards(data_dir):
    return sorted(p for p in data_dir.iterdir() if SHARD_NAME.match(p.name))


# 22 train and 4 test shards of MNIST: enough to kill between shards and within one, few enough
# that check_shards (a tf.data pipeline per shard, ~40 ms each) stays quick.
RECORDS_PER_SHARD = 2500


@pytest.mark.parametrize("moment", ["first-final-shard", "random-delay"])
def test_cli_sigkill_during_prepare_then_rerun(tmp_path, mnist_dir, fork_main, moment):
    # test_data_writer.py kills a stalled in-process prepare() at one fixed record; this kills
    # the command line at moments that depend on the writer threads' progress.
    data_dir = tmp_path / "data"
    args = [
        "--mode=prepare",
        f"--data_dir={data_dir}",
        f"--source_dir={mnist_dir}",
        f"--records_per_shard={RECORDS_PER_SHARD}",
    ]
    proc = fork_main(*args)
    try:
        if moment == "first-final-shard":
            started = poll(lambda: data_dir.is_dir() and final_shards(data_dir), proc)
        else:
            started = poll(lambda: data_dir.is_dir() and any(data_dir.iterdir()), proc)
            time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
        assert started, "prepare ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kill may land after the spec was written (the process was still exiting): output
    # that looks complete must then be complete. Otherwise nothing may pass for complete.
    if (data_dir / "dataset_spec.json").exists():
        assert check_shards(data_dir, parse=False) == {"train": 55000, "test": 10000}
    else:
        with pytest.raises(DataError, match="no dataset_spec.json"):
            load_spec(data_dir)
    # Every shard under a final name is complete: all its records, which the reader decodes.
    # One pipeline reads them all, a shard per batch (cycle_length=1 keeps shards apart).
    shards = final_shards(data_dir)
    paths = tf.data.Dataset.from_tensor_slices(tf.constant([str(p) for p in shards], tf.string))
    batches = list(
        paths.interleave(
            lambda path: tf.data.TFRecordDataset(path).batch(2 * RECORDS_PER_SHARD), cycle_length=1
        )
    )
    assert len(batches) == len(shards), shards
    for shard, batch in zip(shards, batches):
        assert batch.shape == (RECORDS_PER_SHARD,), shard
        data_pipeline.parse_serialized(batch)
    # The rerun needs no process of its own: it runs in this one.
    run = run_cli(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not any(p.name.startswith(".tmp-") for p in data_dir.iterdir())
    assert check_shards(data_dir, parse=False) == {"train": 55000, "test": 10000}


# --- 4. SIGKILL during export -------------------------------------------------------------------


def export_args(mnist_data_dir, model_dir, export_dir, keras_path):
    return [
        "--mode=export",
        "--model=cnn",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={model_dir}",
        f"--export_dir={export_dir}",
        f"--keras_output={keras_path}",
    ]


_LOADED = set()  # Version folders already loaded by assert_no_partial_export (loading is slow).


def assert_no_partial_export(export_dir, keras_path):
    """Every numeric version folder is a loadable SavedModel; the .keras file is absent or loads.

    Returns:
        The numeric version folders.
    """
    versions = []
    if export_dir.is_dir():
        for entry in export_dir.iterdir():
            if not entry.name.isdigit():
                assert entry.name.startswith("temp-"), entry  # TF Serving skips these.
                continue
            assert (entry / "saved_model.pb").is_file(), entry
            assert (entry / "variables" / "variables.index").is_file(), entry
            versions.append(entry)
            if entry in _LOADED:
                continue
            served = tf.saved_model.load(str(entry))
            out = served.signatures["serving_default"](image=tf.zeros([2, 28, 28, 1]))
            assert out["probabilities"].shape == (2, 10)
            _LOADED.add(entry)
    if keras_path.exists():
        model = keras3.load_model(str(keras_path))  # Keras 3 (the default) or tf_keras
        assert model.output_shape == (None, 10)
    return versions


def rerun_export(args, export_dir, keras_path, before):
    # At once: within the second a killed export's temp-<second> is named for, as often here.
    run = run_cli(*args)  # In this process: what is tested is what it finds on disk.
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    versions = assert_no_partial_export(export_dir, keras_path)
    assert len(versions) == len(before) + 1 and result["saved_model"] in map(str, versions)
    assert keras_path.is_file()


@pytest.mark.parametrize("point", ["temp-variables-written", "temp-complete", "keras-tmp-complete"])
def test_sigkill_during_export_at_each_step(
    tmp_path, mnist_data_dir, trained_model_dir, fork_main, point
):
    export_dir, keras_path = tmp_path / "exports", tmp_path / "keras" / "cnn.keras"
    args = export_args(mnist_data_dir, trained_model_dir, export_dir, keras_path)
    ready = tmp_path / "ready"
    proc = fork_main(*args, pause_at=point, ready_file=str(ready))
    try:
        assert poll(ready.exists, proc), "export ended before it reached " + point
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in export_dir.iterdir())
    versions = assert_no_partial_export(export_dir, keras_path)
    if point == "keras-tmp-complete":
        assert len(versions) == 1 and not keras_path.exists()
        assert (keras_path.parent / "cnn.keras.tmp.keras").exists()
    else:
        assert versions == [] and len(leftovers) == 1 and leftovers[0].startswith("temp-")
        assert not keras_path.parent.exists() or not any(keras_path.parent.iterdir())
    rerun_export(args, export_dir, keras_path, versions)


def test_sigkill_during_export_at_random_moments(
    tmp_path, mnist_data_dir, trained_model_dir, fork_main
):
    export_dir, keras_path = tmp_path / "exports", tmp_path / "keras" / "cnn.keras"
    args = export_args(mnist_data_dir, trained_model_dir, export_dir, keras_path)
    rng = random.Random(os.getpid())
    # Kill as soon as the temp folder appears, as soon as the .keras temp file appears, and
    # twice after a random delay into the export (graph building or writing: the fork server's
    # children start with main.py's imports done, and the export then takes about a second).
    triggers = [
        lambda: (
            export_dir.is_dir() and any(p.name.startswith("temp-") for p in export_dir.iterdir())
        ),
        lambda: (keras_path.parent / "cnn.keras.tmp.keras").exists(),
        rng.uniform(0.0, 1.5),
        rng.uniform(0.0, 1.5),
    ]
    outcomes = []
    for trigger in triggers:
        proc = fork_main(*args)
        try:
            if callable(trigger):
                poll(trigger, proc)
            else:
                poll(lambda: False, proc, timeout=trigger)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        outcomes.append(proc.returncode)
        assert proc.returncode in (0, -signal.SIGKILL)
        assert_no_partial_export(export_dir, keras_path)
        if keras_path.exists():
            keras_path.unlink()  # So the next kill is judged on its own .keras file.
    assert -signal.SIGKILL in outcomes
    before = [p for p in export_dir.iterdir() if p.name.isdigit()] if export_dir.is_dir() else []
    rerun_export(args, export_dir, keras_path, before)
