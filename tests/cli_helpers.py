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

# What both fork servers below run after their own imports: one child per request line, which
# runs ``run(request)`` and exits with its code (``sys.exit``'s, 1 for an exception, printed);
# the server answers with the child's pid, then its exit code (as ``subprocess`` gives it: -N
# for signal N), one line each. A request is one line of JSON (``_send``).
_FORK_LOOP = """
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run(request)
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

# The Keras 3 interpreter the scripts run in: it imports Keras 3 (and TensorFlow 2.21) once,
# then forks one child per script, so each script starts from a fresh copy of an interpreter
# that has imported only ``keras`` (4-6 s of start-up paid once per pytest worker, not once per
# script). A child runs the script as ``python -c`` would (``sys.argv``, the working folder,
# ``pythonpath`` after ``''`` on ``sys.path``), its output in two files; nothing a script does
# reaches the next one (``_FORK_LOOP``).
KERAS3_SERVER = (
    """
import json, os, sys, traceback
import keras

def run(request):
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(request["cwd"])
    sys.path[1:1] = request["pythonpath"]
    if request["pythonpath"]:
        os.environ["PYTHONPATH"] = os.pathsep.join(request["pythonpath"])
    sys.argv = ["-c", *request["args"]]
    exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
"""
    + _FORK_LOOP
)
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
        atexit.register(_stop_server, _keras3_server)
    return _keras3_server


def _stop_server(server):
    server.kill()  # A fork server holds nothing to save.
    server.wait(timeout=30)
    server.stdin.close()
    server.stdout.close()


def _send(server, request):
    """Writes ``request`` to a fork server as one line of JSON."""
    data = json.dumps(request).encode() + b"\n"
    while data:  # An unbuffered pipe may take part of it at a time.
        data = data[server.stdin.write(data) :]


def _server_line(server, timeout):
    """The server's next line as a number, or None if none came within ``timeout`` seconds.

    Read a byte at a time from the unbuffered pipe, so ``select`` sees every line not yet read.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([server.stdout], [], [], left)[0]:
            return None
        byte = os.read(server.stdout.fileno(), 1)
        if not byte:
            raise RuntimeError(f"the fork server of {server.args[0]} ended (exit {server.wait()})")
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
        _send(server, request)
        pid = _server_line(server, timeout + 120)  # The server's own start-up comes first.
        if pid is None:
            raise RuntimeError("the Keras 3 server does not answer")
        returncode = _server_line(server, timeout)
        timed_out = returncode is None
        if timed_out:
            with contextlib.suppress(ProcessLookupError):  # Already ended: its code is coming.
                os.kill(pid, signal.SIGKILL)
            returncode = _server_line(server, 30)
            if returncode is None:
                raise RuntimeError("the Keras 3 server does not answer")
        with open(request["stdout"]) as out, open(request["stderr"]) as err:
            stdout, stderr = out.read(), err.read()
    command = [KERAS3_PYTHON, "-c", script, *args]
    if timed_out and returncode == -signal.SIGKILL:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


# A fork server for main.py: it imports what main.py imports once (3-5 s of CPU for a cold
# start), then forks one child per request, which runs ``main.main`` as ``python main.py ARGS``
# would after its imports. The children are real processes to signal or SIGKILL (their own pid,
# optionally their own session and process group), each started in milliseconds; nothing one
# child does reaches the next. One server per pytest worker, started on first use
# (``_FORK_LOOP``).
MAIN_SERVER = (
    """
import json, os, sys, time, traceback

import tfenv  # noqa: F401 - before TensorFlow, as main.py imports it
import tensorflow as tf
from tensorflow.python.saved_model import builder_impl

import data_pipeline, estimator_bridge, flags, jobs, keras_models, main  # noqa: F401

# Patches one step of the export to create ready_file and wait there for the kill.
def pause_at(point, ready_file):
    def pause(*args, **kwargs):
        open(ready_file, "w").close()
        time.sleep(600)

    if point == "temp-variables-written":  # Before saved_model.pb is written.
        builder_impl.SavedModelBuilder.save = pause
    elif point == "temp-complete":  # Before temp-<ts> is renamed to <ts>.
        tf.compat.v1.gfile.Rename = pause
    elif point == "keras-tmp-complete":  # Before <name>.tmp.keras is renamed to <name>.
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(src).endswith(".tmp.keras"):
                pause()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace

flags.define_flags()

def run(request):
    if request["new_session"]:  # A process group of its own, for os.killpg.
        os.setsid()
    if request["namespace"]:  # As `unshare --mount --propagation private` would.
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        MS_REC, MS_PRIVATE, CLONE_NEWNS = 0x4000, 0x40000, 0x20000
        if libc.unshare(CLONE_NEWNS) or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None):
            raise OSError(ctypes.get_errno(), "no private mount namespace")
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        flags_ = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if path else os.O_WRONLY
        os.dup2(os.open(path or os.devnull, flags_), fd)
    if request["script"] is not None:  # As `python FILE ARGS` (or -c) would run it.
        sys.path[0:0] = request["pythonpath"]
        if request["pythonpath"]:
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [*request["pythonpath"], os.environ["PYTHONPATH"]]
            )
        sys.argv = [request["filename"], *request["args"]]
        code = compile(request["script"], request["filename"], "exec")
        exec(code, {"__name__": "__main__", "__file__": request["filename"]})
    else:
        if request["pause_at"]:
            pause_at(request["pause_at"], request["ready_file"])
        main.main(main.parse_flags([main.__file__, *request["args"]]))
"""
    + _FORK_LOOP
)
_main_server = None
_main_child = None


def _main_server_process():
    """The running main.py fork server of this process, started on first use."""
    global _main_server
    if _main_server is None or _main_server.poll() is not None:
        _main_server = subprocess.Popen(
            [sys.executable, "-c", MAIN_SERVER],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        atexit.register(_stop_server, _main_server)
    return _main_server


class ForkedMain:
    """One child of the main.py fork server, handled like the ``subprocess.Popen`` of main.py.

    Its output goes to files (``capture``, read by ``communicate``) or to /dev/null.
    """

    def __init__(
        self,
        args,
        capture=False,
        new_session=False,
        pause_at=None,
        ready_file=None,
        script=None,
        filename="-c",
        pythonpath=(),
        namespace=False,
        env=None,
    ):
        import tempfile

        global _main_child
        if _main_child is not None:  # A child left running by a failed test: end it first.
            _main_child.kill()
            _main_child.wait()
        server = _main_server_process()
        self._folder = tempfile.mkdtemp(prefix="forked_main_") if capture else None
        request = {
            "args": [str(arg) for arg in args],
            "new_session": new_session,
            "namespace": namespace,
            "env": dict(env or {}),
            "script": script,
            "filename": str(filename),
            "pythonpath": [str(path) for path in pythonpath],
            "pause_at": pause_at,
            "ready_file": ready_file,
            "stdout": capture and os.path.join(self._folder, "stdout"),
            "stderr": capture and os.path.join(self._folder, "stderr"),
        }
        _send(server, request)
        self._server = server
        self.args = [MAIN, *request["args"]]
        self.pid = _server_line(server, 300)  # The server's own start-up comes first.
        if self.pid is None:
            raise RuntimeError("the main.py fork server does not answer")
        self.returncode = None
        _main_child = self

    def poll(self):
        """The exit code once the child has ended (the server has sent it), else None."""
        if self.returncode is None:
            self._finish(_server_line(self._server, 0))
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            code = _server_line(self._server, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish(code)
        return self.returncode

    def _finish(self, code):
        global _main_child
        if code is not None:
            self.returncode = code
            _main_child = None

    def send_signal(self, sig):
        # Polled first, as Popen does: the server reaps its child at once, so a pid whose exit
        # code has come may already name another process.
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # Already gone, as Popen allows.
                os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """Waits for the child; its (stdout, stderr) text (empty unless ``capture``)."""
        self.wait(timeout)
        if self._folder is None:
            return "", ""
        texts = []
        for name in ("stdout", "stderr"):
            with open(os.path.join(self._folder, name)) as handle:
                texts.append(handle.read())
        import shutil

        shutil.rmtree(self._folder, ignore_errors=True)
        return tuple(texts)


def fork_main(*args, **options):
    """Starts ``main.py ARGS`` as a forked child of a warm interpreter (``ForkedMain``).

    Options: ``capture`` (output to files, for ``communicate``; else /dev/null),
    ``new_session`` (its own process group), ``pause_at`` (an export step) and ``ready_file``
    (the child creates that file at that step and waits there to be killed).
    """
    return ForkedMain(args, **options)


def run_forked(script, *args, filename="-c", timeout=300, pythonpath=(), namespace=False, env=None):
    """Runs ``script`` (``sys.argv[1:] = args``) in a child of the main.py fork server.

    As ``python -c script ARGS`` (or ``python FILENAME ARGS``) would in an interpreter that has
    already imported main.py's modules (TensorFlow's runtime not yet started): the repo root and
    the folders in ``pythonpath`` on its path, ``env`` added to its environment; ``namespace``
    puts it in a private mount namespace first (root or CAP_SYS_ADMIN), as ``unshare --mount
    --propagation private`` would.

    Returns:
        The finished ``subprocess.CompletedProcess`` (not checked).

    Raises:
        subprocess.TimeoutExpired: The script ran longer than ``timeout`` seconds (it is killed).
    """
    child = ForkedMain(
        args,
        capture=True,
        script=script,
        filename=filename,
        pythonpath=pythonpath,
        namespace=namespace,
        env=env,
    )
    try:
        stdout, stderr = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
