"""Helpers the test modules share: main.py and fresh interpreters run as a user runs them, and
the Estimator's own predictions to compare exports with."""

import contextlib
import io
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


def run_cli(*args, cwd=REPO, pythonpath=()):
    """Runs ``main.py ARGS`` in this process: ``run_main`` without the 4-7 s interpreter start.

    For the many refusals (flags, paths, data, models) that stop before anything trains; what
    only a real process shows (TensorFlow's C++ log lines, signals, exit codes from the OS) stays
    with ``run_main``. Flags are reset before each call; stdout and stderr are captured.

    Returns:
        A ``subprocess.CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr``.
    """
    from absl import flags as absl_flags

    import flags
    import main

    if "mode" not in absl_flags.FLAGS:
        flags.define_flags()
    absl_flags.FLAGS.unparse_flags()
    stdout, stderr = io.StringIO(), io.StringIO()
    old_cwd, old_path = os.getcwd(), list(sys.path)
    returncode = 0
    try:
        os.chdir(cwd)
        sys.path[1:1] = [str(folder) for folder in pythonpath]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main.main(main.parse_flags([MAIN, *args]))
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        absl_flags.FLAGS.unparse_flags()
    return subprocess.CompletedProcess(
        [MAIN, *args], returncode, stdout.getvalue(), stderr.getvalue()
    )


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


def run_fresh_python(script, *args, timeout=180, pythonpath=()):
    """Runs ``script`` (with ``sys.argv[1:] = args``) in a new CPU-only interpreter.

    Returns the finished ``subprocess.CompletedProcess`` (it exited 0).

    No state is shared with the tests. The repo root and the folders in ``pythonpath`` are on its
    path, so it can import the project's modules; nothing is imported for it (not even
    ``tfenv``), as in a user's own process.
    """
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([REPO, *map(str, pythonpath)]),
    }
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def checkpoint_variables(model_dir):
    """Every variable of the latest checkpoint (weights, Adam slots, global step) by name."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(model_dir))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)}


def differing_variables(a, b):
    """The names of the variables whose values differ between two ``checkpoint_variables``."""
    assert a.keys() == b.keys()
    return sorted(name for name in a if not np.array_equal(a[name], b[name]))


def estimator_probabilities(config, images):
    """The probabilities ``estimator.predict`` gives for ``images`` (float32 ``[N, H, W, C]``)."""
    import tensorflow as tf

    import estimator_bridge

    estimator = estimator_bridge.make_estimator(config)
    input_fn = lambda: tf.data.Dataset.from_tensor_slices({"image": images}).batch(len(images))  # noqa: E731
    return np.stack([row["probabilities"] for row in estimator.predict(input_fn)])


KERAS3_PYTHON = os.path.join(REPO, ".venv-keras3", "bin", "python")


def run_keras3(script, *args, timeout=240, cwd=None, pythonpath=()):
    """Runs ``script`` (``sys.argv[1:] = args``) under Keras 3 (TensorFlow 2.21, ``.venv-keras3``).

    Nothing of this project is on that interpreter's path unless ``pythonpath`` names it: by
    default it is what a Keras 3 user has. ``make test`` builds the environment (``make
    setup-keras3``); without it the test fails and says so, it never skips.

    Returns:
        The finished ``subprocess.CompletedProcess`` (not checked: refusals are tested too).
    """
    import pytest

    if not os.path.exists(KERAS3_PYTHON):
        pytest.fail(f"{KERAS3_PYTHON} is missing: run `make setup-keras3` (make test does)")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TF_USE_LEGACY_KERAS")
    }
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    return subprocess.run(
        [KERAS3_PYTHON, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or os.path.dirname(KERAS3_PYTHON),
    )
