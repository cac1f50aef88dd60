"""A full disk loses nothing: each job on a real small file system filled to just below its need.

Every case mounts a size-limited tmpfs in a private mount namespace (root or CAP_SYS_ADMIN: the
mount is invisible outside and dies with the process), runs ``main.py``'s ``main()`` there
(``cli_helpers.run_cli``) until a write fails for lack of space, checks the one ``error:`` line
(exit 75, the path, "the disk is full", what was kept, the fix), that what was complete before
is still complete and loadable and that nothing half-written is left; then it makes room (a
larger remount, or the filler file removed) and reruns the same command, which finishes the job.

All cases run in ONE namespaced process (forked from a warm interpreter: no TensorFlow start);
each test below reports its own case.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import traceback

import pytest
from cli_helpers import REPO, run_forked

EXIT_DISK_FULL = 75
PAGE = 4096
_SMALL_CNN = [
    '--model_params={"dense_units": 64}',
    "--batch_size=32",
    "--seed=5",
    "--precision=float32",
]


# --------------------------------------------------------------------------------------------
# Inside the namespace
# --------------------------------------------------------------------------------------------


def _mount(folder, size):
    os.makedirs(folder, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={_pages(size) * PAGE}", "tmpfs", folder], check=True
    )


def _remount(folder, size):
    subprocess.run(["mount", "-o", f"remount,size={_pages(size) * PAGE}", folder], check=True)


def _pages(size):
    return max(1, -(-int(size) // PAGE))


def _fill(folder, leave):
    """Fills ``folder``'s file system but ``leave`` bytes (rounded up to pages) with a filler."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    filler = os.path.join(folder, "filler")
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, free - -(-int(leave) // PAGE) * PAGE))
    return filler


def _size(folder):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def _footprint(folder):
    """What ``folder``'s files take on tmpfs: each file's size rounded up to whole pages."""
    return sum(
        _pages(os.path.getsize(os.path.join(root, name))) * PAGE
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.getsize(os.path.join(root, name))
    )


def _listing(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, dirs, names in os.walk(folder)
        for name in names + dirs
    )


def _temporary(folder):
    """Names that a failed write must not leave: temp files and folders of every writer."""
    marks = (".tmp", "tempstate", "_temp", "temp-")
    return [name for name in _listing(folder) if any(mark in name for mark in marks)]


def _assert_disk_full(run, path, *needles):
    assert run.returncode == EXIT_DISK_FULL, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [
        line
        for line in run.stderr.splitlines()
        if line.strip() and not line.startswith(("step ", "resuming "))
    ]
    assert len(lines) == 1, run.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"error: {path}"), line
    for needle in ("the disk is full", "free space", "rerun the same command", *needles):
        assert str(needle) in line, line


def _case_prepare(root, npz):
    """MNIST (1,300 records, 13 shards) prepared onto a tmpfs holding about half of it."""
    from cli_helpers import run_cli

    import data_pipeline

    args = ["--mode=prepare", f"--source_dir={npz}", "--records_per_shard=100"]
    whole = root / "prepared_whole"
    assert run_cli(*args, f"--data_dir={whole}").returncode == 0
    data_dir = root / "prepare"
    _mount(data_dir, _size(whole) // 2)
    command = [*args, f"--data_dir={data_dir}"]
    run = run_cli(*command)
    _assert_disk_full(
        run, data_dir / "train-", "no dataset_spec.json was written", "shards completed"
    )
    assert not (data_dir / "dataset_spec.json").exists()
    assert _temporary(data_dir) == []
    journal = (data_dir / ".prepare-progress.json").read_text().split("\n")[1:-1]
    kept = {line.split()[0]: os.stat(data_dir / line.split()[0]).st_ino for line in journal}
    assert len(kept) >= 3 and f"the {len(kept)} shards completed are kept" in run.stderr
    for name in kept:  # every shard under a final name is whole
        assert (data_dir / name).read_bytes() == (whole / name).read_bytes(), name

    _remount(data_dir, _size(whole) * 2)
    assert run_cli(*command).returncode == 0
    assert {name: os.stat(data_dir / name).st_ino for name in kept} == kept  # not rewritten
    assert data_pipeline.check_shards(data_dir) == {"train": 1000, "test": 300}
    for name in os.listdir(whole):
        if name != "dataset_spec.json":
            assert (data_dir / name).read_bytes() == (whole / name).read_bytes(), name


def _case_prepare_beam(root, npz):
    """400 MNIST records (8 shards) prepared by Beam, one worker process, onto half their size.

    The failure happens in the worker and comes back as Beam's error text; the same command then
    resumes, and its shards are byte-identical to an undisturbed (in-process) Beam run's.
    """
    import numpy as np
    from cli_helpers import run_cli

    import data_pipeline
    from data_pipeline import beam_writer

    with np.load(npz) as arrays:
        small = {name: arrays[name][: 300 if "train" in name else 100] for name in arrays}
    np.savez(root / "mnist400.npz", **small)
    args = ["--mode=prepare", f"--source_dir={root / 'mnist400.npz'}", "--records_per_shard=50"]
    args.append("--prepare_engine=beam")
    whole = root / "beam_whole"
    undisturbed = "--beam_options=--direct_running_mode=in_memory"  # no worker to start
    assert run_cli(*args, undisturbed, f"--data_dir={whole}").returncode == 0
    data_dir = root / "prepare_beam"
    _mount(data_dir, _size(whole) // 2)
    command = [*args, "--beam_options=--direct_num_workers=1", f"--data_dir={data_dir}"]
    run = run_cli(*command)
    _assert_disk_full(run, data_dir, "no dataset_spec.json was written", "shards completed")
    failed = run.stderr.split(":")[1].strip()  # the shard being written
    assert os.path.dirname(failed) == str(data_dir) and not os.path.exists(failed), failed
    assert os.path.basename(failed).startswith(("train-", "test-")), failed
    assert not (data_dir / "dataset_spec.json").exists()
    work = beam_writer.WORK_DIR  # the journal, kept for the rerun: clearly temporary
    assert [name for name in _temporary(data_dir) if not name.startswith(work)] == []
    kept = {
        name[len(work) + 1 : -len(".json")]
        for name in _listing(data_dir)
        if name.startswith(work) and name.endswith(".json")
    }
    shards = sorted(name for name in os.listdir(data_dir) if not name.startswith("."))
    assert shards == sorted(kept) and f"the {len(kept)} shards completed are kept" in run.stderr
    inodes = {name: os.stat(data_dir / name).st_ino for name in kept}
    for name in kept:
        assert (data_dir / name).read_bytes() == (whole / name).read_bytes(), name

    _remount(data_dir, _size(whole) * 2)
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {name: os.stat(data_dir / name).st_ino for name in kept} == inodes  # not rewritten
    assert data_pipeline.check_shards(data_dir) == {"train": 300, "test": 100}
    assert sorted(os.listdir(data_dir)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        assert (data_dir / name).read_bytes() == (whole / name).read_bytes(), name


def _case_train(root, data_dir):
    """A seeded cnn whose third checkpoint (step 20) does not fit; the rerun resumes from 10."""
    import tensorflow as tf
    from cli_helpers import checkpoint_variables, differing_variables, run_cli

    args = ["--mode=train", "--model=cnn", f"--data_dir={data_dir}", *_SMALL_CNN]
    args += ["--train_steps=20", "--save_checkpoints_steps=10", "--limit=640"]
    whole = root / "model_whole"
    assert run_cli(*args, f"--model_dir={whole}").returncode == 0
    checkpoint = sum(os.path.getsize(path) for path in tf.io.gfile.glob(f"{whole}/model.ckpt-20*"))
    model_dir = root / "model"
    _mount(model_dir, _size(whole) - checkpoint // 2)
    command = [*args, f"--model_dir={model_dir}"]
    run = run_cli(*command)
    _assert_disk_full(
        run,
        model_dir / "model.ckpt-20",
        f"the last good checkpoint {model_dir / 'model.ckpt-10'} is kept",
    )
    assert _temporary(model_dir) == [] and not tf.io.gfile.glob(f"{model_dir}/model.ckpt-20*")
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest == str(model_dir / "model.ckpt-10")
    assert int(tf.train.load_checkpoint(latest).get_tensor("global_step")) == 10

    _remount(model_dir, _size(whole) * 2)
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming cnn from step 10 to 20" in rerun.stderr
    final = checkpoint_variables(model_dir)
    assert differing_variables(final, checkpoint_variables(whole)) == []
    return model_dir


def _case_train_and_evaluate(root, data_dir):
    """The train case's model taken on to step 30; its best export finds its file system full."""
    import tensorflow as tf
    from cli_helpers import run_cli

    model_dir = root / "train_and_evaluate"
    shutil.copytree(root / "model_whole", model_dir)  # at step 20, never evaluated
    export_dir = model_dir / "export"
    _mount(export_dir, 64 << 20)
    command = ["--mode=train_and_evaluate", "--model=cnn", f"--data_dir={data_dir}", *_SMALL_CNN]
    command += ["--train_steps=30", "--save_checkpoints_steps=10", "--limit=640"]
    command += [f"--model_dir={model_dir}"]
    filler = _fill(export_dir, 0)
    run = run_cli(*command)
    _assert_disk_full(
        run,
        export_dir / "best",
        f"the last good checkpoint {model_dir / 'model.ckpt-30'} is kept",
    )
    assert _listing(export_dir) == ["best", "filler"] and _temporary(model_dir) == []
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest == str(model_dir / "model.ckpt-30")
    assert int(tf.train.load_checkpoint(latest).get_tensor("global_step")) == 30

    os.remove(filler)
    rerun = run_cli(*command)  # nothing to train: evaluates and exports step 30
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout)
    assert result["global_step"] == 30 and 0 < result["accuracy"] <= 1, result
    versions = [name for name in os.listdir(export_dir / "best") if name.isdigit()]
    assert len(versions) == 1, _listing(export_dir)
    exported = tf.saved_model.load(str(export_dir / "best" / versions[0]))
    assert "serving_default" in exported.signatures


def _case_evaluate(data_dir, model_dir):
    """Evaluation with no page left beside the model: its summaries fail first, no CSV.

    Then, beside a complete confusion CSV, room for the summaries but not the new CSV: the
    earlier CSV stays whole.
    """
    import tensorflow as tf
    from cli_helpers import run_cli

    import jobs

    command = ["--mode=evaluate", "--model=cnn", f"--data_dir={data_dir}", *_SMALL_CNN]
    command += [f"--model_dir={model_dir}", "--limit=500"]
    latest = tf.train.latest_checkpoint(str(model_dir))
    filler = _fill(model_dir, 0)
    run = run_cli(*command)
    _assert_disk_full(run, model_dir, f"the checkpoint {latest} is untouched")
    assert _temporary(model_dir) == []
    assert not tf.io.gfile.glob(f"{model_dir}/eval_test/*.csv")
    assert tf.train.latest_checkpoint(str(model_dir)) == latest

    os.remove(filler)
    # A new process starts a new events file; this one would append to its cached writer's.
    tf.compat.v1.summary.FileWriterCache.clear()
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    csv_path = json.loads(rerun.stdout)["confusion_matrix"]
    _, matrix = jobs.read_confusion_matrix(csv_path)
    assert matrix.shape == (10, 10) and matrix.sum() == 500

    # Room for another events file like the rerun's, not for the CSV beside it.
    events = max(tf.io.gfile.glob(f"{model_dir}/eval_test/events.*"), key=os.path.getmtime)
    # TensorFlow names an events file by the second its writer opened it (and the host, no
    # pid): a writer opened within the rerun's second would truncate the rerun's file, freeing
    # its pages for the CSV (the case then failed about one run in four).
    while time.time() < int(os.path.basename(events).split(".")[3]) + 1:
        time.sleep(0.05)
    tf.compat.v1.summary.FileWriterCache.clear()
    earlier = open(csv_path, "rb").read()
    filler = _fill(model_dir, os.path.getsize(events))
    run = run_cli(*command)
    _assert_disk_full(
        run,
        csv_path,
        f"the checkpoint {latest} is untouched, the earlier {os.path.basename(csv_path)} is whole",
    )
    assert open(csv_path, "rb").read() == earlier and _temporary(model_dir) == []
    os.remove(filler)


def _case_export(root, data_dir, model_dir):
    """An export beside an earlier one: the SavedModel, then the .keras file, do not fit."""
    import numpy as np
    import tensorflow as tf
    from cli_helpers import run_cli

    from keras_models import keras3

    export_dir = root / "exports"
    keras_file = export_dir / "cnn.keras"
    _mount(export_dir, 64 << 20)
    command = ["--mode=export", "--model=cnn", f"--data_dir={data_dir}", *_SMALL_CNN]
    command += [f"--model_dir={model_dir}", f"--export_dir={export_dir}"]
    command += [f"--keras_output={keras_file}"]
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = json.loads(first.stdout)["saved_model"]
    saved_model, keras_size = _size(earlier), os.path.getsize(keras_file)
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)

    def serves(path):
        signature = tf.saved_model.load(path).signatures["serving_default"]
        outputs = signature(image=tf.constant(images))
        return outputs["probabilities"].numpy()

    expected = serves(earlier)
    earlier_kept = f"the earlier export {os.path.basename(earlier)} in {export_dir} is untouched"
    onnx_size = os.path.getsize(os.path.join(earlier, "model.onnx"))
    without_onnx = _footprint(earlier) - _pages(onnx_size) * PAGE
    for leave, path, needle in [
        (saved_model // 2, f"{export_dir}:", earlier_kept),  # the SavedModel does not fit
        (without_onnx + onnx_size // 2, f"{export_dir}/", "/model.onnx: the disk is full"),
        (saved_model + 2 * PAGE + keras_size // 2, keras_file, "is complete"),  # the .keras file
    ]:
        filler = _fill(export_dir, leave)
        run = run_cli(*command)
        _assert_disk_full(run, path, needle)
        assert _temporary(export_dir) == [], path
        if "model.onnx" in needle:  # a version is all or nothing: the SavedModel went too
            assert earlier_kept in run.stderr, run.stderr
            assert sorted(name for name in os.listdir(export_dir) if name.isdigit()) == [
                os.path.basename(earlier)
            ]
        np.testing.assert_allclose(serves(earlier), expected, rtol=1e-6)
        keras3.load_model(str(keras_file))  # the earlier .keras file is whole
        os.remove(filler)
    # The SavedModel the second failed run wrote before the .keras file is whole and serves.
    versions = sorted(name for name in os.listdir(export_dir) if name.isdigit())
    assert len(versions) == 2 and f"{export_dir / versions[-1]} is complete" in run.stderr
    np.testing.assert_allclose(serves(str(export_dir / versions[-1])), expected, rtol=1e-5)

    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    np.testing.assert_allclose(serves(json.loads(rerun.stdout)["saved_model"]), expected, 1e-5)
    reloaded = keras3.load_model(str(keras_file))
    assert reloaded.name == "cnn"


def _case_predict(root, data_dir, model_dir):
    """Predictions with no room for the CSV, then room for the CSV but not the plots.

    Then predictions of new image files (``--inputs``) with no room for their CSV.
    """
    from cli_helpers import run_cli

    output_dir = root / "predictions"
    _mount(output_dir, 1 << 20)
    command = ["--mode=predict", "--model=cnn", f"--data_dir={data_dir}", *_SMALL_CNN]
    command += [f"--model_dir={model_dir}", f"--output_dir={output_dir}", "--limit=500"]
    command += ["--plot"]
    csv_path = output_dir / "predictions-test.csv"
    filler = _fill(output_dir, 0)
    run = run_cli(*command)
    _assert_disk_full(run, csv_path, f"no new {csv_path.name} was written")
    assert _listing(output_dir) == ["filler"]
    os.remove(filler)

    filler = _fill(output_dir, 40 * 1000 + PAGE)  # 500 rows of about 35 bytes fit, a plot not
    run = run_cli(*command)
    _assert_disk_full(run, output_dir / "samples-test.png", f"{csv_path} is complete")
    assert _listing(output_dir) == ["filler", csv_path.name]
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 501 and rows[-1].startswith("499,")
    os.remove(filler)

    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _listing(output_dir) == ["conv1-test.png", csv_path.name, "samples-test.png"]
    assert len(csv_path.read_text().splitlines()) == 501

    # New image files (--inputs) write predictions.csv through their own temporary file.
    import numpy as np
    import tensorflow as tf

    images = root / "new_images"
    os.makedirs(images)
    for index in range(3):
        png = tf.io.encode_png(np.full((28, 28, 1), 60 * index, np.uint8))
        tf.io.write_file(str(images / f"{index}.png"), png)
    command = [*command[:-1], f"--inputs={images}"]  # without --plot
    before = _listing(output_dir)
    filler = _fill(output_dir, 0)
    run = run_cli(*command)
    _assert_disk_full(run, output_dir / "predictions.csv", "no new predictions.csv was written")
    assert _listing(output_dir) == sorted([*before, "filler"])
    os.remove(filler)
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len((output_dir / "predictions.csv").read_text().splitlines()) == 4


def _run_cases(root, data_dir, npz):
    """Runs every case; returns ``{case: None or the failure's traceback}``."""
    import pathlib

    root, data_dir = pathlib.Path(root), pathlib.Path(data_dir)
    results = {}

    def case(name, function, *args):
        start = time.perf_counter()
        try:
            value = function(*args)
            results[name] = None
            return value
        except Exception:
            results[name] = traceback.format_exc()
            return None
        finally:
            print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)

    case("prepare", _case_prepare, root, npz)
    case("prepare_beam", _case_prepare_beam, root, npz)
    model_dir = case("train", _case_train, root, data_dir)
    for name, function in [
        ("train_and_evaluate", _case_train_and_evaluate),
        ("evaluate", _case_evaluate),
        ("export", _case_export),
        ("predict", _case_predict),
    ]:
        if model_dir is None:
            results[name] = "not run: the train case, which makes its model, failed"
        elif name == "evaluate":
            case(name, function, data_dir, model_dir)
        elif name == "train_and_evaluate":
            case(name, function, root, data_dir)
        else:
            case(name, function, root, data_dir, model_dir)
    return results


if __name__ == "__main__":  # the namespaced process: python test_faults_disk.py ROOT DATA NPZ
    import tfenv

    tfenv.silence_python_logging()
    print(json.dumps(_run_cases(*sys.argv[1:4])))


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_disk_cases(mnist_data_dir, mnist_small_npz, tmp_path_factory):
    """Runs every case in one process in a private mount namespace; ``{case: failure}``."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("needs unshare --mount (root or CAP_SYS_ADMIN) to mount a small tmpfs")
    root = tmp_path_factory.mktemp("full_disk")
    # This file run as a script, in a child of cli_helpers' main.py fork server (main.py's
    # imports done) put in a private mount namespace first.
    run = run_forked(
        pathlib.Path(__file__).read_text(),
        *(str(path) for path in (root, mnist_data_dir, mnist_small_npz)),
        filename=__file__,
        timeout=600,
        pythonpath=[os.path.join(REPO, "tests")],
        namespace=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "job",
    ["prepare", "prepare_beam", "train", "train_and_evaluate", "evaluate", "export", "predict"],
)
def test_full_disk(job, full_disk_cases):
    """One job on a full disk: one line, exit 75, nothing lost; the same command then finishes."""
    failure = full_disk_cases[job]
    if failure is not None:
        pytest.fail(f"{job} on a full disk:\n{failure}", pytrace=False)


def _raised(function):
    try:
        function()
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def _write_tfrecord(path):
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        writer.write(b"x" * 100_000)


def _write_text(path):
    with open(path, "w") as handle:  # the error comes at close, without a file name
        handle.write("x")


def test_each_writers_full_disk_error_is_recognised():
    """Real ENOSPC errors (``/dev/full``) and the other writers' forms; other errors are not."""
    import errno

    import tensorflow as tf

    from data_pipeline import DiskFullError, disk_full_error

    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is missing: it gives ENOSPC on every write (Linux)")
    h5py_text = (
        "Unable to synchronously write data (file write failed: time = Sat Dec  6 04:00:00 2026, "
        "filename = '/m/cnn.h5', file descriptor = 5, errno = 28, error message = 'No space "
        "left on device', buf = 0x55, total write size = 8, bytes this sub-write = 8)"
    )
    # Beam re-raises a worker's error as another exception, its cause (or text) the original.
    beam = RuntimeError("Pipeline failed in stage WriteShards")
    beam.__cause__ = _raised(lambda: _write_tfrecord("/dev/full"))
    cases = [
        (_raised(lambda: _write_tfrecord("/dev/full")), "/dev/full", "no space left on device"),
        (_raised(lambda: _write_text("/dev/full")), "/fallback", "no space left on device"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/f.csv.tmp"), "/q/f.csv", "quota"),
        (OSError(h5py_text), "/m/cnn.h5", "no space left on device"),
        (beam, "/dev/full", "no space left on device"),
        (  # a Beam worker's traceback as text: TensorFlow's form, a worker's temporary name
            RuntimeError(
                "Traceback ...\nResourceExhaustedError: /d/.tmp-7cc5cb756d774fa0-train-00002-of"
                "-00006.tfrecord; No space left on device [while running 'SortAndWriteShard']"
            ),
            "/d/train-00002-of-00006.tfrecord",
            "no space left on device",
        ),
        (  # ... and Python's OSError form
            RuntimeError("OSError: [Errno 28] No space left on device: '/d/.tmp-12-a.json'"),
            "/d/a.json",
            "no space left on device",
        ),
        (
            tf.errors.UnknownError(
                None,
                None,
                "/m/model.ckpt-20_temp/part-00000-of-00001.data-"
                "00000-of-00001.tempstate123; No space left on device",
            ),
            "/m/model.ckpt-20",
            "no space left on device",
        ),
    ]
    for error, path, reason in cases:
        full = disk_full_error(error, "/fallback")
        assert isinstance(full, DiskFullError), error
        assert (full.path, full.exit_code) == (path, EXIT_DISK_FULL) and reason in full.reason
        assert "\n" not in str(full) and "rerun the same command" in str(full)
    out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    for error in (out_of_memory, OSError(errno.EACCES, "Permission denied"), ValueError("x")):
        assert disk_full_error(error) is None
