"""Running main.py the way a user does, for the tests (imported by the test modules)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")


def run_main(*args, timeout=300):
    """Runs ``python main.py ARGS`` from the repo root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, MAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
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
