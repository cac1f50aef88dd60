"""Sources: IDX and npz readers, validation, and the source resolution order."""

import gzip
import hashlib
import struct
import time

import numpy as np
import pytest
import tensorflow as tf

import data_pipeline
from data_pipeline import DataError, encode_example, load_source, read_idx
from data_pipeline import sources as sources_module


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, train_images, train_labels, test_images, test_labels):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in [
        ("train-images-idx3-ubyte", train_images),
        ("train-labels-idx1-ubyte", train_labels),
        ("t10k-images-idx3-ubyte", test_images),
        ("t10k-labels-idx1-ubyte", test_labels),
    ]:
        (folder / (stem + ".gz")).write_bytes(gzip.compress(idx_bytes(array), compresslevel=1))
    return folder


def assert_one_line(error: DataError, *names: str):
    text = str(error)
    assert "\n" not in text
    for name in names:
        assert name in text, text
    assert error.exit_code == 2


def test_read_idx_takes_counts_from_headers(mnist_dir):
    assert read_idx(mnist_dir / "train-images-idx3-ubyte.gz").shape == (55000, 28, 28)
    assert read_idx(mnist_dir / "train-labels-idx1-ubyte.gz").shape == (55000,)
    assert read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.dtype == np.uint8 and labels.shape == (10000,)


def test_read_idx_raw_equals_gzip(mnist_dir, tmp_path):
    gz = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), read_idx(gz))


def test_mnist_source_matches_files(mnist_source, mnist_dir):
    images, labels = mnist_source.splits["train"]
    assert images.dtype == np.uint8 and images.shape == (55000, 28, 28)
    assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 9
    assert mnist_source.num_records("test") == 10000
    digest = hashlib.sha256()
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]:
        digest.update((mnist_dir / name).read_bytes())
    assert mnist_source.checksum == digest.hexdigest()


GOOD = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x01\x02" + idx_bytes(GOOD)[2:], "not an IDX file"),
        (idx_bytes(GOOD, type_code=0x0D), "element type 0x0d"),
        (idx_bytes(GOOD)[:-10], "truncated"),
        (idx_bytes(GOOD) + b"xx", "trailing bytes"),
        (idx_bytes(GOOD)[:9], "truncated IDX header"),
        (gzip.compress(idx_bytes(GOOD))[:40], "corrupt gzip"),
        (b"", "too short"),
    ],
    ids=["magic", "type", "truncated", "trailing", "header", "gzip", "empty"],
)
def test_malformed_idx(tmp_path, data, problem):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert_one_line(info.value, str(path), problem)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError) as info:
        read_idx(tmp_path / "nope")
    assert_one_line(info.value, "nope", "not found")


def small_arrays(n=4, m=3):
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n).astype(np.uint8),
        rng.integers(0, 256, (m, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, m).astype(np.uint8),
    )


def test_idx_count_mismatch(tmp_path):
    x, y, xt, yt = small_arrays()
    folder = write_idx_folder(tmp_path / "src", x, y[:3], xt, yt)
    with pytest.raises(DataError) as info:
        load_source(folder, env={})
    assert_one_line(info.value, "train-labels-idx1-ubyte.gz", "3 labels but 4 images")


def test_idx_bad_label_and_image_size(tmp_path):
    x, y, xt, yt = small_arrays()
    y[:] = np.arange(len(y)) % 10
    y[1] = 10  # The class count comes from the train labels: 11 classes.
    assert load_source(write_idx_folder(tmp_path / "a", x, y, xt, yt), env={}).num_classes == 11
    y[1] = 9
    yt[2] = 10  # A test label beyond the train classes.
    with pytest.raises(DataError) as info:
        load_source(write_idx_folder(tmp_path / "b", x, y, xt, yt), env={})
    assert_one_line(info.value, "t10k-labels-idx1-ubyte.gz", "[0, 10)")
    x, y, xt, yt = small_arrays()
    with pytest.raises(DataError) as info:
        load_source(write_idx_folder(tmp_path / "c", x, y, xt[:, :27, :], yt), env={})
    assert_one_line(info.value, "t10k-images-idx3-ubyte.gz", "28, 28")


def test_idx_missing_file_and_checksum_mismatch(tmp_path):
    folder = write_idx_folder(tmp_path / "src", *small_arrays())
    (folder / "SHA256SUMS").write_text("0" * 64 + "  t10k-labels-idx1-ubyte.gz\n")
    with pytest.raises(DataError) as info:
        load_source(folder, env={})
    assert_one_line(info.value, "t10k-labels-idx1-ubyte.gz", "SHA256SUMS")
    (folder / "SHA256SUMS").unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_source(folder, env={})
    assert_one_line(info.value, str(folder), "t10k-labels-idx1-ubyte")


def test_npz_matches_idx(mnist_small_npz, mnist_source):
    for source in (
        load_source(mnist_small_npz, env={}),
        load_source(mnist_small_npz.parent, env={}),  # A folder holding mnist.npz.
    ):
        assert source.name.startswith("npz:")
        for split, n in [("train", 1000), ("test", 300)]:
            images, labels = source.splits[split]
            np.testing.assert_array_equal(images, mnist_source.splits[split][0][:n])
            np.testing.assert_array_equal(labels, mnist_source.splits[split][1][:n])
            assert labels.dtype == np.int64


def test_npz_missing_key_and_garbage(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataError) as info:
        load_source(path, env={})
    assert_one_line(info.value, str(path), "y_train")
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError) as info:
        load_source(path, env={})
    assert_one_line(info.value, str(path), "npz")


def test_resolution_order(tmp_path, mnist_small_npz, mnist_dir):
    home = tmp_path / "home"
    (home / ".keras" / "datasets").mkdir(parents=True)
    # source_dir beats MNIST_DIR; MNIST_DIR beats the Keras cache.
    env = {"HOME": str(home), "MNIST_DIR": str(mnist_small_npz)}
    assert load_source(mnist_dir, env=env, allow_download=False).num_records("train") == 55000
    assert load_source(None, env=env, allow_download=False).num_records("train") == 1000
    cached = home / ".keras" / "datasets" / "mnist.npz"
    cached.write_bytes(mnist_small_npz.read_bytes())
    source = load_source(None, env={"HOME": str(home)}, allow_download=False)
    assert source.name == f"npz:{cached}"
    # An explicit location that is wrong is an error, not a reason to fall through.
    with pytest.raises(DataError) as info:
        load_source(tmp_path / "missing", env={"HOME": str(home)})
    assert_one_line(info.value, "--source_dir", "missing")
    with pytest.raises(DataError) as info:
        load_source(None, env={"HOME": str(home), "MNIST_DIR": str(tmp_path)})
    assert_one_line(info.value, "MNIST_DIR", "neither")


def test_offline_without_source_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    # Port 9 on localhost refuses at once: a download that cannot succeed, without internet.
    monkeypatch.setattr(sources_module, "KERAS_ORIGIN", "http://127.0.0.1:9/mnist.npz")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        data_pipeline.prepare(tmp_path / "data", progress=False, allow_download=True)
    assert time.monotonic() - start < 30
    assert_one_line(info.value, "--source_dir", "MNIST_DIR", "download failed")
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError) as info:
        load_source(None, env={"HOME": str(tmp_path)}, allow_download=False)
    assert_one_line(info.value, "--source_dir", "MNIST_DIR", "disabled")


def test_hanging_download_is_abandoned(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "_download", lambda cache_dir: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_source(None, env={"HOME": str(tmp_path)}, timeout=0.5)
    assert time.monotonic() - start < 5
    assert_one_line(info.value, "--source_dir", "MNIST_DIR", "no answer")


def test_encode_example_matches_tf_train_example(mnist_source):
    images, labels = mnist_source.splits["test"]
    for i in (0, 1, 2):
        expected = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[images[i].tobytes()])
                    ),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[labels[i]])),
                }
            )
        )
        encoded = encode_example(images[i], int(labels[i]))
        assert tf.train.Example.FromString(encoded) == expected
        assert len(encoded) == len(expected.SerializeToString())
