"""Training faults with real processes and real signals: SIGKILL, SIGINT, a NaN loss."""

import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(data_dir, model_dir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "main.py"),
        "--mode=train",
        "--model=cnn",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=32",
        "--limit=2000",
        "--seed=3",
        *extra,
    ]


def _start(command):
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def _wait_for_checkpoint(model_dir, process, least_step, timeout=240):
    """Polls until the checkpoint state names a step >= least_step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        latest = tf.train.latest_checkpoint(str(model_dir))
        if latest and int(latest.rsplit("-", 1)[1]) >= least_step:
            return latest
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no checkpoint >= {least_step} in {model_dir} after {timeout}s")


def _readable_step(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    for name in ("conv1/kernel", "dense1/kernel", "logits/bias"):
        assert reader.get_tensor(name).size > 0
    return int(reader.get_tensor("global_step"))


def test_sigkill_then_rerun_resumes_to_the_target(mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    command = _command(
        mnist_data_dir, model_dir, "--train_steps=400", "--save_checkpoints_steps=20"
    )
    process = _start(command)
    _wait_for_checkpoint(model_dir, process, 40)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, the checkpoint the state file names is complete.
    killed_at = _readable_step(tf.train.latest_checkpoint(str(model_dir)))
    assert 40 <= killed_at < 400

    rerun = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming cnn from step {killed_at} to 400" in rerun.stderr
    assert _readable_step(tf.train.latest_checkpoint(str(model_dir))) == 400


def test_sigint_saves_a_checkpoint_and_says_so(mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    # Periodic checkpoints far apart: the one written on the way out is the SIGINT's.
    command = _command(
        mnist_data_dir, model_dir, "--train_steps=100000", "--save_checkpoints_steps=100000"
    )
    process = _start(command)
    _wait_for_checkpoint(model_dir, process, 0)  # the step-0 checkpoint: training has begun
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    step = _readable_step(tf.train.latest_checkpoint(str(model_dir)))
    assert 0 < step < 100000
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [
        f"interrupted: checkpoint saved at step {step} in {model_dir}; rerun to resume"
    ]
    assert "Traceback" not in stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    good = subprocess.run(
        _command(mnist_data_dir, model_dir, "--train_steps=10"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    # An absurd learning rate overflows float32 within a few steps: inf - inf = NaN.
    bad = subprocess.run(
        _command(mnist_data_dir, model_dir, "--train_steps=500", "--learning_rate=1e38"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert bad.returncode == 1, bad.stderr[-2000:]
    lines = [line for line in bad.stderr.splitlines() if not line.startswith(("resuming", "step"))]
    assert len(lines) == 1 and lines[0].startswith("error: the loss became NaN"), bad.stderr
    assert "model.ckpt-10" in lines[0]
    assert "Traceback" not in bad.stderr
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest.endswith("model.ckpt-10") and _readable_step(latest) == 10
