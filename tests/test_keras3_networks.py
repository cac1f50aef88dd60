"""The four networks built under Keras 3 (TensorFlow 2.21, ``.venv-keras3``) by the same builders.

``keras_models`` picks Keras 3 where ``tf_keras`` is not installed. There the networks must be the
same networks: the same layer names, parameter counts and weight shapes in the same order, the
gate-orthogonal GRU initialiser intact, and the weights of a Keras 2 network loading into the
Keras 3 one with the same outputs.
"""

import json

import numpy as np
import pytest
import tf_keras as keras
from cli_helpers import REPO, run_keras3

import keras_models
from keras_models import keras3

# In the Keras 3 interpreter, with the repo on its path: build, describe, load the Keras 2
# weights, and predict the same images.
KERAS3_SCRIPT = """
import json, sys
import numpy as np
import keras
import keras_models

folder = sys.argv[1]
images = np.load(f"{folder}/images.npy")
out = {"keras": keras.__version__, "keras3": keras_models.backend.KERAS3, "models": {}}
for name in keras_models.MODEL_NAMES:
    model = keras_models.build_model(name)
    assert isinstance(model, keras.Model), type(model)
    described = {
        "layers": [layer.name for layer in model.layers],
        "params": model.count_params(),
        "shapes": [list(weight.shape) for weight in model.weights],
    }
    if name == "rnn":  # the per-gate orthogonal initialiser, run by Keras 3's ops
        kernel = model.get_layer("gru2").cell.recurrent_kernel.numpy()
        blocks = np.split(kernel, 3, axis=1)
        described["gate_gram_error"] = max(
            float(np.abs(b.T @ b - np.eye(b.shape[1])).max()) for b in blocks
        )
    model.load_weights(f"{folder}/{name}.weights.h5")
    probabilities = keras.ops.softmax(model(images, training=False)).numpy()
    np.save(f"{folder}/{name}-keras3.npy", probabilities)
    # The Keras 3 file the bridge's export writes (keras3.to_keras3_model): its weights load
    # into the network built here, and the file loads on its own with plain load_model.
    model = keras_models.build_model(name)
    model.load_weights(f"{folder}/{name}.keras")
    built = keras.ops.softmax(model(images, training=False)).numpy()
    loaded = keras.saving.load_model(f"{folder}/{name}.keras")
    from_file = keras.ops.softmax(loaded(images, training=False)).numpy()
    np.save(f"{folder}/{name}-keras3-file.npy", np.stack([built, from_file]))
    out["models"][name] = described
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras2_networks(tmp_path_factory, mnist_source):
    """Each network in Keras 2 with seeded weights, saved, and its probabilities on 8 digits."""
    folder = tmp_path_factory.mktemp("keras3_networks")
    images = mnist_source.splits["test"][0][:8, ..., None].astype(np.float32) / 255
    np.save(folder / "images.npy", images)
    probabilities = {}
    models = {}
    for name in keras_models.MODEL_NAMES:
        keras.utils.set_random_seed(1)
        model = keras_models.build_model(name)
        model.save_weights(str(folder / f"{name}.weights.h5"))
        keras3.to_keras3_model(model, str(folder / f"{name}.keras"))
        probabilities[name] = keras.activations.softmax(model(images, training=False)).numpy()
        models[name] = model
    return folder, models, probabilities


@pytest.fixture(scope="module")
def keras3_run(keras2_networks):
    folder, _, _ = keras2_networks
    run = run_keras3(KERAS3_SCRIPT, folder, pythonpath=[REPO])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_keras_models_builds_keras3_models_where_tf_keras_is_missing(keras3_run):
    assert keras3_run["keras"].startswith("3.")
    assert keras3_run["keras3"] is True
    assert sorted(keras3_run["models"]) == sorted(keras_models.MODEL_NAMES)


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_same_layers_parameters_and_weight_shapes_in_keras3(name, keras2_networks, keras3_run):
    _, models, _ = keras2_networks
    keras2 = models[name]
    keras3 = keras3_run["models"][name]
    assert keras3["layers"] == [layer.name for layer in keras2.layers]
    assert keras3["params"] == keras2.count_params()
    assert keras3["shapes"] == [weight.shape.as_list() for weight in keras2.weights]


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_keras2_weights_give_the_same_probabilities_in_keras3(name, keras2_networks, keras3_run):
    folder, _, probabilities = keras2_networks
    keras3 = np.load(folder / f"{name}-keras3.npy")
    assert keras3.shape == (8, 10)
    np.testing.assert_allclose(keras3, probabilities[name], atol=1e-5, rtol=0)


def test_gate_orthogonal_makes_each_gate_orthogonal_in_keras3(keras3_run):
    assert keras3_run["models"]["rnn"]["gate_gram_error"] < 1e-4


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_the_exported_keras3_file_loads_into_the_keras3_network(name, keras2_networks, keras3_run):
    folder, _, probabilities = keras2_networks
    built, loaded = np.load(folder / f"{name}-keras3-file.npy")
    np.testing.assert_allclose(built, probabilities[name], atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded, probabilities[name], atol=1e-5, rtol=0)
