"""Bring your own model and images, end to end on real data of another shape: the UCI digits.

The digits (8x8 grayscale, scikit-learn's copy) go through ``--mode=prepare`` twice, as a
Keras-layout ``.npz`` and as a folder of PNG files with word class names, and each trains a user
network the bridge has never seen: a builder from a test module (BatchNorm, L2, softmax output)
on the npz, a ``.keras`` file with a softmax output on the folder. Each is evaluated, predicted
and exported, and both exports are reloaded in one fresh TensorFlow-only process, whose
probabilities must equal the Estimator's.
"""

import csv
import os
import pickle
from typing import Any, Dict, NamedTuple

import numpy as np
import pytest
import tf_keras as keras
from cli_helpers import estimator_probabilities, run_cli, run_fresh_python
from conftest import DIGIT_NAMES, DIGITS_TRAIN

import data_pipeline
import estimator_bridge
import jobs


class Run(NamedTuple):
    """One dataset prepared from the command line, and one model trained and used on it."""

    spec: data_pipeline.DatasetSpec
    config: estimator_bridge.Config
    trained: Dict[str, Any]
    evaluated: Dict[str, Any]
    predicted: Dict[str, Any]
    exported: Dict[str, Any]


def _prepare_and_run(source_dir, root, model) -> Run:
    """``--mode=prepare`` of ``source_dir`` into ``root/data``, then every job of ``model`` on it.

    150 steps of 64 at a learning rate of 3e-3 (seed 0) train either model far past chance.
    """
    run = run_cli("--mode=prepare", f"--source_dir={source_dir}", f"--data_dir={root / 'data'}")
    assert run.returncode == 0, run.stderr[-2000:]
    config = estimator_bridge.Config(
        model=str(model),
        data_dir=str(root / "data"),
        model_dir=str(root / "model"),
        export_dir=str(root / "export"),
        output_dir=str(root / "predictions"),
        batch_size=64,
        train_steps=150,
        learning_rate=3e-3,
        seed=0,
        save_checkpoints_steps=150,
        progress=False,
    )
    trained = jobs.train(config)
    return Run(
        data_pipeline.load_spec(config.data_dir),
        config,
        trained,
        jobs.evaluate(config),
        jobs.predict(config),
        jobs.export(config),
    )


def _test_images(data_dir):
    features, labels = next(iter(data_pipeline.make_dataset(data_dir, "test", 1000)))
    return features["image"].numpy(), labels.numpy()


def _encode(images, labels):
    return [
        data_pipeline.encode_example(np.round(image * 255).astype(np.uint8), int(label))
        for image, label in zip(images, labels)
    ]


@pytest.fixture(scope="module")
def npz_run(digits_npz, tmp_path_factory):
    """The npz prepared, then user_models:build_bn_net trained, evaluated, predicted, exported."""
    return _prepare_and_run(
        digits_npz, tmp_path_factory.mktemp("digits_npz_run"), "user_models:build_bn_net"
    )


@pytest.fixture(scope="module")
def softmax_file(tmp_path_factory):
    """A small user network for 8x8x1 images with a softmax output, saved as a .keras file."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    path = tmp_path_factory.mktemp("digits_file") / "tiny_digits.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def folder_run(digits_folder, softmax_file, tmp_path_factory):
    """The PNG folder prepared, then the .keras file trained, evaluated, predicted, exported."""
    return _prepare_and_run(
        digits_folder, tmp_path_factory.mktemp("digits_folder_run"), softmax_file
    )


@pytest.fixture(scope="module")
def served(npz_run, folder_run, tmp_path_factory):
    """Both exports run on their test images in one fresh TensorFlow-only process.

    Each answers through ``serving.load`` (raw images) and its ``examples:classification``
    signature (serialized tf.Examples). One process serves both: its start costs more than the
    two loads.

    Returns:
        ``{"npz": outputs, "folder": outputs}``, each an ``.npz`` of ``fast`` (probabilities),
        ``scores`` and ``classes``.
    """
    out = tmp_path_factory.mktemp("served")
    exports = {"npz": npz_run, "folder": folder_run}
    for name, run in exports.items():
        images, labels = _test_images(run.config.data_dir)
        np.save(out / f"{name}-images.npy", images)
        (out / f"{name}-examples.pkl").write_bytes(pickle.dumps(_encode(images, labels)))
    saved_models = {name: run.exported["saved_model"] for name, run in exports.items()}
    run_fresh_python(f"""
import pickle, numpy as np, tensorflow as tf
import serving
for name, saved_model in {saved_models!r}.items():
    images = np.load(f"{out}/{{name}}-images.npy")
    examples = pickle.loads(open(f"{out}/{{name}}-examples.pkl", "rb").read())
    fast = serving.load(saved_model)(image=images)
    m = tf.saved_model.load(saved_model)
    cls = m.signatures["examples:classification"](inputs=tf.constant(examples))
    np.savez(f"{out}/{{name}}-served.npz", fast=fast["probabilities"],
             scores=cls["scores"].numpy(), classes=cls["classes"].numpy().astype(str),
             names=fast["class_names"].astype(str), ids=fast["classes"])
""")
    return {name: np.load(out / f"{name}-served.npz") for name in exports}


def test_npz_digits_train_a_user_builder_on_their_own_shape(npz_run, digits):
    spec, config, trained, evaluated, predicted, _ = npz_run
    assert spec.image_shape == (8, 8, 1) and spec.num_classes == 10
    assert spec.class_names == tuple(str(i) for i in range(10))
    assert spec.num_records("train") == DIGITS_TRAIN and spec.num_records("test") == 297
    assert trained["global_step"] == 150
    # 150 steps of 64 on 1,500 8x8 digits: far above chance (0.1) on the 297 held-out ones.
    assert evaluated["examples"] == 297 and evaluated["accuracy"] > 0.85
    # The builder took the spec's shape: its first conv kernel reads one channel of 8x8 images.
    network = estimator_bridge.keras_model_from_checkpoint(config)
    assert network.input_shape == (None, 8, 8, 1) and network.output_shape == (None, 10)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in network.layers)
    with open(predicted["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    _, labels = digits
    assert [int(row["label"]) for row in rows] == labels[DIGITS_TRAIN:].tolist()
    assert all(row["class_name"] == row["class"] for row in rows)
    assert "file" not in rows[0]  # an npz names no file per image
    assert predicted["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)


def test_npz_digits_export_serves_the_estimators_probabilities(npz_run, served):
    images, _ = _test_images(npz_run.config.data_dir)
    expected = estimator_probabilities(npz_run.config, images)
    np.testing.assert_allclose(served["npz"]["fast"], expected, atol=1e-5)
    np.testing.assert_allclose(served["npz"]["scores"], expected, atol=1e-5)
    assert served["npz"]["classes"][0].tolist() == [str(i) for i in range(10)]


def test_png_folder_digits_train_a_softmax_model_file(folder_run, digits_folder):
    spec, _, trained, evaluated, predicted, _ = folder_run
    # Class names are the folder names in sorted order, not in label order.
    assert spec.class_names == tuple(sorted(DIGIT_NAMES))
    assert spec.image_shape == (8, 8, 1)
    assert trained["global_step"] == 150
    assert evaluated["examples"] == 297 and evaluated["accuracy"] > 0.85
    # Every predicted row names its image, its class and the true one: the image's folder.
    with open(predicted["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = spec.record_files("test")
    assert len(rows) == len(files) == 297
    assert [row["file"] for row in rows] == files
    for row, path in zip(rows, files):
        assert row["label_name"] == os.path.basename(os.path.dirname(path))
        assert row["label_name"] == spec.class_names[int(row["label"])]
        assert row["class_name"] == spec.class_names[int(row["class"])]
    assert os.path.isfile(os.path.join(digits_folder, files[0]))
    assert predicted["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)


def test_png_folder_digits_export_names_the_classes(folder_run, served):
    images, _ = _test_images(folder_run.config.data_dir)
    expected = estimator_probabilities(folder_run.config, images)
    np.testing.assert_allclose(served["folder"]["fast"], expected, atol=1e-5)
    np.testing.assert_allclose(served["folder"]["scores"], expected, atol=1e-5)
    # TF Serving's Classify answer carries the dataset's class names; the image signature names
    # each row's predicted class (the folder names, as strings).
    assert served["folder"]["classes"][0].tolist() == list(folder_run.spec.class_names)
    names = folder_run.spec.class_names
    assert served["folder"]["names"].tolist() == [names[i] for i in served["folder"]["ids"]]
    assert set(served["folder"]["names"]) <= set(names) and len(set(served["folder"]["names"])) > 3
