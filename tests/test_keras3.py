"""Keras 3 both ways: Keras 3 files into the bridge, the bridge's models out to Keras 3.

The Keras 3 files are written by real Keras 3 (TensorFlow 2.21, ``.venv-keras3``) in one
subprocess (``keras3_files``), and everything exported is loaded there in one more
(``keras3_loaded``): Keras 3 takes seconds to start.
"""

import io
import json
import os
import shutil
import zipfile

import h5py
import numpy as np
import pytest
import tf_keras
from cli_helpers import (
    REPO,
    assert_cli_error,
    estimator_probabilities,
    run_cli,
    run_fresh_python,
    run_keras3,
)

import estimator_bridge as bridge
from keras_models import ModelError, build_model, keras3

TESTS = os.path.join(REPO, "tests")
SCRIPT = os.path.join(TESTS, "keras3_script_models.py")
K3_MODELS = ("user3", "seq3", "nested3", "gru3")
TRAIN_STEPS = 200


@pytest.fixture(scope="session")
def test_images(mnist_source):
    """The first 8 MNIST test images, float32 [8, 28, 28, 1] in [0, 1], and their labels."""
    images, labels = mnist_source.splits["test"]
    return (images[:8].astype(np.float32) / 255.0).reshape(-1, 28, 28, 1), labels[:8]


@pytest.fixture(scope="session")
def keras3_files(tmp_path_factory, test_images):
    """Keras 3 writes its models (``.keras`` and ``.h5``) and their probabilities on MNIST."""
    out = tmp_path_factory.mktemp("keras3_files")
    np.save(out / "images.npy", test_images[0])
    marker = out / "marker"
    run = run_keras3(open(SCRIPT).read(), out, marker)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["keras_version"].startswith("3.")
    return out, marker, {k: np.array(v) for k, v in result["probabilities"].items()}


def _datasets(h5) -> dict:
    found = {}
    h5.visititems(
        lambda name, item: found.setdefault(name, item[()]) if hasattr(item, "shape") else None
    )
    return found


def _archive_weights(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as h5:
        return {k: v for k, v in _datasets(h5).items() if k.startswith("layers/")}


# --- in: Keras 3 files read as tf_keras ---------------------------------------------------------


def test_file_format_is_read_from_the_contents(keras3_files, tmp_path):
    out, _, _ = keras3_files
    for name in ("user3.keras", "user3.h5", "mnv2.keras", "mnv2.h5"):
        found = keras3.file_format(str(out / name))
        assert (found.major, found.keras_version[:2]) == (3, "3.")
        assert found.container == ("keras" if name.endswith(".keras") else "h5")
    renamed = tmp_path / "misnamed.h5"  # a .keras archive under an .h5 name
    shutil.copy(out / "user3.keras", renamed)
    assert keras3.file_format(str(renamed)).container == "keras"
    build_model("cnn").save(tmp_path / "cnn.keras")
    assert keras3.file_format(str(tmp_path / "cnn.keras")).major == 2


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files_load_as_tf_keras_predicting_the_same(keras3_files, test_images, suffix):
    out, _, probabilities = keras3_files
    for name in K3_MODELS:
        model = keras3.load_model(str(out / f"{name}{suffix}"))
        assert isinstance(model, tf_keras.Model)
        np.testing.assert_allclose(model(test_images[0]), probabilities[name], atol=1e-5)


def test_keras3_weights_arrive_bit_identical(keras3_files):
    """Every layer's weights equal the datasets of Keras 3's .h5, MobileNetV2 included."""
    out, _, _ = keras3_files
    for name in (*K3_MODELS, "mnv2"):
        model = keras3.load_model(str(out / f"{name}.h5"))
        with h5py.File(out / f"{name}.h5", "r") as h5:
            group = h5["model_weights"]
            for layer in model.layers:
                if not layer.weights:
                    continue
                names = [keras3._text(n) for n in group[layer.name].attrs["weight_names"]]
                expected = [group[layer.name][n][()] for n in names]
                for got, want in zip(layer.get_weights(), expected, strict=True):
                    assert got.dtype == want.dtype and np.array_equal(got, want), layer.name
        if name == "mnv2":
            assert len(model.layers) == 156
            continue  # its .keras twin: test_from_keras3_then_to_keras3_keeps_the_weights
        via_archive = keras3.load_model(str(out / f"{name}.keras")).get_weights()
        for got, want in zip(via_archive, model.get_weights(), strict=True):
            assert np.array_equal(got, want), name


def test_keras3_config_forms_become_tf_keras_forms(keras3_files):
    out, _, _ = keras3_files
    k3 = keras3.file_format(str(out / "user3.keras")).config
    k2 = keras3.config_from_keras3(k3)
    assert (k3["module"], k2["module"]) == (keras3.KERAS3_FUNCTIONAL, keras3.KERAS2_FUNCTIONAL)
    assert "compile_config" in k3 and "compile_config" not in k2
    layers = {layer["name"]: layer for layer in k2["config"]["layers"]}
    assert layers["image"]["config"]["batch_input_shape"] == [None, 28, 28, 1]
    assert "batch_shape" not in layers["image"]["config"]
    assert layers["conv_a"]["config"]["dtype"] == "float32"  # was a DTypePolicy object
    assert layers["conv_a"]["inbound_nodes"] == [[["image", 0, 0, {}]]]
    assert layers["drop"]["inbound_nodes"] == [[["bn", 0, 0, {}]]]  # training=False dropped
    assert "quantization_config" not in layers["probs"]["config"]
    assert "input_axes" not in layers["probs"]["config"]["kernel_initializer"]["config"]
    assert k2["config"]["input_layers"] == [["image", 0, 0]]
    nested = keras3.config_from_keras3(keras3.file_format(str(out / "nested3.keras")).config)
    logits = [layer for layer in nested["config"]["layers"] if layer["name"] == "logits"][0]
    assert logits["inbound_nodes"] == [[["inner", 1, 0, {}]]]  # K3 counts from 0, tf_keras 1


# --- out: tf_keras models written for Keras 3 ----------------------------------------------------


def test_tf_keras_config_forms_become_keras3_forms(tmp_path):
    rnn = build_model("rnn")
    rnn.save(tmp_path / "rnn.keras")
    k3 = keras3.config_to_keras3(
        keras3.file_format(str(tmp_path / "rnn.keras")).config, keras3._shapes_of(rnn)
    )
    assert k3["module"] == keras3.KERAS3_FUNCTIONAL and k3["config"]["input_layers"] == [
        "image",
        0,
        0,
    ]
    layers = {layer["name"]: layer for layer in k3["config"]["layers"]}
    image = layers["image"]["config"]
    assert image["batch_shape"] == [None, 28, 28, 1] and image["optional"] is False
    gru = layers["gru1"]["config"]
    assert "time_major" not in gru and "implementation" not in gru
    for key in ("kernel_initializer", "recurrent_initializer"):
        assert gru[key]["class_name"] == "Orthogonal"  # was keras_models>GateOrthogonal
        assert gru[key]["registered_name"] is None
    assert gru["dtype"]["class_name"] == "DTypePolicy"
    (node,) = layers["gru1"]["inbound_nodes"]
    (tensor,) = node["args"]
    assert tensor["class_name"] == "__keras_tensor__"
    assert tensor["config"]["keras_history"] == ["rows", 0, 0]
    assert tensor["config"]["shape"] == [None, 28, 28]
    assert layers["standardize"]["class_name"] == "Rescaling"  # built in: loads as it is

    image = tf_keras.Input((32, 32, 3), name="image")
    x = tf_keras.layers.DepthwiseConv2D(3, name="dw")(image)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    inner = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(10, name="d")])
    x = inner(tf_keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model = tf_keras.Model(image, x, name="small")
    model.save(tmp_path / "small.keras")
    k3 = keras3.config_to_keras3(
        keras3.file_format(str(tmp_path / "small.keras")).config, keras3._shapes_of(model)
    )
    layers = {layer["config"]["name"]: layer for layer in k3["config"]["layers"]}
    assert "groups" not in layers["dw"]["config"] and layers["bn"]["config"]["axis"] == 3
    last = k3["config"]["layers"][-1]["inbound_nodes"][0]["args"][0]
    assert last["config"]["keras_history"] == ["gap", 0, 0]
    (ref,) = [
        layer["inbound_nodes"][0]["args"][0]["config"]["keras_history"]
        for layer in k3["config"]["layers"]
        if layer["class_name"] == "Sequential"
    ]
    assert ref == ["gap", 0, 0]
    sequential = k3["config"]["layers"][-1]["config"]["name"]
    # The nested model's first call: tf_keras's node 1, Keras 3's node 0.
    assert k3["config"]["output_layers"] == [sequential, 0, 0]
    assert keras3.config_from_keras3(k3)["config"]["output_layers"] == [[sequential, 1, 0]]


@pytest.fixture(scope="module")
def trained(mnist_data_dir, keras3_files, tmp_path_factory):
    """cnn, rnn and the Keras 3 user model trained briefly by the bridge, then exported."""
    out, _, _ = keras3_files
    root = tmp_path_factory.mktemp("keras3_trained")
    runs = {}
    for name, model, steps, output in [
        ("cnn", "cnn", 20, "cnn.keras"),
        ("rnn", "rnn", 20, "rnn.h5"),
        ("user3", str(out / "user3.keras"), TRAIN_STEPS, "user3.keras"),
    ]:
        common = [
            f"--model={model}",
            f"--data_dir={mnist_data_dir}",
            f"--model_dir={root / name}",
            f"--export_dir={root / 'exports' / name}",
        ]
        run = run_cli(
            "--mode=train",
            *common,
            f"--train_steps={steps}",
            "--limit=30000",
            "--seed=0",
            "--precision=float32",
        )
        assert run.returncode == 0, run.stderr[-3000:]
        run = run_cli(
            "--mode=export", *common, f"--keras_output={root / output}", "--precision=float32"
        )
        assert run.returncode == 0, run.stderr[-3000:]
        config = bridge.Config(
            model=model, data_dir=str(mnist_data_dir), model_dir=str(root / name)
        )
        runs[name] = (config, root / output, common)
    return root, runs


def test_bridge_trains_a_keras3_file_on_mnist(trained):
    """The Keras 3 user model (BatchNormalization, Dropout, L2, softmax) learns MNIST."""
    _, runs = trained
    _, _, common = runs["user3"]
    run = run_cli("--mode=evaluate", *common, "--limit=2000")
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = json.loads(run.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy > 0.6, accuracy  # chance is 0.1; the file's own (untrained) weights start


@pytest.fixture(scope="module")
def keras3_loaded(trained, keras3_files, mnist_data_dir, test_images, tmp_path_factory):
    """Every exported file loaded by plain Keras 3 ``load_model`` in one process.

    Also a Keras 3 file carried through ``--warm_start_from`` with no training: its weights
    written as the warm-start checkpoint, read back as the export does, written for Keras 3.
    """
    root, runs = trained
    out, _, _ = keras3_files
    config = bridge.Config(model=str(out / "user3.keras"), data_dir=str(mnist_data_dir))
    warm = root / "warm"
    bridge.keras_weights_to_checkpoint(config, str(out / "user3.keras"), str(warm))
    model = bridge.keras_model_from_checkpoint(config, str(warm / "keras_weights"))
    keras3.to_keras3_model(model, str(root / "user3_back.keras"))
    files = {name: str(path) for name, (_, path, _) in runs.items()}
    files["user3_back"] = str(root / "user3_back.keras")
    np.save(root / "images.npy", test_images[0])
    run = run_keras3(
        """
import json, sys, numpy as np, keras
images, files = np.load(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, path in files.items():
    model = keras.saving.load_model(path)  # no custom_objects, no project code
    out[name] = np.asarray(model.predict(images, verbose=0)).tolist()
    out[name + "_layers"] = [type(layer).__name__ for layer in model.layers]
print(json.dumps(out))
""",
        root / "images.npy",
        json.dumps(files),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["cnn", "rnn", "user3"])
def test_exports_load_in_keras3_predicting_as_the_saved_model(
    name, trained, keras3_loaded, test_images
):
    _, runs = trained
    config, _, _ = runs[name]
    expected = estimator_probabilities(config, test_images[0])
    got = np.array(keras3_loaded[name])
    if name != "user3":  # the networks end in logits; the user model in its softmax
        got = np.exp(got - got.max(-1, keepdims=True))
        got /= got.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if name == "rnn":
        assert "GRU" in keras3_loaded["rnn_layers"]
        assert "Rescaling" in keras3_loaded["rnn_layers"]  # the standardize layer


def test_keras3_file_warm_start_and_export_gives_back_identical_weights(
    keras3_files, trained, keras3_loaded
):
    out, _, probabilities = keras3_files
    root, _ = trained
    original = _archive_weights(out / "user3.keras")
    back = _archive_weights(root / "user3_back.keras")
    assert original.keys() == back.keys() and original
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    np.testing.assert_allclose(keras3_loaded["user3_back"], probabilities["user3"], atol=1e-6)


# --- refusals --------------------------------------------------------------------------------


def _evil_tf_keras(folder, marker):
    """tf_keras .h5 and .keras files whose Lambda writes ``marker`` when run."""
    function = eval(f"lambda t: (open({str(marker)!r}, 'w').write('ran'), t)[1]")
    image = tf_keras.Input((28, 28, 1), name="image")
    x = tf_keras.layers.Lambda(function, name="evil_k2")(image)
    x = tf_keras.layers.Flatten(name="flat")(x)
    model = tf_keras.Model(image, tf_keras.layers.Dense(10, name="logits")(x))
    model.save(folder / "evil2.h5")
    model.save(folder / "evil2.keras")
    os.remove(marker)  # building the model called the Lambda once
    return folder / "evil2.h5", folder / "evil2.keras"


def test_code_in_a_model_file_never_runs_unless_asked(keras3_files, mnist_data_dir, tmp_path):
    out, marker, _ = keras3_files
    k2_marker = tmp_path / "k2_marker"
    evil_h5, evil_keras = _evil_tf_keras(tmp_path, k2_marker)
    cases = [
        (out / "evil3.keras", "evil_lambda"),
        (out / "evil3.h5", "evil_lambda"),
        (evil_h5, "evil_k2"),
        (evil_keras, "evil_k2"),
    ]
    for path, layer in cases:
        for flag in (f"--model={path}", f"--warm_start_from={path}"):
            model_dir = tmp_path / "model"
            run = run_cli(
                "--mode=train", flag, f"--data_dir={mnist_data_dir}", f"--model_dir={model_dir}"
            )
            assert_cli_error(run, f"layer '{layer}'", "--unsafe_deserialization")
            assert not model_dir.exists()
        with pytest.raises(ModelError, match=layer):
            keras3.to_keras3(str(path), str(tmp_path / "x.keras"))
        with pytest.raises(ModelError, match=layer):
            keras3.from_keras3(str(path), str(tmp_path / "x.keras"))
        assert not marker.exists() and not k2_marker.exists()
        assert not (tmp_path / "x.keras").exists()
    # The explicit opt-in is what lets it run.
    keras3.load_model(str(evil_h5), unsafe_deserialization=True)(np.zeros((1, 28, 28, 1)))
    assert k2_marker.read_text() == "ran"


def test_what_cannot_be_carried_is_one_line(keras3_files, mnist_data_dir, tmp_path):
    out, _, _ = keras3_files
    run = run_cli(
        "--mode=train", f"--model={out / 'custom3.keras'}", f"--data_dir={mnist_data_dir}"
    )
    assert_cli_error(run, "layer 'twice' (Twice)", "user>Twice")

    image = tf_keras.Input((28, 28, 1), name="image")
    x = tf_keras.layers.ThresholdedReLU(name="thresholded")(image)  # dropped by Keras 3
    model = tf_keras.Model(image, tf_keras.layers.Flatten(name="flat")(x))
    model.save(tmp_path / "old.keras")
    with pytest.raises(ModelError, match="layer 'thresholded' .* Keras 3 does not have") as info:
        keras3.to_keras3(str(tmp_path / "old.keras"), str(tmp_path / "old3.keras"))
    assert "\n" not in str(info.value) and not (tmp_path / "old3.keras").exists()

    future = tmp_path / "future.keras"  # a version neither reads
    with zipfile.ZipFile(out / "seq3.keras") as source, zipfile.ZipFile(future, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "metadata.json":
                data = json.dumps({"keras_version": "4.0.0"}).encode()
            target.writestr(item, data)
    run = run_cli("--mode=train", f"--model={future}", f"--data_dir={mnist_data_dir}")
    assert_cli_error(run, "saved by Keras 4.0.0")


def test_keras_output_format_flag(trained, tmp_path):
    """--keras_format=tf_keras writes today's Keras 2 file; a Keras 3 file needs .keras/.h5."""
    _, runs = trained
    _, _, common = runs["cnn"]
    run = run_cli(
        "--mode=export",
        *common,
        "--keras_format=tf_keras",
        f"--keras_output={tmp_path / 'cnn2.keras'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert keras3.file_format(str(tmp_path / "cnn2.keras")).major == 2
    run = run_cli("--mode=export", *common, f"--keras_output={tmp_path / 'cnn_model'}")
    assert_cli_error(run, "a Keras 3 file is .keras (or .h5)", "--keras_format=tf_keras")


def test_a_builder_written_with_import_keras_trains_on_mnist(mnist_data_dir, tmp_path):
    """``import keras`` in a builder module means tf_keras: it trains, evaluates and exports."""
    common = [
        "--model=keras_package_models:small_cnn",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={tmp_path / 'kp'}",
        "--precision=float32",
    ]
    run = run_cli("--mode=train", *common, "--train_steps=150", "--seed=0", pythonpath=[TESTS])
    assert run.returncode == 0, run.stderr[-3000:]
    run = run_cli("--mode=evaluate", *common, "--limit=2000", pythonpath=[TESTS])
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = json.loads(run.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy > 0.8, accuracy  # chance is 0.1
    output = tmp_path / "kp.keras"
    run = run_cli("--mode=export", *common, f"--keras_output={output}", pythonpath=[TESTS])
    assert run.returncode == 0, run.stderr[-3000:]
    assert keras3.file_format(str(output)).major == 3
    run = run_cli(
        "--mode=train",
        "--model=keras_package_models:uses_keras3_ops",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={tmp_path / 'ops'}",
        pythonpath=[TESTS],
    )
    assert_cli_error(run, "Keras 2 (tf_keras) here", "--model=m.keras")
    assert not (tmp_path / "ops").exists()


def test_a_keras_package_model_is_rebuilt_in_tf_keras_and_trains(mnist_data_dir, tmp_path):
    """Where the caller imported the real keras package first, its models are translated.

    In a fresh interpreter: once the package is imported, tf_keras cannot rebuild a config
    unless the bridge points TensorFlow's export table at tf_keras for the rebuild.
    """
    run = run_fresh_python(
        """
import json, sys
import keras  # the keras 2.15 package, before anything of the bridge
import tf_keras
from cli_helpers import run_cli
from keras_models import resolve_model

assert keras is not tf_keras
out = {}
for name in ("small_cnn", "small_sequential"):
    model = resolve_model(f"keras_package_models:{name}").build((28, 28, 1), 10)
    out[name] = [type(model).__name__, isinstance(model, tf_keras.Model), model.count_params()]
    out[name].append(sorted({type(layer).__module__.split(".")[0] for layer in model.layers}))
common = ["--model=keras_package_models:small_cnn", f"--data_dir={sys.argv[1]}",
          f"--model_dir={sys.argv[2]}", "--precision=float32"]
train = run_cli("--mode=train", *common, "--train_steps=150", "--seed=0")
evaluate = run_cli("--mode=evaluate", *common, "--limit=2000")
out["runs"] = [train.returncode, train.stderr[-2000:], evaluate.returncode, evaluate.stderr[-2000:]]
out["accuracy"] = json.loads(evaluate.stdout.strip().splitlines()[-1])["accuracy"]
print(json.dumps(out))
""",
        str(mnist_data_dir),
        str(tmp_path / "kp"),
        timeout=400,
        pythonpath=[TESTS],
    )
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["small_cnn"] == ["Functional", True, out["small_cnn"][2], ["tf_keras"]]
    assert out["small_sequential"] == ["Sequential", True, out["small_cnn"][2], ["tf_keras"]]
    train_code, train_err, evaluate_code, evaluate_err = out["runs"]
    assert train_code == 0 and evaluate_code == 0, (train_err, evaluate_err)
    assert out["accuracy"] > 0.8, out["accuracy"]  # chance is 0.1


def test_from_keras3_then_to_keras3_keeps_the_weights(keras3_files, tmp_path):
    """from_keras3 then to_keras3 gives back the same weights, bit for bit."""
    out, _, _ = keras3_files
    for name in ("nested3", "mnv2"):
        keras3.from_keras3(str(out / f"{name}.keras"), str(tmp_path / f"{name}_k2.keras"))
        assert keras3.file_format(str(tmp_path / f"{name}_k2.keras")).major == 2
        keras3.to_keras3(str(tmp_path / f"{name}_k2.keras"), str(tmp_path / f"{name}_k3.keras"))
        original = _archive_weights(out / f"{name}.keras")
        back = _archive_weights(tmp_path / f"{name}_k3.keras")
        assert original.keys() == back.keys()
        assert all(np.array_equal(back[key], value) for key, value in original.items())
