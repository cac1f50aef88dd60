"""Tests for keras_models: the four networks used as plain Keras models, no Estimator."""

import os
import pathlib
import subprocess
import sys

import tfenv  # noqa: F401  (before TensorFlow: quiet logs, Keras 2 via tf_keras)

# isort: split
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import data_pipeline
import keras_models
from keras_models import MODEL_NAMES, MODELS, build_model, get_builder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN = 1024  # real MNIST images used for training checks: enough for the loss to fall


# --- data: the first images of the real MNIST training set ------------------------------------


@pytest.fixture(scope="module")
def mnist():
    """(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N]) from MNIST_DIR; never skips."""
    mnist_dir = os.environ.get("MNIST_DIR")
    if not mnist_dir:
        pytest.fail("MNIST_DIR is not set; point it at the MNIST IDX files")
    directory = pathlib.Path(mnist_dir)
    # read_idx raises (so the test fails) on a missing or corrupt file.
    images = data_pipeline.read_idx(directory / "train-images-idx3-ubyte.gz")[:NUM_TRAIN]
    labels = data_pipeline.read_idx(directory / "train-labels-idx1-ubyte.gz")[:NUM_TRAIN]
    assert images.shape == (NUM_TRAIN, 28, 28) and labels.shape == (NUM_TRAIN,)
    return (images[..., None] / 255.0).astype(np.float32), labels.astype(np.int32)


@pytest.fixture(autouse=True)
def _fresh_keras():
    """Deterministic weights and no layer-name drift between tests."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


# --- parameter counts from the layer formulas ---------------------------------------------------


def conv2d_params(k, cin, cout):
    return k * k * cin * cout + cout


def conv1d_params(k, cin, cout):
    return k * cin * cout + cout


def gru_params(inputs, units):
    # Keras 2 default reset_after=True: separate input and recurrent biases for 3 gates.
    return 3 * (inputs * units + units * units + 2 * units)


def dense_params(inputs, outputs):
    return inputs * outputs + outputs


HEAD = dense_params(256, 1024) + dense_params(1024, 10)  # dense1 on gru2's 256 units, logits
EXPECTED_PARAMS = {
    "cnn": conv2d_params(5, 1, 32)
    + conv2d_params(5, 32, 64)
    + dense_params(7 * 7 * 64, 1024)
    + dense_params(1024, 10),
    "rnn": gru_params(28, 128) + gru_params(128, 256) + HEAD,
    "birnn": 2 * (gru_params(28, 128) + gru_params(128, 256)) + HEAD,
    "cnn_rnn": conv1d_params(5, 28, 32) + gru_params(32, 128) + gru_params(128, 256) + HEAD,
}

EXPECTED_LAYERS = {
    "cnn": ["image", "conv1", "pool1", "conv2", "pool2", "flatten", "dense1", "dropout", "logits"],
    "rnn": ["image", "standardize", "rows", "gru1", "gru2", "dense1", "dropout", "logits"],
    "birnn": [
        "image",
        "standardize",
        "rows",
        "gru1_fw",
        "gru1_bw",
        "gru2_fw",
        "gru2_bw",
        "sum_states",
        "dense1",
        "dropout",
        "logits",
    ],
    "cnn_rnn": [
        "image",
        "standardize",
        "rows",
        "conv1",
        "pool1",
        "gru1",
        "gru2",
        "dense1",
        "dropout",
        "logits",
    ],
}


def test_cnn_parameter_count_is_the_tutorials():
    assert EXPECTED_PARAMS["cnn"] == 3_274_634
    assert build_model("cnn").count_params() == 3_274_634


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shape_dtype_params_and_names(name, mnist):
    model = build_model(name)
    assert model.name == name
    assert [layer.name for layer in model.layers] == EXPECTED_LAYERS[name]
    assert model.input_names == ["image"]
    assert model.input.dtype == "float32"
    assert model.count_params() == EXPECTED_PARAMS[name]

    images, _ = mnist
    logits = model(images[:8], training=False)
    assert logits.shape == (8, 10)
    assert logits.dtype == "float32"


# --- the recurrent networks' initialisation and input scaling --------------------------------


@pytest.mark.parametrize("layer_name, inputs, units", [("gru1", 28, 128), ("gru2", 128, 256)])
def test_gru_kernels_are_orthogonal_per_gate(layer_name, inputs, units):
    layer = build_model("rnn").get_layer(layer_name)
    kernel, recurrent, _ = layer.get_weights()
    assert kernel.shape == (inputs, 3 * units) and recurrent.shape == (units, 3 * units)
    for gate in range(3):
        block = slice(gate * units, (gate + 1) * units)
        # Square recurrent blocks are orthogonal; the wider input blocks have orthonormal rows.
        np.testing.assert_allclose(
            recurrent[:, block].T @ recurrent[:, block], np.eye(units), atol=1e-5
        )
        np.testing.assert_allclose(kernel[:, block] @ kernel[:, block].T, np.eye(inputs), atol=1e-5)
    # Keras's "orthogonal" over the whole [units, 3 * units] matrix would give each block
    # squared singular values of about 1/3; the gates must differ from one another.
    assert not np.allclose(recurrent[:, :units], recurrent[:, units : 2 * units])


def test_whole_matrix_orthogonal_option_is_keras_orthogonal():
    recurrent = build_model("rnn", gru_initializer="orthogonal").get_layer("gru1").get_weights()[1]
    # One orthogonal [128, 384] matrix: orthonormal rows, so each square gate block is not.
    np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(128), atol=1e-5)
    gate = recurrent[:, :128]
    assert np.trace(gate.T @ gate) / 128 == pytest.approx(1 / 3, abs=0.05)


@pytest.mark.parametrize("name", ["rnn", "birnn", "cnn_rnn"])
def test_standardize_can_be_switched_off(name, mnist):
    model = build_model(name, standardize=False)
    assert [layer.name for layer in model.layers] == [
        n for n in EXPECTED_LAYERS[name] if n != "standardize"
    ]
    assert model.count_params() == EXPECTED_PARAMS[name]
    assert model(mnist[0][:2]).shape == (2, 10)


def test_gate_orthogonal_config_seed_and_bad_shape():
    init = keras_models.networks.GateOrthogonal(gates=4, seed=7)
    clone = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert clone.get_config() == {"gates": 4, "seed": 7}
    np.testing.assert_array_equal(init((16, 32)), clone((16, 32)))  # same seed, same matrix
    with pytest.raises(ValueError, match="do not split into 4"):
        init((16, 30))


def test_standardize_gives_training_pixels_zero_mean_unit_std(mnist_source):
    pixels = mnist_source.splits["train"][0].astype(np.float32)[..., None] / 255.0
    out = build_model("rnn").get_layer("standardize")(pixels).numpy()
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3


# --- plain Keras training, saving and dropout ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_trains_with_plain_compile_fit(name, mnist):
    images, labels = mnist
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build_model(name)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=loss)
    # AutoGraph skips the ``keras`` package but not ``tf_keras``: left alone, the first fit in a
    # process converts tf_keras' whole training step (birnn 42 s -> 18 s without it).
    model.train_step = tf.autograph.experimental.do_not_convert(model.train_step)
    # Same fixed batch before and after, so only the weights differ; eager calls avoid tracing
    # an evaluation function on top of the training one.
    probe_x, probe_y = images[:256], labels[:256]
    before = float(loss(probe_y, model(probe_x, training=False)))
    model.fit(images, labels, batch_size=64, epochs=1, shuffle=True, verbose=0)  # 16 steps
    after = float(loss(probe_y, model(probe_x, training=False)))
    # Measured: cnn ~0.18x, the recurrent nets 0.66-0.76x after these 16 steps.
    assert after < 0.85 * before, f"{name}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_save_and_reload_give_identical_outputs(name, mnist, tmp_path):
    model = build_model(name)
    # Nudge every weight (biases start at zero) so a reload that re-initialises would show.
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.01, w.shape) for w in model.get_weights()])
    x = mnist[0][:16]
    expected = model(x, training=False).numpy()

    for suffix in (".keras", ".h5"):
        path = tmp_path / f"{name}{suffix}"
        model.save(path)
        reloaded = keras.models.load_model(path)
        assert reloaded.name == name, suffix
        assert [layer.name for layer in reloaded.layers] == EXPECTED_LAYERS[name], suffix
        np.testing.assert_allclose(
            reloaded(x, training=False).numpy(), expected, atol=1e-6, err_msg=suffix
        )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dropout_feeds_the_logits(name, mnist):
    model = build_model(name)
    # The tutorial's recurrent nets fed dense1's output straight to the logits; check the graph.
    assert model.get_layer("logits").input is model.get_layer("dropout").output
    assert model.get_layer("dropout").input is model.get_layer("dense1").output
    assert model.get_layer("dropout").rate == pytest.approx(0.4)

    x = mnist[0][:8]
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=True))


def test_birnn_backward_stack_reads_rows_bottom_up(mnist):
    units = (4, 5)
    model = build_model("birnn", gru_units=units, dense_units=8)
    backward = keras.Model(model.input, model.get_layer("gru2_bw").output)

    # A plain forward stack with the backward stack's weights, fed the rows upside down.
    image = keras.Input((28, 28, 1))
    x = keras.layers.Reshape((28, 28))(model.get_layer("standardize")(image))
    gru1 = keras.layers.GRU(units[0], return_sequences=True)
    gru2 = keras.layers.GRU(units[1])
    reference = keras.Model(image, gru2(gru1(x)))
    gru1.set_weights(model.get_layer("gru1_bw").get_weights())
    gru2.set_weights(model.get_layer("gru2_bw").get_weights())

    images = mnist[0][:4]
    np.testing.assert_allclose(
        backward(images).numpy(), reference(images[:, ::-1]).numpy(), atol=1e-5
    )


# --- mixed precision --------------------------------------------------------------------------


def test_mixed_bfloat16_keeps_logits_and_variables_float32(mnist):
    images, _ = mnist
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        for name in MODEL_NAMES:
            model = build_model(name)
            assert model.get_layer("dense1").compute_dtype == "bfloat16", name
            assert model.get_layer("logits").compute_dtype == "float32", name
            assert all(v.dtype == "float32" for v in model.weights), name
            logits = model(images[:4], training=False)
            assert logits.dtype == "float32", name
            assert np.all(np.isfinite(logits)), name
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- registry and hyper-parameters --------------------------------------------------------------


def test_registry():
    assert MODEL_NAMES == ("birnn", "cnn", "cnn_rnn", "rnn")
    assert set(MODELS) == set(MODEL_NAMES)
    assert get_builder("cnn") is keras_models.build_cnn
    assert get_builder("cnn_rnn") is keras_models.build_cnn_rnn
    with pytest.raises(TypeError):
        MODELS["mlp"] = keras_models.build_cnn  # read-only mapping
    model = build_model("rnn", dense_units=16, num_classes=3)
    assert model.get_layer("dense1").units == 16
    assert model.output_shape == (None, 3)


@pytest.mark.parametrize("call", [get_builder, build_model])
def test_unknown_model_lists_the_choices(call):
    with pytest.raises(ValueError) as info:
        call("foo")
    assert str(info.value) == "unknown model 'foo'; choose one of: birnn, cnn, cnn_rnn, rnn"


def test_unknown_hparam_is_a_type_error():
    with pytest.raises(TypeError):
        build_model("cnn", gru_units=(1, 2))


@pytest.mark.parametrize(
    "name, hparams, argument",
    [
        ("cnn", {"num_classes": 0}, "num_classes"),
        ("rnn", {"dense_units": -1}, "dense_units"),
        ("birnn", {"dropout_rate": 1.0}, "dropout_rate"),
        ("cnn_rnn", {"dropout_rate": -0.1}, "dropout_rate"),
        ("cnn", {"input_shape": (28, 28)}, "input_shape"),
        ("rnn", {"input_shape": (28, 28, 1, 1)}, "input_shape"),
        ("cnn", {"conv_filters": (32, 0)}, "conv_filters"),
        ("cnn", {"kernel_size": 0}, "kernel_size"),
        ("cnn_rnn", {"conv_filters": 0}, "conv_filters"),
        ("rnn", {"gru_units": (128, 0)}, "gru_units"),
        ("birnn", {"gru_units": (128,)}, "gru_units"),
        ("cnn_rnn", {"gru_units": (128, 256.0)}, "gru_units"),
        ("rnn", {"standardize": 1}, "standardize"),
        ("birnn", {"gru_initializer": "glorot_uniform"}, "gru_initializer"),
    ],
)
def test_invalid_hparams_raise(name, hparams, argument):
    with pytest.raises(ValueError, match=argument) as info:
        build_model(name, **hparams)
    assert "\n" not in str(info.value)


def test_dropout_rate_zero_is_allowed():
    assert build_model("cnn", dropout_rate=0).get_layer("dropout").rate == 0


# --- import hygiene -----------------------------------------------------------------------------


def test_import_does_not_load_tensorflow_estimator():
    # A fresh interpreter as a user outside this project has it: no tfenv, no TF_USE_LEGACY_KERAS.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import sys, keras_models\n"
        "keras_models.build_model('cnn')\n"
        "assert 'tensorflow' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.startswith('tensorflow_estimator')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
