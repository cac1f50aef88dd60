"""Training faults: SIGKILL and SIGINT on real processes, a NaN loss; seeded resumes are exact.

The runs that need no signal (the uninterrupted run, reruns, the NaN) run main.main() in the
test process (cli_helpers.run_cli).
"""

import signal
import time

import pytest
import tensorflow as tf
from cli_helpers import checkpoint_variables, differing_variables, fork_main, run_cli


def _args(data_dir, model_dir, *extra):
    return [
        "--mode=train",
        "--model=cnn",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=32",
        "--limit=2000",
        "--seed=5",
        *extra,
    ]


def _start(args):
    """``main.py ARGS`` in a real process (to signal), its output captured.

    Forked from a warm interpreter that has imported main.py's modules (``cli_helpers.fork_main``).
    """
    return fork_main(*args, capture=True)


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


def test_sigkill_then_rerun_resumes_to_the_uninterrupted_weights(mnist_data_dir, tmp_path):
    """A seeded run SIGKILLed mid-training and rerun ends bit for bit where an unbroken one does."""
    args = ["--train_steps=60", "--save_checkpoints_steps=10", "--augment"]
    whole = run_cli(*_args(mnist_data_dir, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-2000:]

    model_dir = tmp_path / "resumed"
    command = _args(mnist_data_dir, model_dir, *args)
    process = _start(command)
    _wait_for_checkpoint(model_dir, process, 10)  # a checkpoint after step 0 is complete
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, the checkpoint the state file names is complete.
    killed_at = _readable_step(tf.train.latest_checkpoint(str(model_dir)))
    assert 10 <= killed_at < 60

    # The rerun needs no process of its own: what is checked is what it resumes from.
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming cnn from step {killed_at} to 60" in rerun.stderr
    final = checkpoint_variables(model_dir)
    assert int(final["global_step"]) == 60
    assert differing_variables(final, checkpoint_variables(tmp_path / "whole")) == []


def test_sigint_saves_a_checkpoint_and_says_so(mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    # Periodic checkpoints far apart: the one written on the way out is the SIGINT's.
    command = _args(
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
    good = run_cli(*_args(mnist_data_dir, model_dir, "--train_steps=10"))
    assert good.returncode == 0, good.stderr[-2000:]
    # An absurd learning rate overflows float32 within a few steps: inf - inf = NaN.
    bad = run_cli(*_args(mnist_data_dir, model_dir, "--train_steps=500", "--learning_rate=1e38"))
    assert bad.returncode == 1, bad.stderr[-2000:]
    lines = [
        line
        for line in bad.stderr.splitlines()
        if not line.startswith(("precision:", "resuming", "step"))
    ]
    assert len(lines) == 1 and lines[0].startswith("error: the loss became NaN"), bad.stderr
    assert "model.ckpt-10" in lines[0]
    assert "Traceback" not in bad.stderr
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest.endswith("model.ckpt-10") and _readable_step(latest) == 10
