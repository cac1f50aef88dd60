"""main.py: bad input gives one line on stderr and exit code 2, never a traceback.

Two cases run in real processes, what a user sees with TensorFlow's C++ log included: a refusal
of ``--model`` and one after the Estimator's checkpoint lookup. The rest run in this process
(``run_cli``).
"""

import pytest
from cli_helpers import assert_cli_error, run_cli, run_main


def test_unknown_model_lists_choices():
    assert_cli_error(run_main("--model=lenet"), "lenet", "birnn", "cnn", "cnn_rnn", "rnn")


def test_unknown_mode_lists_choices():
    assert_cli_error(run_cli("--mode=fit"), "prepare", "train_and_evaluate", "export")


@pytest.mark.parametrize("flag", ["--batch_size=0", "--batch_size=-4", "--train_steps=0"])
def test_non_positive_sizes(flag, mnist_data_dir, tmp_path):
    run = run_cli("--mode=train", flag, f"--data_dir={mnist_data_dir}", f"--model_dir={tmp_path}")
    assert_cli_error(run, flag.split("=")[0])


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    run = run_cli("--mode=train", f"--data_dir={missing}", f"--model_dir={tmp_path / 'm'}")
    assert_cli_error(run, str(missing), "--mode=prepare")


def test_missing_checkpoint(mnist_data_dir, tmp_path):
    run = run_main("--mode=evaluate", f"--data_dir={mnist_data_dir}", f"--model_dir={tmp_path}")
    assert_cli_error(run, "no checkpoint", str(tmp_path))
    ckpt = tmp_path / "model.ckpt-123"
    run = run_cli("--mode=export", f"--data_dir={mnist_data_dir}", f"--checkpoint_path={ckpt}")
    assert_cli_error(run, "does not exist", str(ckpt))
