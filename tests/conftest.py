"""Shared session fixtures. MNIST comes from $MNIST_DIR; a missing dataset fails, never skips."""

import os
import pathlib

import tfenv  # Before TensorFlow: it sets TensorFlow's log level on first import.

# isort: split
import numpy as np
import pytest
import tensorflow as tf

import data_pipeline

tfenv.silence_python_logging()

# One intra-op thread per process: the tests run small networks for a few steps, two
# pytest-xdist workers at once on 2 cores, and TensorFlow's default (a thread per core that
# spin-waits between small ops) spends more CPU for the same work (2026-12-06: 10-12 % less for
# a cnn or rnn trained and evaluated in-process; docs/development.md). Read when TensorFlow's
# runtime starts (its first op or session), so it holds here and in the interpreters the tests
# start; the inter-op pool is left alone (collectives and the cluster need threads to wait in).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

# The files, costliest first (the sum of their tests' times in `make test`'s run, 2026-12-06;
# files not listed come after them). `--dist loadfile` hands each worker a whole file, the
# next one in the queue whenever it is almost out of work; pytest-xdist's default queue is by
# number of tests, which put the few-test, minute-long files (the cluster, the full disks,
# Beam) last, where one of them kept a worker busy long after the other had finished. Longest
# first keeps the two workers' ends close (2026-12-06: 7 min 22 s -> 6 min 47 s of pytest).
COSTLIEST_FIRST = (
    "test_networks.py",
    "test_keras3.py",
    "test_bridge.py",
    "test_faults_data.py",
    "test_data_beam.py",
    "test_distributed.py",
    "test_models.py",
    "test_user_models.py",
    "test_faults_disk.py",
    "test_faults_train.py",
    "test_data_stream.py",
    "test_preflight.py",
    "test_predict_inputs.py",
    "test_byo_digits.py",
    "test_newcomer.py",
    "test_keras3_networks.py",
    "test_data_reader.py",
    "test_cli.py",
    "test_data_writer.py",
    "test_data_images.py",
    "test_determinism.py",
    "test_data_sources.py",
    "test_readme.py",
    "test_find_python.py",
    "test_bench.py",
)


def pytest_configure(config):
    """Keeps the files in ``COSTLIEST_FIRST``'s order under ``--dist loadfile`` (no re-sort)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Orders the files as ``COSTLIEST_FIRST`` says; a file's own tests keep their order."""
    rank = {name: index for index, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """The real MNIST IDX folder named by $MNIST_DIR."""
    value = os.environ.get("MNIST_DIR")
    if not value:
        pytest.fail("MNIST_DIR is not set: export MNIST_DIR=/path/to/mnist (the IDX .gz folder)")
    path = pathlib.Path(value)
    if not path.is_dir():
        pytest.fail(f"MNIST_DIR={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def mnist_source(mnist_dir) -> data_pipeline.Source:
    """MNIST loaded (and validated) from $MNIST_DIR."""
    return data_pipeline.load_source(mnist_dir)


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory, mnist_source) -> pathlib.Path:
    """MNIST prepared once per run (1000 records per shard, uncompressed). Treat as read-only."""
    data_dir = tmp_path_factory.mktemp("mnist_data")
    data_pipeline.prepare(data_dir, source=mnist_source, progress=False)
    return data_dir


@pytest.fixture(scope="session")
def mnist_small_npz(tmp_path_factory, mnist_source) -> pathlib.Path:
    """A Keras-layout mnist.npz with the first 1000 train and 300 test examples of MNIST."""
    path = tmp_path_factory.mktemp("mnist_small") / "mnist.npz"
    (x_train, y_train), (x_test, y_test) = (
        mnist_source.splits["train"],
        mnist_source.splits["test"],
    )
    np.savez(
        path,
        x_train=x_train[:1000],
        y_train=y_train[:1000].astype(np.uint8),
        x_test=x_test[:300],
        y_test=y_test[:300].astype(np.uint8),
    )
    return path


# --- UCI digits (scikit-learn's copy): a second, non-MNIST dataset -------------------------------

DIGITS_TRAIN = 1500  # The first 1,500 of the 1,797 images train, the other 297 test.
# Class folders named in words: sorted, they are not in label order, which the tests rely on.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="session")
def digits():
    """The UCI digits: uint8 images [1797, 8, 8] (0..16 scaled to 0..255), int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.rint(data.images * (255 / 16)).astype(np.uint8), data.target.astype(np.int64)


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits) -> pathlib.Path:
    """The digits as a Keras-layout .npz (np.savez_compressed, labels uint8)."""
    images, labels = digits
    path = tmp_path_factory.mktemp("digits_npz") / "digits.npz"
    np.savez_compressed(
        path,
        x_train=images[:DIGITS_TRAIN],
        y_train=labels[:DIGITS_TRAIN].astype(np.uint8),
        x_test=images[DIGITS_TRAIN:],
        y_test=labels[DIGITS_TRAIN:].astype(np.uint8),
    )
    return path


def write_png_folder(root, images, labels, names, split_at):
    """Writes ``root/{train,test}/<names[label]>/<index>.png``, one grayscale PNG per image."""
    for index, (image, label) in enumerate(zip(images, labels)):
        split = "train" if index < split_at else "test"
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        png = tf.io.encode_png(image.reshape(*image.shape[:2], -1)).numpy()
        (folder / f"{index:04d}.png").write_bytes(png)
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory, digits) -> pathlib.Path:
    """The digits as image_dataset_from_directory expects them: train/<word>/NNNN.png, test/..."""
    images, labels = digits
    root = tmp_path_factory.mktemp("digits_png")
    return write_png_folder(root, images, labels, DIGIT_NAMES, DIGITS_TRAIN)
