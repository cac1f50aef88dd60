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
del tf  # Imported only so TensorFlow loads after tfenv.


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
