"""The small things a new user meets first: TensorFlow's start-up noise, prediction plots that fit,
a corrupt image found fast with nothing half-written left behind."""

import os
import subprocess
import sys

from cli_helpers import REPO

# TensorFlow 2.15's C++ start-up notices on a machine without a GPU (about 14 lines).
NOISE = ("cuda", "cudnn", "cufft", "cublas", "tensorrt", "cpu_feature_guard", "onednn")


def _fresh(script):
    """Starts ``python -c script`` as a user's own script would run: no log level set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_importing_the_project_prints_no_tensorflow_start_up_noise():
    scripts = {
        "serving": "import serving, tensorflow as tf; print(tf.constant(1).numpy())",
        "keras_models": "import keras_models; print(keras_models.build_model('cnn').name)",
        # The control: TensorFlow imported first, before any project module could choose.
        "tensorflow first": "import tensorflow, serving",
    }
    runs = {name: _fresh(script) for name, script in scripts.items()}
    results = {name: run.communicate(timeout=120) for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, results[name][1][-2000:]
    for name in ("serving", "keras_models"):
        stderr = results[name][1].lower()
        assert not [word for word in NOISE if word in stderr], results[name][1]
    # Without the project's default the same machine prints the noise: the check above means it.
    assert any(word in results["tensorflow first"][1].lower() for word in NOISE)
