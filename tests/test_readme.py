"""The README cannot drift from the command line: every `main.py` command in its code blocks parses
with main.py's own flags (names, enums, validators), and `main.py --help` shows them by task."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags as absl_flags
from cli_helpers import MAIN, REPO

import flags

README = pathlib.Path(REPO) / "README.md"


def readme_commands():
    """Each `main.py` command in README.md's bash blocks, as its arguments after main.py."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "main.py" in words:
                commands.append(words[words.index("main.py") + 1 :])
    return commands


def test_readme_has_the_main_commands():
    commands = readme_commands()
    modes = {arg.split("=", 1)[1] for args in commands for arg in args if arg.startswith("--mode=")}
    assert {"prepare", "train", "evaluate", "predict", "export"} <= modes
    assert len(README.read_text().splitlines()) <= 270
    # Run as written after set-up: the environment's Python, never a bare `python main.py`.
    assert not re.search(r"(^|\s)python3? main\.py", README.read_text(), flags=re.M)


@pytest.mark.parametrize("args", readme_commands(), ids=lambda args: " ".join(args)[:60])
def test_readme_command_parses(args):
    fv = absl_flags.FLAGS
    if "mode" not in fv:
        flags.define_flags()
    fv.unparse_flags()
    try:
        rest = fv([MAIN, *args])  # unknown flags, enum values and validators raise here
    except absl_flags.Error as error:
        pytest.fail(f"README command {' '.join(args)} is refused: {error}")
    finally:
        fv.unparse_flags()
    assert rest == [MAIN], f"stray arguments {rest[1:]}"


def test_help_shows_the_flags_by_task():
    """`--help` is a short page of the flags grouped by task, without starting TensorFlow."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", MAIN, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    titles = [title.split(":")[0] for title, _ in flags.HELP_GROUPS]
    positions = [out.find(f"\n{title}") for title in titles]
    assert all(p > 0 for p in positions) and positions == sorted(positions), out
    train = out[positions[2] : positions[3]]
    for flag in ("--epochs=1.0", "--batch_size=128", "--[no]augment", "--precision="):
        assert flag in train
    assert "--eval_split=test" in out[positions[3] : positions[4]]
    assert "--mode=train" in out and ".venv/bin/python main.py --mode=prepare" in out
    assert "--helpfull" in out and len(out.splitlines()) < 120
    # Every defined flag is on the page once (a new flag outside HELP_GROUPS lands under "other").
    if "mode" not in absl_flags.FLAGS:
        flags.define_flags()
    for flag in absl_flags.FLAGS.get_flags_for_module("flags"):
        assert f"--{flag.name}=" in out or f"--[no]{flag.name}" in out, flag.name
    assert not re.search(r"\|\s+tensorflow$", run.stderr, flags=re.M), "--help imported TensorFlow"


def test_epochs_count_the_data_dirs_train_records(digits_folder, tmp_path):
    """--epochs counts passes over this dataset's train split (not MNIST's 55,000)."""
    import data_pipeline
    import estimator_bridge

    spec = data_pipeline.prepare(str(tmp_path / "digits"), source_dir=str(digits_folder))
    train = spec.num_records("train")
    config = estimator_bridge.Config(data_dir=str(tmp_path / "digits"), epochs=2.5, batch_size=64)
    assert estimator_bridge.target_step(config) == -(-5 * train // (2 * 64))
    assert train != 55000
