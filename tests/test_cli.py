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


def _cli_config(*args):
    """The Config that ``main.py ARGS`` would run, parsed in this process."""
    from absl import flags as absl_flags

    import flags
    import main

    if "mode" not in absl_flags.FLAGS:
        flags.define_flags()
    absl_flags.FLAGS.unparse_flags()
    try:
        main.parse_flags([main.__file__, *args])
        return main.build_config()
    finally:
        absl_flags.FLAGS.unparse_flags()


def test_each_network_trains_with_its_defaults_unless_a_flag_says_otherwise():
    from absl import flags as absl_flags

    import keras_models

    # The rnn's rate decays to 0 over its epochs (docs/benchmarks.md); the others keep it.
    assert keras_models.training_defaults("rnn") == {"lr_schedule": "cosine"}
    rnn = _cli_config("--model=rnn", "--epochs=3")
    assert (rnn.learning_rate, rnn.lr_schedule) == (1e-3, "cosine")
    for name in ("cnn", "birnn", "cnn_rnn", "user_models:build_bn_net"):
        config = _cli_config(f"--model={name}")
        assert (config.learning_rate, config.lr_schedule) == (1e-3, "constant"), name
    # The tutorial's exact recipe, and any explicit choice, win over the network's default.
    assert _cli_config("--model=rnn", "--lr_schedule=constant").lr_schedule == "constant"
    assert _cli_config("--model=rnn", "--lr_schedule=exponential").lr_schedule == "exponential"
    assert _cli_config("--model=rnn", "--learning_rate=2e-3").learning_rate == 2e-3
    # --help, which must not import TensorFlow, spells each network's own default out.
    shown = absl_flags.FLAGS["lr_schedule"].help
    for name, settings in keras_models.TRAINING_DEFAULTS.items():
        assert f"{settings['lr_schedule']} for {name}" in shown, shown
