"""--seed reproduces a run bit for bit: initial weights, dropout, input order, augmentation."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import estimator_bridge
import jobs
import keras_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint(model_dir):
    """Every variable of the latest checkpoint (weights, Adam slots, global step) by name."""
    path = tf.train.latest_checkpoint(str(model_dir))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)}


def _differing(a, b):
    assert a.keys() == b.keys()
    return sorted(name for name in a if not np.array_equal(a[name], b[name]))


def _train(data_dir, model_dir, **overrides):
    settings = {"batch_size": 16, "train_steps": 3, "train_limit": 500, "progress": False}
    config = estimator_bridge.Config(
        data_dir=str(data_dir), model_dir=str(model_dir), **{**settings, **overrides}
    )
    jobs.train(config)
    return _checkpoint(model_dir)


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_same_seed_same_checkpoint(name, mnist_data_dir, tmp_path):
    # Augmentation on, so its draws are covered too; dropout is on in every network.
    runs = [
        _train(mnist_data_dir, tmp_path / f"run{i}", model=name, seed=7, augment=True)
        for i in range(2)
    ]
    assert int(runs[0]["global_step"]) == 3
    assert _differing(*runs) == []


def test_without_a_seed_runs_differ(mnist_data_dir, tmp_path):
    runs = [_train(mnist_data_dir, tmp_path / f"run{i}", model="cnn", train_steps=1) for i in "ab"]
    # The initial weights already differ, and so does every trained weight.
    assert {"conv1/kernel", "dense1/kernel", "logits/kernel"} <= set(_differing(*runs))


def test_other_seed_other_weights(mnist_data_dir, tmp_path):
    a = _train(mnist_data_dir, tmp_path / "a", model="rnn", seed=1, train_steps=1)
    b = _train(mnist_data_dir, tmp_path / "b", model="rnn", seed=2, train_steps=1)
    # The GRU kernels come from keras_models.GateOrthogonal: the seed reaches them too.
    assert {"gru1/gru_cell/kernel", "gru1/gru_cell/recurrent_kernel"} <= set(_differing(a, b))


def _command(data_dir, model_dir):
    return [
        sys.executable,
        os.path.join(REPO, "main.py"),
        "--mode=train",
        "--model=cnn",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=32",
        "--limit=2000",
        "--train_steps=60",
        "--save_checkpoints_steps=10",
        "--seed=5",
        "--augment",
    ]


def _run(command):
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(mnist_data_dir, tmp_path):
    whole = tmp_path / "whole"
    _run(_command(mnist_data_dir, whole))

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        _command(mnist_data_dir, resumed),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:  # SIGKILL once a checkpoint after step 0 is complete
            assert process.poll() is None, "training ended before it could be killed"
            latest = tf.train.latest_checkpoint(str(resumed))
            if latest and int(latest.rsplit("-", 1)[1]) >= 10:
                break
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    killed_at = int(_checkpoint(resumed)["global_step"])
    assert 10 <= killed_at < 60
    rerun = _run(_command(mnist_data_dir, resumed))
    assert f"resuming cnn from step {killed_at} to 60" in rerun.stderr
    final = _checkpoint(resumed)
    assert int(final["global_step"]) == 60
    assert _differing(final, _checkpoint(whole)) == []
