"""serving.py: every way of serving an export gives the Estimator's probabilities, four networks.

Each network trains a few steps on real MNIST and is exported once per session. A fresh
interpreter that imports only TensorFlow, numpy and ``serving`` (no ``tfenv``, no Estimator)
serves the export through ``serving.load`` (raw images through XLA, padded or not, and through
the Session; ``tf.Example`` receivers; frozen and not), TF Serving's loader
(``tf.compat.v1.saved_model.load`` + ``Session.run``) and TensorFlow 2's ``signatures``; all must
match ``estimator.predict`` to 1e-5.
"""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import estimator_probabilities, run_fresh_python

import data_pipeline
import estimator_bridge
import jobs
import keras_models
import serving

SIGNATURES = {
    "serving_default",
    "predict",
    "examples:serving_default",
    "examples:predict",
    "examples:classification",
}


@pytest.fixture(scope="session", params=keras_models.MODEL_NAMES)
def exported(request, mnist_data_dir, tmp_path_factory):
    """(config, SavedModel version folder) of a network trained 3 steps and exported."""
    root = tmp_path_factory.mktemp(f"serving_{request.param}")
    config = estimator_bridge.Config(
        model=request.param,
        data_dir=mnist_data_dir,
        model_dir=str(root / "model"),
        export_dir=str(root / "export"),
        batch_size=32,
        train_steps=3,
        seed=5,
        progress=False,
    )
    jobs.train(config)
    return config, jobs.export(config)["saved_model"]


@pytest.fixture(scope="module")
def test_digits(mnist_source):
    """The first 16 real test images (float32 [16, 28, 28, 1] in [0, 1]) and labels."""
    images, labels = mnist_source.splits["test"]
    return (images[:16, ..., None] / 255.0).astype(np.float32), labels[:16]


def test_every_path_gives_the_estimators_probabilities(exported, test_digits, tmp_path):
    config, path = exported
    images, labels = test_digits
    expected = estimator_probabilities(config, images)
    examples = [
        data_pipeline.encode_example(np.round(i[..., 0] * 255).astype(np.uint8), int(y))
        for i, y in zip(images, labels)
    ]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "examples.pkl").write_bytes(pickle.dumps(examples))
    script = f"""
import os, pickle, sys
import numpy as np, tensorflow as tf
import serving

path = {path!r}
images = np.load({str(tmp_path / "images.npy")!r})
examples = pickle.loads(open({str(tmp_path / "examples.pkl")!r}, "rb").read())
out = {{}}
out["serving"] = serving.load(path)(image=images)["probabilities"]
model = serving.load(path, xla=True)
assert model.xla, "16 raw images should take the XLA path"
out["serving_xla"] = model(image=images)["probabilities"]
# 5 and 11 images: padded to XLA programs for 8 and 16, the padding cut off again.
out["serving_xla_padded"] = np.concatenate(
    [model(image=images[:5])["probabilities"], model(image=images[5:])["probabilities"]])
out["serving_session"] = serving.load(path, xla=False)(image=images)["probabilities"]
out["serving_newest_version"] = serving.load(os.path.dirname(path))(images)["probabilities"]
out["serving_unfrozen"] = serving.load(path, freeze=False)(image=images)["probabilities"]
out["serving_examples"] = serving.load(path, "examples:serving_default")(
    examples=examples)["probabilities"]
classify = serving.load(path, "examples:classification")(inputs=examples)
out["serving_classification"] = classify["scores"]
assert "tensorflow_estimator" not in sys.modules, "serving imported the Estimator"
graph = tf.Graph()
session = tf.compat.v1.Session(graph=graph)
with graph.as_default():
    signature = tf.compat.v1.saved_model.load(session, ["serve"], path).signature_def
default = signature["serving_default"]
out["tf1_session"] = session.run(
    default.outputs["probabilities"].name, {{default.inputs["image"].name: images}})
out["tf2_signature"] = tf.saved_model.load(path).signatures["serving_default"](
    image=tf.constant(images))["probabilities"].numpy()
np.savez({str(tmp_path / "out.npz")!r}, **out)
"""
    run_fresh_python(script)
    out = np.load(tmp_path / "out.npz")
    assert len(out.files) == 10
    for name in out.files:
        np.testing.assert_allclose(out[name], expected, atol=1e-5, err_msg=name)


def test_export_keeps_its_signatures(exported):
    """``saved_model_cli show --all`` lists the same five signatures, image ``[-1, 28, 28, 1]``."""
    _, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--all", "--dir", path], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert set(re.findall(r"signature_def\['([^']+)'\]", shown.stdout)) == SIGNATURES
    assert re.search(
        r"inputs\['image'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 28, 28, 1\)", shown.stdout
    )


def test_load_describes_the_signature_and_refuses_wrong_inputs(exported):
    _, path = exported
    with serving.load(path, "predict") as model:
        assert model.inputs == {"image": (np.float32, (None, 28, 28, 1))}
        assert model.outputs == ["classes", "logits", "probabilities"]
        out = model(image=np.zeros([2, 28, 28, 1], np.float32))
        assert out["logits"].shape == (2, 10) and out["classes"].dtype == np.int64
        with pytest.raises(TypeError, match="takes image, got examples"):
            model(examples=[b""])
    with pytest.raises(KeyError, match="no signature 'classify'.*examples:classification"):
        serving.load(path, "classify")
