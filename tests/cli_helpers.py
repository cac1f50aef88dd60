"""Helpers the test modules share: main.py and fresh interpreters run as a user runs them, and
the Estimator's own predictions to compare exports with."""

import atexit
import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time

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

# The Keras 3 interpreter the scripts run in: it imports Keras 3 (and TensorFlow 2.21) once,
# then forks one child per script, so each script starts from a fresh copy of an interpreter
# that has imported only ``keras`` (4-6 s of start-up paid once per pytest worker, not once per
# script). A child runs the script as ``python -c`` would (``sys.argv``, the working folder,
# ``pythonpath`` after ``''`` on ``sys.path``), its output in two files; nothing a script does
# reaches the next one. Protocol, one line each: request (JSON) in; the child's pid, then its
# exit code (as ``subprocess`` gives it: -N for signal N) out.
KERAS3_SERVER = """
import json, os, sys, traceback
import keras

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(request["cwd"])
            sys.path[1:1] = request["pythonpath"]
            if request["pythonpath"]:
                os.environ["PYTHONPATH"] = os.pathsep.join(request["pythonpath"])
            sys.argv = ["-c", *request["args"]]
            exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # Never back into this loop.
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_keras3_server = None


def _keras3_server_process():
    """The running Keras 3 fork server of this process, started on first use."""
    global _keras3_server
    if _keras3_server is None or _keras3_server.poll() is not None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TF_USE_LEGACY_KERAS")
        }
        env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
        _keras3_server = subprocess.Popen(
            [KERAS3_PYTHON, "-c", KERAS3_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            cwd=os.path.dirname(KERAS3_PYTHON),
        )
        atexit.register(_stop_keras3_server, _keras3_server)
    return _keras3_server


def _stop_keras3_server(server):
    server.kill()  # Holds nothing to save.
    server.wait(timeout=30)
    server.stdin.close()
    server.stdout.close()


def _read_line(server, deadline, pid=None):
    """The server's next line as a number; past ``deadline`` the child ``pid`` is killed first.

    Read a byte at a time from the unbuffered pipe, so ``select`` sees every line not yet read.
    """
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if pid is None:
                raise RuntimeError("the Keras 3 server does not answer")
            with contextlib.suppress(ProcessLookupError):  # Already ended: its code is coming.
                os.kill(pid, signal.SIGKILL)
            pid, deadline = None, time.monotonic() + 30
            continue
        byte = os.read(server.stdout.fileno(), 1)
        if not byte:
            raise RuntimeError(f"the Keras 3 server stopped (exit {server.wait()})")
        line += byte
    return int(line)


def run_keras3(script, *args, timeout=240, cwd=None, pythonpath=()):
    """Runs ``script`` (``sys.argv[1:] = args``) under Keras 3 (TensorFlow 2.21, ``.venv-keras3``).

    Nothing of this project is on that interpreter's path unless ``pythonpath`` names it: by
    default it is what a Keras 3 user has. ``make test`` builds the environment (``make
    setup-keras3``); without it the test fails and says so, it never skips. The script runs in a
    child forked from an interpreter that has imported ``keras`` and nothing else
    (``KERAS3_SERVER``).

    Returns:
        The finished ``subprocess.CompletedProcess`` (not checked: refusals are tested too).

    Raises:
        subprocess.TimeoutExpired: The script ran longer than ``timeout`` seconds (it is killed).
    """
    import tempfile

    import pytest

    if not os.path.exists(KERAS3_PYTHON):
        pytest.fail(f"{KERAS3_PYTHON} is missing: run `make setup-keras3` (make test does)")
    server = _keras3_server_process()
    args = [str(arg) for arg in args]
    with tempfile.TemporaryDirectory() as folder:
        request = {
            "script": script,
            "args": args,
            "cwd": str(cwd or os.path.dirname(KERAS3_PYTHON)),
            "pythonpath": [str(path) for path in pythonpath],
            "stdout": os.path.join(folder, "stdout"),
            "stderr": os.path.join(folder, "stderr"),
        }
        deadline = time.monotonic() + timeout + 120  # The server's own start-up comes first.
        data = json.dumps(request).encode() + b"\n"
        while data:  # An unbuffered pipe may take part of it at a time.
            data = data[server.stdin.write(data) :]
        pid = _read_line(server, deadline)
        deadline = time.monotonic() + timeout
        returncode = _read_line(server, deadline, pid)
        timed_out = time.monotonic() > deadline
        with open(request["stdout"]) as out, open(request["stderr"]) as err:
            stdout, stderr = out.read(), err.read()
    command = [KERAS3_PYTHON, "-c", script, *args]
    if timed_out and returncode == -signal.SIGKILL:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)
