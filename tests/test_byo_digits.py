"""Bring your own model and images, end to end on real data of another shape: the UCI digits.

The digits (8x8 grayscale, scikit-learn's copy) go through ``--mode=prepare`` twice, as a
Keras-layout ``.npz`` and as a folder of PNG files with word class names, and each trains a user
network the bridge has never seen: a builder from a test module (BatchNorm, L2, softmax output)
on the npz, a ``.keras`` file with a softmax output on the folder. Each is evaluated, predicted
and exported, and the export is reloaded in a fresh TensorFlow-only process, whose probabilities
must equal the Estimator's.
"""

import csv
import os
import pickle

import numpy as np
import pytest
import tf_keras as keras
from cli_helpers import estimator_probabilities, run_fresh_python, run_main
from conftest import DIGIT_NAMES, DIGITS_TRAIN

import data_pipeline
import estimator_bridge
import jobs


def _config(data_dir, root, model, **overrides):
    settings = dict(
        model=str(model),
        data_dir=str(data_dir),
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
    return estimator_bridge.Config(**{**settings, **overrides})


def _test_images(data_dir):
    features, labels = next(iter(data_pipeline.make_dataset(data_dir, "test", 1000)))
    return features["image"].numpy(), labels.numpy()


def _served(saved_model, images, serialized, out):
    """Probabilities of the export's signatures, computed in a fresh TensorFlow-only process."""
    np.save(out / "images.npy", images)
    (out / "examples.pkl").write_bytes(pickle.dumps(serialized))
    run_fresh_python(f"""
import pickle, numpy as np, tensorflow as tf
import serving
images = np.load({str(out / "images.npy")!r})
examples = pickle.loads(open({str(out / "examples.pkl")!r}, "rb").read())
fast = serving.load({saved_model!r})(image=images)
m = tf.saved_model.load({saved_model!r})
cls = m.signatures["examples:classification"](inputs=tf.constant(examples))
np.savez({str(out / "served.npz")!r}, fast=fast["probabilities"], scores=cls["scores"].numpy(),
         classes=cls["classes"].numpy().astype(str))
""")
    return np.load(out / "served.npz")


def _encode(images, labels):
    return [
        data_pipeline.encode_example(np.round(image * 255).astype(np.uint8), int(label))
        for image, label in zip(images, labels)
    ]


@pytest.fixture(scope="module")
def npz_run(digits_npz, tmp_path_factory):
    """The npz prepared, then user_models:build_bn_net trained, evaluated, predicted, exported."""
    root = tmp_path_factory.mktemp("digits_npz_run")
    spec = data_pipeline.prepare(root / "data", source_dir=digits_npz, progress=False)
    config = _config(root / "data", root, "user_models:build_bn_net")
    trained = jobs.train(config)
    return spec, config, trained, jobs.evaluate(config), jobs.predict(config), jobs.export(config)


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
    assert predicted["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)


def test_npz_digits_export_serves_the_estimators_probabilities(npz_run, tmp_path):
    _, config, _, _, _, exported = npz_run
    images, labels = _test_images(config.data_dir)
    expected = estimator_probabilities(config, images)
    served = _served(exported["saved_model"], images, _encode(images, labels), tmp_path)
    np.testing.assert_allclose(served["fast"], expected, atol=1e-5)
    np.testing.assert_allclose(served["scores"], expected, atol=1e-5)
    assert served["classes"][0].tolist() == [str(i) for i in range(10)]


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
    """The PNG folder prepared from the command line, then the .keras file trained on it."""
    root = tmp_path_factory.mktemp("digits_folder_run")
    run = run_main("--mode=prepare", f"--source_dir={digits_folder}", f"--data_dir={root / 'data'}")
    assert run.returncode == 0, run.stderr[-2000:]
    spec = data_pipeline.load_spec(root / "data")
    config = _config(root / "data", root, softmax_file)
    trained = jobs.train(config)
    return spec, config, trained, jobs.evaluate(config), jobs.predict(config), jobs.export(config)


def test_png_folder_digits_train_a_softmax_model_file(folder_run, digits_folder):
    spec, _, trained, evaluated, predicted, _ = folder_run
    # Class names are the folder names in sorted order, not in label order.
    assert spec.class_names == tuple(sorted(DIGIT_NAMES))
    assert spec.image_shape == (8, 8, 1)
    assert trained["global_step"] == 150
    assert evaluated["examples"] == 297 and evaluated["accuracy"] > 0.85
    # Every predicted row names its class and the true one: the folder the image came from.
    with open(predicted["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = spec.record_files("test")
    assert len(rows) == len(files) == 297
    for row, path in zip(rows, files):
        assert row["label_name"] == os.path.basename(os.path.dirname(path))
        assert row["label_name"] == spec.class_names[int(row["label"])]
        assert row["class_name"] == spec.class_names[int(row["class"])]
    assert os.path.isfile(os.path.join(digits_folder, files[0]))
    assert predicted["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)


def test_png_folder_digits_export_names_the_classes(folder_run, tmp_path):
    spec, config, _, _, _, exported = folder_run
    images, labels = _test_images(config.data_dir)
    expected = estimator_probabilities(config, images)
    served = _served(exported["saved_model"], images, _encode(images, labels), tmp_path)
    np.testing.assert_allclose(served["fast"], expected, atol=1e-5)
    np.testing.assert_allclose(served["scores"], expected, atol=1e-5)
    # TF Serving's Classify answer carries the dataset's class names.
    assert served["classes"][0].tolist() == list(spec.class_names)
