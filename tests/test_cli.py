"""main.py: bad input gives one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def _assert_one_line_error(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unknown_model_lists_choices():
    _assert_one_line_error(_cli("--model=lenet"), "lenet", "birnn", "cnn", "cnn_rnn", "rnn")


def test_unknown_mode_lists_choices():
    _assert_one_line_error(_cli("--mode=fit"), "prepare", "train_and_evaluate", "export")


@pytest.mark.parametrize("flag", ["--batch_size=0", "--batch_size=-4", "--train_steps=0"])
def test_non_positive_sizes(flag, mnist_data_dir, tmp_path):
    run = _cli("--mode=train", flag, f"--data_dir={mnist_data_dir}", f"--model_dir={tmp_path}")
    _assert_one_line_error(run, flag.split("=")[0])


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    run = _cli("--mode=train", f"--data_dir={missing}", f"--model_dir={tmp_path / 'm'}")
    _assert_one_line_error(run, str(missing), "--mode=prepare")


def test_missing_checkpoint(mnist_data_dir, tmp_path):
    run = _cli("--mode=evaluate", f"--data_dir={mnist_data_dir}", f"--model_dir={tmp_path}")
    _assert_one_line_error(run, "no checkpoint", str(tmp_path))
    ckpt = tmp_path / "model.ckpt-123"
    run = _cli("--mode=export", f"--data_dir={mnist_data_dir}", f"--checkpoint_path={ckpt}")
    _assert_one_line_error(run, "does not exist", str(ckpt))
