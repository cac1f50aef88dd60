"""Running main.py (and fresh interpreters) the way a user does, for the tests."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")


def run_main(*args, timeout=300, cwd=REPO, pythonpath=()):
    """Runs ``python main.py ARGS`` (from the repo root unless ``cwd``); returns the process.

    ``pythonpath`` adds folders after the repo's (e.g. ``tests/`` for ``--model=user_models:f``).
    """
    return subprocess.run(
        [sys.executable, MAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, *map(str, pythonpath)])},
    )


def run_fresh_python(script):
    """Runs ``script`` in a new CPU-only interpreter (no state shared with the tests)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]


def estimator_probabilities(config, images):
    """The Estimator's probabilities for ``images`` from ``config``'s latest checkpoint."""
    import tensorflow as tf

    import estimator_bridge

    estimator = estimator_bridge.make_estimator(config)
    rows = estimator.predict(
        lambda: tf.data.Dataset.from_tensor_slices({"image": images}).batch(len(images))
    )
    return np.stack([row["probabilities"] for row in rows])


def start_main(*args):
    """Starts ``python main.py ARGS`` in the background, output discarded; returns the Popen."""
    return subprocess.Popen(
        [sys.executable, MAIN, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def assert_cli_error(run, *needles):
    """Checks a user error: exit 2, one ``error: ...`` line holding every needle, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ")
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
