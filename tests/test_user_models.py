"""Bring your own model: builders from any module and Keras model files through the bridge.

``user_models.py`` (next to this file) holds user-style builders with unnamed layers; the
command-line runs put ``tests/`` on the import path so ``--model=user_models:build_bn_net``
imports. They run ``main.py`` in the test process (``cli_helpers.run_cli``: the jobs are the
same, without a 4-7 s interpreter start each). A new interpreter is started only where it is
the point: the exports must load and serve with TensorFlow alone (one process serves both).
"""

import dataclasses
import json
import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
import user_models
from cli_helpers import assert_cli_error, estimator_probabilities, run_cli, run_fresh_python

import data_pipeline
import estimator_bridge
import jobs
import keras_models
import onnx_export
import serving
from estimator_bridge import PREDICT, TRAIN
from keras_models import ModelError, keras3, resolve_model

TESTS = os.path.dirname(os.path.abspath(__file__))
BN_NET = "user_models:build_bn_net"


@pytest.fixture(scope="module")
def test_batch(mnist_data_dir):
    """The first 16 real test images and labels."""
    features, labels = next(iter(data_pipeline.make_dataset(mnist_data_dir, "test", 16)))
    return features["image"].numpy(), labels.numpy()


def _graph_spec(source, mode, images, labels=None, **params):
    """model_fn's EstimatorSpec for ``source`` on a constant batch, in a new graph."""
    graph = tf.Graph()
    with graph.as_default():
        spec = estimator_bridge.model_fn(
            {"image": tf.constant(images)},
            None if labels is None else tf.constant(labels, tf.int64),
            mode,
            {"model": source, "learning_rate": 1e-3, **params},
        )
    return spec, graph


# ---- resolving --model ---------------------------------------------------------------------


def test_resolve_registry_builder_callable_and_labels():
    cnn = resolve_model("cnn")
    assert (cnn.kind, cnn.label, cnn.builder) == ("registry", "cnn", keras_models.build_cnn)
    user = resolve_model(BN_NET, {"width": 4})
    assert (user.kind, user.label, user.builder) == (
        "builder",
        "build_bn_net",
        user_models.build_bn_net,
    )
    assert resolve_model(user_models.build_bn_net).label == "build_bn_net"
    assert keras_models.model_label("a/b/digits_net.keras") == "digits_net"
    assert keras_models.model_label("pkg.mod:Factory.build") == "build"
    assert keras_models.parse_model_params(' {"width": 4} ') == {"width": 4}
    assert keras_models.parse_model_params(None) == {}


def test_builder_gets_the_data_shape_and_class_count_when_it_takes_them():
    # build_bn_net names input_shape, num_classes and dropout_rate: all three are passed, and
    # --model_params override them.
    model = resolve_model(BN_NET, {"width": 4}).build((8, 8, 3), 5, dropout_rate=0.1)
    assert model.input_shape == (None, 8, 8, 3) and model.output_shape == (None, 5)
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [
        0.1
    ]
    model = resolve_model(BN_NET, {"dropout_rate": 0.3}).build((28, 28, 1), 10, dropout_rate=0.1)
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [
        0.3
    ]
    # build_shared_net takes num_classes but no input_shape or dropout_rate.
    model = resolve_model("user_models:build_shared_net").build((28, 28, 1), 3, dropout_rate=0.5)
    assert model.output_shape == (None, 3)


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
@pytest.mark.parametrize("shape, classes", [((8, 8, 1), 10), ((12, 16, 3), 4)])
def test_builtin_networks_build_for_other_image_shapes(name, shape, classes):
    model = resolve_model(name).build(shape, classes)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, classes)
    out = model(np.random.default_rng(0).random((2, *shape), dtype=np.float32), training=False)
    assert out.shape == (2, classes) and np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "name, shape, needle",
    [("cnn", (3, 3, 1), "cnn needs images of at least 4x4"), ("cnn_rnn", (1, 8, 1), "2x1")],
)
def test_too_small_images_are_a_clear_builder_error(name, shape, needle):
    with pytest.raises(ModelError, match=needle) as info:
        resolve_model(name).build(shape, 10)
    assert "\n" not in str(info.value)


def test_mobilenet_v2_from_tf_keras_applications():
    """A nested-block, BatchNorm, softmax network users would bring (weights=None: offline)."""
    resolved = resolve_model(
        "tf_keras.applications:MobileNetV2", {"weights": None, "alpha": 0.35, "classes": 10}
    )
    model = resolved.build((32, 32, 3), 10)
    assert keras_models.check_classifier(model) == keras_models.SOFTMAX
    batch_norms = [x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)]
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    params = {"model_params": resolved.params, "input_shape": (32, 32, 3), "num_classes": 10}
    # One graph, TRAIN's (each build of MobileNetV2's graph takes seconds): the loss reads the
    # logits the bridge found (what PREDICT returns as "logits"), the softmax's input.
    spec, graph = _graph_spec(resolved.source, TRAIN, images, np.array([1, 2]), **params)
    (loss,) = [
        op for op in graph.get_operations() if op.type == "SparseSoftmaxCrossEntropyWithLogits"
    ]
    assert loss.inputs[0].op.type == "BiasAdd"
    # The train op groups the minimize op with both moving averages of every BatchNorm.
    assert len(spec.train_op.control_inputs) == 1 + 2 * len(batch_norms) > 100


@pytest.mark.parametrize(
    "source, params, shape, needle",
    [
        ("user_models:build_two_inputs", {}, (28, 28, 1), "has 2 inputs (image, extra)"),
        ("user_models:build_two_outputs", {}, (28, 28, 1), "has 2 outputs"),
        ("user_models:build_sigmoid", {}, (28, 28, 1), "applies sigmoid"),
        (
            "user_models:build_fixed_net",
            {},
            (28, 28, 1),
            "takes input [32, 32, 3] but the data's images are [28, 28, 1]",
        ),
        ("user_models:build_fixed_net", {"num_classes": 7}, (32, 32, 3), "[batch, 7], not"),
        ("user_models:build_raises", {}, (28, 28, 1), "raised ValueError: width must be even"),
        ("user_models:build_bn_net", {"depth": 2}, (28, 28, 1), "does not take depth"),
        ("user_models:no_such_builder", {}, (28, 28, 1), "has no function 'no_such_builder'"),
        ("no_such_package.nets:build", {}, (28, 28, 1), "cannot import module 'no_such_package"),
        ("lenet", {}, (28, 28, 1), "unknown model 'lenet'; choose one of: birnn, cnn"),
    ],
)
def test_models_the_bridge_cannot_train_are_one_line(source, params, shape, needle):
    with pytest.raises(ModelError) as info:
        resolve_model(source, params).build(shape, 10)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert "second line" not in message


def test_model_files_that_do_not_load_are_one_line(tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match=f"cannot load the model file {broken}"):
        resolve_model(str(broken))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.h5"))
    with pytest.raises(ModelError, match="subclassed"):
        resolve_model(lambda **_: keras.Sequential()).build((28, 28, 1), 10)
    with pytest.raises(ModelError, match="not valid JSON"):
        keras_models.parse_model_params("{width: 4}")
    with pytest.raises(ModelError, match="must be a JSON object"):
        keras_models.parse_model_params("[4]")


# ---- the model_fn with user models ---------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_softmax_output_trains_on_its_logits(precision, test_batch):
    images, labels = test_batch
    spec, graph = _graph_spec(BN_NET, TRAIN, images, labels, precision=precision)
    # Computed from the logits: no log of a (rounded) probability anywhere in the graph.
    assert not [op for op in graph.get_operations() if op.type == "Log"]
    with graph.as_default(), tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        cross_entropy = graph.get_tensor_by_name("sparse_softmax_cross_entropy_loss/value:0")
        # The model's softmax on this batch (the functional build also made one on its own
        # placeholder, of unknown batch size).
        model_out = [
            op.outputs[0]
            for op in graph.get_operations()
            if op.type == "Softmax" and op.outputs[0].shape[0] == 16
        ][0]
        ce, probabilities = session.run([cross_entropy, model_out])
    # The loss is the cross-entropy of the model's own probabilities, computed from logits.
    expected = -np.mean(np.log(probabilities.astype(np.float64)[np.arange(16), labels]))
    np.testing.assert_allclose(ce, expected, rtol=2e-2 if precision != "float32" else 1e-5)
    assert spec.loss.dtype == tf.float32


def test_softmax_behind_a_lambda_or_a_float32_activation_is_found(test_batch):
    images, _ = test_batch

    def lambda_softmax(num_classes=10):
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs))
        return keras.Model(inputs, keras.layers.Lambda(tf.nn.softmax)(x))

    def pinned_softmax(num_classes=10):  # Keras' mixed-precision advice: a float32 output
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs))
        return keras.Model(inputs, keras.layers.Activation("softmax", dtype="float32")(x))

    for builder in (lambda_softmax, pinned_softmax):
        for precision in ("float32", "mixed_bfloat16"):
            spec, graph = _graph_spec(builder, PREDICT, images, precision=precision)
            logits = spec.predictions["logits"]
            while logits.op.type in ("Cast", "Identity"):
                logits = logits.op.inputs[0]
            assert logits.op.type == "BiasAdd", (builder.__name__, precision, logits.op.type)


def test_hidden_outputs_skip_shared_layers_and_keep_nested_models(test_batch):
    images, _ = test_batch
    spec, _ = _graph_spec("user_models:build_shared_net", PREDICT, images, intermediates=True)
    p = spec.predictions
    assert "shared" not in p  # called twice: no single output
    assert p["block"].shape.as_list() == [16, 16]  # the nested Sequential's call in this model
    assert p["scores"].shape.as_list() == [16, 10]
    assert {"classes", "probabilities", "logits"} <= set(p)


def test_checkpoint_keys_do_not_depend_on_eager_layer_names(mnist_data_dir):
    config = estimator_bridge.Config(model=BN_NET, data_dir=str(mnist_data_dir))
    first = estimator_bridge.describe_network(config)
    resolve_model(BN_NET).build((28, 28, 1), 10)
    eager = resolve_model(BN_NET).build((28, 28, 1), 10)  # eager names move on: conv2d_N
    again = estimator_bridge.describe_network(config)
    assert first == again
    assert first.keys[:2] == ("conv2d/kernel", "conv2d/bias") and first.softmax
    assert [w.name.split(":")[0] for w in eager.weights] != list(first.keys)


def test_only_the_projects_own_networks_are_described_once_per_process(mnist_data_dir):
    config = estimator_bridge.Config(model="cnn", data_dir=str(mnist_data_dir), dropout_rate=0.3)
    first = estimator_bridge.describe_network(config)
    # Another job of the same network (other folders, same build params) reuses the layout...
    assert estimator_bridge.describe_network(dataclasses.replace(config, model_dir="x")) is first
    # ...but other build params are another network.
    wider = dataclasses.replace(config, model_params={"dense_units": 64})
    assert estimator_bridge.describe_network(wider).shapes[4] == (3136, 64) != first.shapes[4]
    # A user's builder may read files or globals: it is built every time.
    calls = []

    def builder(input_shape, num_classes):
        calls.append(input_shape)
        return user_models.build_bn_net(input_shape=input_shape, num_classes=num_classes)

    user = dataclasses.replace(config, model=builder)
    assert estimator_bridge.describe_network(user) == estimator_bridge.describe_network(user)
    assert calls == [(28, 28, 1), (28, 28, 1)]


# ---- end to end: a builder from a module, through the command line ------------------------


def _cli(cwd, *args):
    """``main.py ARGS`` run from ``cwd`` in this process, with ``tests/`` on the import path.

    In float32 unless ARGS name a precision: the exports are compared with float32
    Estimators and Keras models, whatever ``--precision=auto`` picks on this machine.
    """
    if not any(arg.startswith("--precision") for arg in args):
        args = (*args, "--precision=float32")
    return run_cli(*args, cwd=cwd, pythonpath=[TESTS])


def _ok(run):
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def user_run(mnist_data_dir, tmp_path_factory):
    """build_bn_net trained 80 steps from the command line, in default folders of a new cwd."""
    cwd = tmp_path_factory.mktemp("user_cwd")
    common = (
        f"--model={BN_NET}",
        """--model_params={"width": 8}""",
        f"--data_dir={mnist_data_dir}",
    )
    trained = _ok(
        _cli(cwd, "--mode=train", *common, "--train_steps=80", "--batch_size=64", "--seed=1")
    )
    config = estimator_bridge.Config(
        model=BN_NET,
        model_params={"width": 8},
        data_dir=str(mnist_data_dir),
        model_dir=str(cwd / "models" / "build_bn_net"),
        export_dir=str(cwd / "exports" / "build_bn_net"),
        output_dir=str(cwd / "predictions" / "build_bn_net"),
        eval_limit=500,
        progress=False,
    )
    return cwd, common, config, trained


def test_user_builder_trains_evaluates_and_predicts_from_the_cli(user_run):
    cwd, common, config, trained = user_run
    assert trained["global_step"] == 80
    reader = tf.train.load_checkpoint(config.model_dir)  # models/<function name>
    # BatchNorm moving averages were updated (they start at 0 and 1).
    assert np.abs(reader.get_tensor("batch_normalization/moving_mean")).max() > 1e-3
    assert json.loads(reader.get_tensor(estimator_bridge.MODEL_KEY).decode()) == {
        "model": BN_NET,
        "model_params": {"width": 8},
    }
    evaluated = _ok(_cli(cwd, "--mode=evaluate", *common, "--limit=500"))
    # 80 steps of 64 with --seed=1: 0.828 on VM B; the margin is for other CPUs' kernels.
    assert evaluated["examples"] == 500 and evaluated["accuracy"] > 0.75
    predicted = _ok(_cli(cwd, "--mode=predict", *common, "--limit=500", "--plot"))
    assert predicted["csv"] == os.path.join("predictions", "build_bn_net", "predictions-test.csv")
    rows = np.genfromtxt(cwd / predicted["csv"], delimiter=",", names=True, dtype=None)
    assert rows.dtype.names == (
        "index",
        "label",
        "class",
        "probability",
        "label_name",
        "class_name",
    )
    assert len(rows) == 500 and predicted["accuracy"] == evaluated["accuracy"]
    np.testing.assert_array_equal(rows["class_name"].astype(str), rows["class"].astype(str))
    # No layer is named conv1: the samples plot only.
    assert [os.path.basename(p) for p in predicted["plots"]] == ["samples-test.png"]


@pytest.fixture(scope="module")
def user_export(user_run):
    """The trained build_bn_net exported from the command line, with a .keras copy."""
    cwd, common, config, _ = user_run
    keras_path = cwd / "bn_net.keras"
    exported = _ok(_cli(cwd, "--mode=export", *common, f"--keras_output={keras_path}"))
    return config, cwd / exported["saved_model"], keras_path


@pytest.fixture(scope="module")
def served(user_export, file_run, test_batch, tmp_path_factory):
    """Both exports run on ``test_batch`` in one new interpreter that imports TensorFlow alone.

    The builder's export answers its raw-image (``serving_default``) and tf.Example
    (``examples:classification``) signatures, the model file's its ``predict`` signature. One
    interpreter serves both: its start costs more than the two loads.

    Returns:
        The outputs, from an ``.npz``: ``raw``, ``scores`` and ``classes`` for the builder,
        ``file_p`` and ``file_l`` (probabilities, logits) for the model file.
    """
    _, builder_model, _ = user_export
    file_model = file_run.cwd / file_run.exported["saved_model"]
    images, labels = test_batch
    serialized = [
        data_pipeline.encode_example(np.round(i[..., 0] * 255).astype(np.uint8), int(label))
        for i, label in zip(images, labels)
    ]
    out = tmp_path_factory.mktemp("served")
    np.save(out / "images.npy", images)
    (out / "examples.pkl").write_bytes(pickle.dumps(serialized))
    run_fresh_python(f"""
import pickle, sys, numpy as np, tensorflow as tf
images = tf.constant(np.load({str(out / "images.npy")!r}))
examples = tf.constant(pickle.loads(open({str(out / "examples.pkl")!r}, "rb").read()))
builder = tf.saved_model.load({str(builder_model)!r})
raw = builder.signatures["serving_default"](image=images)
cls = builder.signatures["examples:classification"](inputs=examples)
predict = tf.saved_model.load({str(file_model)!r}).signatures["predict"](image=images)
assert "tensorflow_estimator" not in sys.modules, "the exports needed the Estimator to load"
np.savez({str(out / "out.npz")!r}, raw=raw["probabilities"].numpy(),
         scores=cls["scores"].numpy(), classes=cls["classes"].numpy().astype(str),
         file_p=predict["probabilities"].numpy(), file_l=predict["logits"].numpy())
""")
    return np.load(out / "out.npz")


def test_user_builder_export_serves_the_estimators_probabilities(user_export, test_batch, served):
    config, saved_model, keras_path = user_export
    assert saved_model.parent == Path(config.export_dir)  # exports/<function name>/<version>
    images, labels = test_batch
    expected = estimator_probabilities(config, images)
    assert np.mean(expected.argmax(-1) == labels) > 0.7
    np.testing.assert_allclose(served["raw"], expected, atol=1e-5)
    np.testing.assert_allclose(served["scores"], expected, atol=1e-5)
    # Its model.onnx (BatchNorm folded by tf2onnx) on onnxruntime.
    with serving.load(str(saved_model), engine="onnxruntime") as onnx_model:
        np.testing.assert_allclose(onnx_model(image=images)["probabilities"], expected, atol=1e-5)
    assert served["classes"][0].tolist() == [str(i) for i in range(10)]
    # The .keras file is the user's own softmax network with the trained weights.
    model = keras3.load_model(str(keras_path))  # a Keras 3 file: translated back
    np.testing.assert_allclose(model(images, training=False).numpy(), expected, atol=1e-5)


def test_user_builder_warm_starts_from_its_keras_file(user_export, mnist_data_dir, tmp_path):
    config, _, keras_path = user_export
    warm = dataclasses.replace(
        config,
        model_dir=str(tmp_path / "warm"),
        warm_start_from=str(keras_path),
        train_steps=1,
        learning_rate=1e-12,
    )
    assert jobs.train(warm)["global_step"] == 1
    trained = tf.train.load_checkpoint(config.model_dir)
    warmed = tf.train.load_checkpoint(warm.model_dir)
    network = estimator_bridge.describe_network(warm)
    trainable = [k for k in network.keys if "moving_" not in k]
    assert len(trainable) == 8
    for key in trainable:
        np.testing.assert_allclose(warmed.get_tensor(key), trained.get_tensor(key), atol=1e-6)


def test_checkpoint_mismatch_names_the_model_it_was_trained_with(user_run):
    cwd, _, config, _ = user_run
    run = _cli(
        cwd,
        "--mode=evaluate",
        "--model=cnn",
        f"--data_dir={config.data_dir}",
        f"--model_dir={config.model_dir}",
    )
    assert_cli_error(
        run,
        "does not fit --model=cnn (no conv1/kernel",
        """it was trained with --model=user_models:build_bn_net --model_params='{"width": 8}'""",
    )


def test_user_builder_resumes_and_trains_in_mixed_bfloat16(user_run, tmp_path):
    _, _, config, _ = user_run
    model_dir = tmp_path / "mixed"
    mixed = dataclasses.replace(
        config, model_dir=str(model_dir), precision="mixed_bfloat16", train_steps=4, batch_size=32
    )
    assert jobs.train(mixed)["global_step"] == 4
    assert jobs.train(dataclasses.replace(mixed, train_steps=8))["global_step"] == 8
    assert 0 < jobs.evaluate(mixed)["loss"] < 5


def test_checkpoint_without_the_model_key_still_resumes(mnist_data_dir, tmp_path):
    """Checkpoints written before MODEL_KEY existed load, resume and keep loading."""
    config = estimator_bridge.Config(
        model=BN_NET,
        data_dir=str(mnist_data_dir),
        model_dir=str(tmp_path / "old"),
        batch_size=32,
        train_steps=3,
        eval_limit=100,
        export_dir=str(tmp_path / "export"),
        progress=False,
    )
    spec = data_pipeline.load_spec(mnist_data_dir)
    params = {**estimator_bridge.model_params(config, spec), "learning_rate": 1e-3}
    estimator = tf.estimator.Estimator(estimator_bridge.model_fn, config.model_dir, params=params)
    estimator.train(estimator_bridge.make_input_fn(config, "train", True), max_steps=3)
    assert estimator_bridge.MODEL_KEY not in dict(tf.train.list_variables(config.model_dir))
    assert jobs.train(dataclasses.replace(config, train_steps=5))["global_step"] == 5
    assert jobs.evaluate(config)["global_step"] == 5
    assert jobs.export(config)["saved_model"]


# ---- end to end: a Keras model file with a softmax output ---------------------------------


@pytest.fixture(scope="module")
def digits_file(mnist_source, mnist_data_dir, test_batch, tmp_path_factory):
    """build_bn_net fitted 1 epoch on 2,000 MNIST images with Keras, saved as digits_net.keras.

    Returns:
        The path, the Keras model's probabilities for ``test_batch`` and its accuracy on the
        first 1,000 test images (computed now: Keras invalidates eager models once an Estimator
        graph has built layers in the process).
    """
    x, y = mnist_source.splits["train"]
    x = (x[:2000, ..., None] / 255.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = user_models.build_bn_net(width=8)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    # AutoGraph skips the ``keras`` package but not ``tf_keras``: left alone it would convert
    # tf_keras' whole training step (~30 s, once per process) for these 32 steps.
    model.train_step = tf.autograph.experimental.do_not_convert(model.train_step)
    model.fit(x, y[:2000], batch_size=64, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("files") / "digits_net.keras"
    model.save(path)
    features, labels = next(iter(data_pipeline.make_dataset(mnist_data_dir, "test", 1000)))
    accuracy = np.mean(model(features["image"]).numpy().argmax(-1) == labels.numpy())
    return path, model(test_batch[0], training=False).numpy(), accuracy


@pytest.fixture(scope="module")
def file_run(digits_file, mnist_data_dir, test_batch, tmp_path_factory):
    """digits_net.keras from the command line: trained 1 step, evaluated, exported.

    Returns:
        A namespace: ``cwd`` (of the runs), ``evaluated`` and ``exported`` (their JSON results)
        and ``probabilities`` (the Estimator's for ``test_batch``).
    """
    path, _, _ = digits_file
    cwd = tmp_path_factory.mktemp("file_cwd")
    common = (f"--model={path}", f"--data_dir={mnist_data_dir}")
    # One step at a vanishing learning rate: the Estimator starts from the file's weights.
    _ok(_cli(cwd, "--mode=train", *common, "--train_steps=1", "--learning_rate=1e-12"))
    evaluated = _ok(_cli(cwd, "--mode=evaluate", *common, "--limit=1000"))
    exported = _ok(_cli(cwd, "--mode=export", *common))
    config = estimator_bridge.Config(
        model=str(path),
        data_dir=str(mnist_data_dir),
        model_dir=str(cwd / "models" / "digits_net"),
        progress=False,
    )
    # Evaluating and exporting only read the checkpoint: one prediction serves every check.
    probabilities = estimator_probabilities(config, test_batch[0])
    return SimpleNamespace(
        cwd=cwd, evaluated=evaluated, exported=exported, probabilities=probabilities
    )


def test_model_file_trains_from_its_own_weights_and_exports(digits_file, file_run, served):
    _, expected, keras_accuracy = digits_file
    ours = file_run.probabilities
    # One training step moved the BatchNorm averages by 1 % of a batch's statistics.
    np.testing.assert_allclose(ours, expected, atol=0.02)
    evaluated = file_run.evaluated
    assert keras_accuracy > 0.5 and evaluated["accuracy"] == pytest.approx(keras_accuracy, abs=0.01)
    saved_model = file_run.exported["saved_model"]
    assert saved_model.startswith(os.path.join("exports", "digits_net", ""))
    np.testing.assert_allclose(served["file_p"], ours, atol=1e-5)
    # The predict signature's logits are the softmax's input, as for a logits network.
    np.testing.assert_allclose(tf.nn.softmax(served["file_l"]).numpy(), ours, atol=1e-5)


def test_model_file_under_mixed_bfloat16_computes_in_bfloat16(digits_file, test_batch):
    path, _, _ = digits_file
    images, _ = test_batch
    spec, graph = _graph_spec(str(path), PREDICT, images, precision="mixed_bfloat16")
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert convs and all(op.get_attr("T") == tf.bfloat16 for op in convs)
    assert spec.predictions["logits"].dtype == tf.float32


# ---- bad input through the command line ----------------------------------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model=no_such_package.nets:build"], ["cannot import module 'no_such_package.nets'"]),
        (["--model=user_models:build_nothing"], ["'user_models' has no function 'build_nothing'"]),
        (
            ["--model=user_models:build_raises"],
            ["the builder raised ValueError: width must be even"],
        ),
        ([f"--model={BN_NET}", '--model_params={"depth": 2}'], ["does not take depth"]),
        (["--model_params={width: 8}"], ["--model_params is not valid JSON"]),
        (["--model=user_models:build_two_inputs"], ["has 2 inputs"]),
        (["--model=user_models:build_two_outputs"], ["has 2 outputs"]),
        (["--model=user_models:build_fixed_net"], ["takes input [32, 32, 3]", "[28, 28, 1]"]),
        (["--model=user_models:build_sigmoid"], ["applies sigmoid"]),
    ],
)
def test_bad_models_are_one_line_and_nothing_is_written(args, needles, mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    run = _cli(
        tmp_path, "--mode=train", *args, f"--data_dir={mnist_data_dir}", f"--model_dir={model_dir}"
    )
    assert_cli_error(run, *needles)
    assert not model_dir.exists()


def test_model_file_that_does_not_load_is_one_line(mnist_data_dir, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    run = _cli(tmp_path, "--mode=train", f"--model={broken}", f"--data_dir={mnist_data_dir}")
    assert_cli_error(run, f"cannot load the model file {broken}")
    assert not (tmp_path / "models").exists()


def test_a_network_tf2onnx_cannot_convert_still_exports_its_saved_model(
    mnist_data_dir, tmp_path, capsys, monkeypatch
):
    config = estimator_bridge.Config(
        model="user_models:build_unconvertible",  # starts with BesselI0e, which tf2onnx lacks
        data_dir=str(mnist_data_dir),
        model_dir=str(tmp_path / "model"),
        export_dir=str(tmp_path / "export"),
        batch_size=16,
        train_steps=1,
        train_limit=64,
        progress=False,
    )
    jobs.train(config)
    capsys.readouterr()
    exported = jobs.export(config)
    said = [line for line in capsys.readouterr().err.splitlines() if "onnx" in line.lower()]
    assert said == [
        "note: model.onnx skipped, the SavedModel is complete: "
        "ValueError: tf2onnx cannot convert the ops BesselI0e"
    ]
    saved_model = exported["saved_model"]
    assert exported["onnx"] is None
    assert sorted(os.listdir(saved_model)) == ["saved_model.pb", "variables"]
    with serving.load(saved_model, xla=False) as model:
        assert model.engine == "tensorflow"
        assert model(image=np.zeros([2, 28, 28, 1], np.float32))["probabilities"].shape == (2, 10)
    # Without the onnx extra the export says so instead.
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    assert onnx_export.write_onnx(saved_model) == (
        None,
        "tf2onnx is not installed (pip install -e '.[onnx]')",
    )
