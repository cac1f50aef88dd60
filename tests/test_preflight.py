"""Checks before a job builds or writes anything: paths, one trainer per model dir, bf16 support."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import tensorflow as tf
from cli_helpers import REPO, assert_cli_error, fork_main, run_cli, run_forked

import estimator_bridge
import preflight


@pytest.fixture(scope="module")
def small_model_dir(mnist_data_dir, tmp_path_factory):
    """A cnn model dir trained for 2 steps, for the jobs that read a checkpoint."""
    model_dir = tmp_path_factory.mktemp("small_cnn")
    run = run_cli(
        "--mode=train",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={model_dir}",
        "--train_steps=2",
        "--batch_size=16",
        "--limit=200",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return model_dir


def _listing(folder):
    """Every file under ``folder`` with its size and mtime: proof that nothing was written."""
    return {
        os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,)
        + (os.stat(os.path.join(root, name)).st_mtime_ns,)
        for root, _, names in os.walk(folder)
        for name in names
    }


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("mode", ["train", "train_and_evaluate", "evaluate"])
def test_model_dir_that_is_a_file(mode, mnist_data_dir, a_file):
    run = run_cli(f"--mode={mode}", f"--data_dir={mnist_data_dir}", f"--model_dir={a_file}")
    assert_cli_error(run, f"--model_dir={a_file} is a file, not a folder")
    assert a_file.read_text() == "not a folder\n"


def test_model_dir_under_a_file(mnist_data_dir, a_file):
    model_dir = a_file / "models" / "cnn"
    run = run_cli("--mode=train", f"--data_dir={mnist_data_dir}", f"--model_dir={model_dir}")
    assert_cli_error(run, f"--model_dir={model_dir} cannot be written", f"{a_file} is a file")


@pytest.mark.parametrize(
    "flag, mode, where",
    [
        ("--export_dir", "export", "{file}"),
        ("--export_dir", "export", "{file}/exports"),
        ("--output_dir", "predict", "{file}"),
        ("--output_dir", "predict", "{file}/predictions"),
        ("--keras_output", "export", "{file}/cnn.keras"),
    ],
)
def test_output_paths_blocked_by_a_file(flag, mode, where, small_model_dir, mnist_data_dir, a_file):
    value = where.format(file=a_file)
    before = _listing(small_model_dir)
    run = run_cli(
        f"--mode={mode}",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={small_model_dir}",
        f"{flag}={value}",
    )
    assert_cli_error(run, f"{flag}={value}", f"{a_file} is a file")
    assert _listing(small_model_dir) == before


def test_keras_output_that_is_a_folder(small_model_dir, mnist_data_dir, tmp_path):
    run = run_cli(
        "--mode=export",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={small_model_dir}",
        f"--keras_output={tmp_path}",
        f"--export_dir={tmp_path / 'exports'}",
    )
    assert_cli_error(run, f"--keras_output={tmp_path} is a folder", "cnn.keras")
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("mode", ["prepare", "train", "predict"])
def test_data_dir_that_is_a_file(mode, a_file, tmp_path):
    run = run_cli(f"--mode={mode}", f"--data_dir={a_file}", f"--model_dir={tmp_path / 'm'}")
    assert_cli_error(run, f"--data_dir={a_file} is a file, not a folder")


_UNDER_THE_MOUNT = """
import json, subprocess, sys
from cli_helpers import run_cli
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", sys.argv[1]], check=True)
runs = [run_cli(*args) for args in json.loads(sys.argv[2])]
print(json.dumps([[run.returncode, run.stderr] for run in runs]))
"""


def _read_only_mount(folder, runs):
    """Runs main.py once per argument list with a read-only tmpfs on ``folder``.

    One process in a private mount namespace runs them all (``cli_helpers.run_cli``), forked
    from a warm interpreter (``cli_helpers.run_forked``).
    """
    run = run_forked(
        _UNDER_THE_MOUNT,
        folder,
        json.dumps(runs),
        pythonpath=[os.path.join(REPO, "tests")],
        namespace=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.splitlines()[-1])
    return [
        subprocess.CompletedProcess(args, code, "", err) for args, (code, err) in zip(runs, results)
    ]


def test_folder_that_cannot_be_written(mnist_data_dir, small_model_dir, tmp_path):
    """A read-only file system (which stops root too), through a private read-only mount.

    As root, permission bits do not stop writes, so this is the case that matters for root and
    the one a non-root user with a read-only folder hits by the same check (``os.access``).
    """
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("needs unshare --mount (root or CAP_SYS_ADMIN) for a read-only mount")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    cases = [
        ("--model_dir", "train", read_only),
        ("--model_dir", "train", read_only / "cnn"),
        ("--output_dir", "predict", read_only / "predictions"),
        ("--export_dir", "export", read_only),
    ]
    runs = []
    for flag, mode, value in cases:
        model_dir = value if flag == "--model_dir" else small_model_dir
        args = [f"--mode={mode}", f"--data_dir={mnist_data_dir}", f"--model_dir={model_dir}"]
        if flag != "--model_dir":
            args.append(f"{flag}={value}")
        runs.append(args)
    for (flag, _, value), run in zip(cases, _read_only_mount(read_only, runs)):
        assert_cli_error(run, f"{flag}={value} cannot be written", "read-only file system")


# --------------------------------------------------------------------------------------------
# One trainer per model dir
# --------------------------------------------------------------------------------------------


def _train_args(data_dir, model_dir, mode="train", *extra):
    return [
        f"--mode={mode}",
        "--model=cnn",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=16",
        "--limit=1000",
        "--eval_throttle_secs=3600",
        "--save_checkpoints_steps=100000",
        *extra,
    ]


def test_second_trainer_stops_at_once_and_writes_nothing(mnist_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    # A real process, forked from a warm interpreter that has imported main.py's modules.
    first = fork_main(
        *_train_args(mnist_data_dir, model_dir, "train", "--train_steps=100000"), capture=True
    )
    try:
        deadline = time.monotonic() + 240
        while tf.train.latest_checkpoint(str(model_dir)) is None:  # the step-0 checkpoint
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first trainer wrote no checkpoint"
            time.sleep(0.2)
        holder = json.loads((model_dir / preflight.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        # Paused, it stays alive and keeps its lock without taking the 2 cores from the rest.
        first.send_signal(signal.SIGSTOP)

        for mode in ("train", "train_and_evaluate"):
            before = _listing(model_dir)
            started = time.monotonic()
            # In this process: the lock is the kernel's, whichever process asks.
            run = run_cli(*_train_args(mnist_data_dir, model_dir, mode, "--train_steps=200000"))
            assert_cli_error(
                run,
                f"{model_dir} is being trained by process {first.pid}",
                f"on {socket.gethostname()} since {holder['since']}",
            )
            assert time.monotonic() - started < 60  # before any graph is built
            changed = {
                path for path, stat in _listing(model_dir).items() if before.get(path) != stat
            }
            assert not changed
            assert json.loads((model_dir / preflight.LOCK_NAME).read_text()) == holder

        # Reading the model dir beside the trainer still works.
        for mode, extra in [
            ("evaluate", []),
            ("export", [f"--export_dir={tmp_path / 'exports'}"]),
            ("predict", [f"--output_dir={tmp_path / 'predictions'}"]),
        ]:
            run = run_cli(*_train_args(mnist_data_dir, model_dir, mode, "--limit=200", *extra))
            assert run.returncode == 0, (mode, run.stderr[-2000:])
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

    # The dead trainer's lock does not block the next run (the kernel dropped the flock).
    step = int(tf.train.latest_checkpoint(str(model_dir)).rsplit("-", 1)[1])
    run = run_cli(*_train_args(mnist_data_dir, model_dir, "train", f"--train_steps={step + 2}"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"trained cnn to step {step + 2}" in run.stderr
    assert json.loads((model_dir / preflight.LOCK_NAME).read_text())["pid"] != first.pid


def test_cluster_tasks_share_the_model_dir(tmp_path):
    cluster = {"chief": ["h:1"], "worker": ["h:2"], "ps": ["h:3"]}

    def task(kind, index=0, cluster=cluster):
        return {"type": kind, "index": index, "cluster": cluster}

    with preflight.trainer_lock(str(tmp_path), task("chief")):
        # The chief holds the lock; the job's other tasks do not ask for it.
        for other in (task("worker"), task("ps"), task("evaluator")):
            with preflight.trainer_lock(str(tmp_path), other):
                pass
        # Another job's chief, or a local run, on the same dir is refused.
        for intruder in (task("chief"), task(None, cluster={})):
            with pytest.raises(estimator_bridge.UsageError, match=f"process {os.getpid()}"):
                with preflight.trainer_lock(str(tmp_path), intruder):
                    pass
    # Without a chief, worker 0 writes the checkpoints and takes the lock.
    workers = {"worker": ["h:1", "h:2"]}
    with preflight.trainer_lock(str(tmp_path), task("worker", 0, workers)):
        with preflight.trainer_lock(str(tmp_path), task("worker", 1, workers)):
            pass
        with pytest.raises(estimator_bridge.UsageError):
            with preflight.trainer_lock(str(tmp_path), task(None, cluster={})):
                pass


# --------------------------------------------------------------------------------------------
# bf16 arithmetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_bf16", [False, True])
def test_mixed_bfloat16_without_bf16_arithmetic_says_so_first(
    has_bf16, mnist_data_dir, tmp_path, monkeypatch
):
    # This machine's answer is faked both ways (x86, no GPU, these CPU flags).
    flags = {"sse2", "avx2", "fma"} | ({"avx512_bf16"} if has_bf16 else set())
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(preflight, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": flags)
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(preflight, "_warned", False)  # it warns once per process
    run = run_cli(
        "--mode=train",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={tmp_path}",
        "--precision=mixed_bfloat16",
        "--train_steps=1",
        "--batch_size=8",
        "--limit=64",
    )
    # A warning, not a stop: the run goes on and trains (bf16 is right, only slow).
    assert run.returncode == 0, run.stderr[-2000:]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-1")
    warnings = [line for line in run.stderr.splitlines() if "mixed_bfloat16" in line]
    if has_bf16:
        assert warnings == []
    else:
        assert warnings == [run.stderr.splitlines()[0]]  # one line, before anything else
        line = warnings[0]
        assert line.startswith("warning: --precision=mixed_bfloat16 without bf16 arithmetic")
        for needle in ("avx512_bf16", "amx_bf16", "slower than float32", "--precision=float32"):
            assert needle in line, line


def test_bf16_capability_of_cpus_and_gpus(monkeypatch):
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert preflight.missing_bf16_arithmetic() is None
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "no avx512_bf16 or amx_bf16" in preflight.missing_bf16_arithmetic()
    monkeypatch.setattr(preflight, "cpu_flags", lambda: None)  # cannot tell: no warning
    assert preflight.missing_bf16_arithmetic() is None
    # A GPU runs the graph: its compute capability decides, not the CPU.
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [(8, 0)])
    assert preflight.missing_bf16_arithmetic() is None
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [(8, 6), (7, 5)])
    assert "GPU 1 is 7.5" in preflight.missing_bf16_arithmetic()


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert preflight.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert preflight.cpu_flags(str(tmp_path / "missing")) is None


def test_urls_are_left_to_tensorflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = estimator_bridge.Config(model_dir="gs://bucket/models/cnn", data_dir="gs://bucket/d")
    preflight.check_paths(config, "train")
    with preflight.trainer_lock(config.model_dir, {"type": None, "index": 0, "cluster": {}}):
        pass
    assert os.listdir(tmp_path) == []  # no local "gs:" folder, no lock file


def test_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / preflight.LOCK_NAME).mkdir()  # as root, a folder is what cannot be opened
    with pytest.raises(estimator_bridge.UsageError, match="cannot open .*Is a directory"):
        with preflight.trainer_lock(str(tmp_path), {"type": None, "index": 0, "cluster": {}}):
            pass
