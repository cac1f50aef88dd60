"""What every job checks before it builds or writes anything, and the trainer's model-dir lock.

* :func:`check_paths`: every folder a job writes can be created and written, every folder it
  reads is a folder: one ``UsageError`` line instead of a TensorFlow traceback later.
* :func:`warn_if_bf16_is_emulated`: ``mixed_bfloat16`` on devices without bf16 arithmetic runs,
  but about 10x slower than float32; one line says so before anything is built.
* :func:`trainer_lock`: one training process per model dir.

TensorFlow is imported only where a check needs it, so nothing here costs start-up time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import socket
import sys
import time
from typing import Iterator, List, Optional, Sequence, Set, Tuple

from estimator_bridge import Config, UsageError

# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def check_paths(config: Config, mode: str) -> None:
    """Raises ``UsageError`` for a path ``mode`` would fail on.

    That is a file where a folder belongs, a folder under a file, a folder that cannot be
    written. Nothing is created: a folder that does not exist yet only needs a writable nearest
    existing parent (``os.access``, which also reports a read-only file system, even to root).
    """
    check_input_dir(config.data_dir, "--data_dir")
    if mode in ("train", "train_and_evaluate", "evaluate"):  # checkpoints; eval_<split>/ files
        check_output_dir(config.model_dir, "--model_dir")
    elif config.checkpoint_path is None:
        check_input_dir(config.model_dir, "--model_dir")
    if mode == "predict":
        check_output_dir(config.output_dir, "--output_dir")
    if mode == "export":
        check_output_dir(config.export_dir, "--export_dir")
        if config.keras_output:
            if os.path.isdir(config.keras_output):
                raise UsageError(
                    f"--keras_output={config.keras_output} is a folder; name a file such as "
                    f"{os.path.join(config.keras_output, config.model + '.keras')}"
                )
            if getattr(config, "keras_format", "tf_keras") == "keras3" and not (
                config.keras_output.endswith((".keras", ".h5"))
            ):
                raise UsageError(
                    f"--keras_output={config.keras_output}: a Keras 3 file is .keras (or .h5); "
                    "name it so, or pass --keras_format=tf_keras"
                )
            parent = os.path.dirname(config.keras_output) or "."
            check_output_dir(parent, "--keras_output", config.keras_output)


def check_input_dir(path: str, flag: str) -> None:
    """A folder that is read must not be a file (a missing one is the reader's to report)."""
    if _is_url(path):
        return
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(_in_the_way(path, flag, existing, path, "read"))


def check_output_dir(path: str, flag: str, value: Optional[str] = None) -> None:
    """A folder that is written: a folder, or creatable, and writable.

    Args:
        path: The folder.
        flag: The flag that names it, for the message.
        value: The flag's value, when it is not the folder itself (a file in it).
    """
    value = value or path
    if _is_url(path):
        return
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(_in_the_way(path, flag, existing, value, "written"))
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == os.path.abspath(value) else f" (in {existing})"
        raise UsageError(
            f"{flag}={value} cannot be written{where}: no write permission or a read-only file "
            "system; pass a writable path"
        )


def _is_url(path: str) -> bool:
    """``gs://``, ``s3://``, ... paths go through TensorFlow's file systems: not checked here."""
    return "://" in str(path)


def _nearest_existing(path: str) -> str:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def _in_the_way(path: str, flag: str, file: str, value: str, action: str) -> str:
    if file == os.path.abspath(value):
        return f"{flag}={value} is a file, not a folder; pass a folder"
    return f"{flag}={value} cannot be {action}: {file} is a file, not a folder; pass another path"


# --------------------------------------------------------------------------------------------
# bf16 arithmetic
# --------------------------------------------------------------------------------------------

# x86 CPU flags (/proc/cpuinfo) with bf16 arithmetic; on aarch64 the feature is "bf16".
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Measured on VM B (AMD EPYC, AVX2, no bf16) with bench_throughput.py, cnn, batch 128, 2 rounds
# of 60 steps per precision (README, "Mixed precision"); quoted by the warning.
EMULATED_BF16 = (
    "12x slower than float32 on a CPU without bf16 (cnn, batch 128: 83 against 998 examples/s)"
)
_warned = False


def bf16_support() -> Tuple[Optional[bool], str]:
    """Whether the devices that will run the graph have bf16 arithmetic, and why.

    GPUs run the graph when TensorFlow sees one: bf16 needs compute capability 8.0 (Ampere) or
    higher. Otherwise the CPU: Linux x86 needs ``avx512_bf16`` or ``amx_bf16``, aarch64 ``bf16``.

    Returns:
        ``(True, what gives it)``, ``(False, what is missing)``, or ``(None, "")`` where it cannot
        be told (another OS), so neither the warning nor ``auto`` guesses.
    """
    capabilities = gpu_compute_capabilities()
    if capabilities:
        old = [f"GPU {i} is {c[0]}.{c[1]}" for i, c in enumerate(capabilities) if c < (8, 0)]
        if old:
            return False, f"bf16 needs a GPU of compute capability 8.0 or higher; {', '.join(old)}"
        return True, f"GPU compute capability {', '.join(f'{c[0]}.{c[1]}' for c in capabilities)}"
    flags = cpu_flags()
    if flags is None:
        return None, ""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        found = [flag for flag in X86_BF16_FLAGS if flag in flags]
        if found:
            return True, f"this CPU has {' and '.join(found)}"
        return False, f"this CPU has no {' or '.join(X86_BF16_FLAGS)}"
    if machine in ("aarch64", "arm64"):
        if "bf16" in flags:
            return True, "this CPU has bf16"
        return False, "this CPU has no bf16 feature"
    return None, ""


def missing_bf16_arithmetic() -> Optional[str]:
    """What the devices that will run the graph lack for bf16 arithmetic, or None.

    None also where it cannot be told (see :func:`bf16_support`).
    """
    has, why = bf16_support()
    return why if has is False else None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[Set[str]]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``flags``/``Features``), None elsewhere."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def gpu_compute_capabilities() -> List[Tuple[int, int]]:
    """Compute capability of every GPU TensorFlow sees (none on a CPU-only machine).

    Listing physical devices does not initialise TensorFlow's runtime, so a multi-worker
    strategy can still be built afterwards.
    """
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def choose_precision(requested: str) -> Tuple[str, str]:
    """Resolves ``--precision`` to a concrete one, with the reason (for the run's first line).

    ``auto`` is ``mixed_bfloat16`` where the devices have bf16 arithmetic (see
    :func:`bf16_support`), ``float32`` elsewhere or where it cannot be told; any
    other value is returned as it is. Called once, when the run's config is built, so the
    model_fn, checkpoints and exports only ever see a concrete precision.

    Returns:
        ``(precision, reason)``, e.g. ``("mixed_bfloat16", "auto: this CPU has avx512_bf16")``;
        the reason is ``""`` for a precision asked for by name.
    """
    if requested != "auto":
        return requested, ""  # asked for by name: nothing to explain
    has, why = bf16_support()
    if has:
        return "mixed_bfloat16", f"auto: {why}"
    return "float32", f"auto: {why or 'bf16 arithmetic could not be detected here'}"


def warn_if_bf16_is_emulated(precision: str, stream=None) -> Optional[str]:
    """Prints one line (once per process) when ``mixed_bfloat16`` will run emulated.

    The run goes on: the results are right, only slow.

    Returns:
        The line, or None when nothing was printed.
    """
    global _warned
    if precision != "mixed_bfloat16" or _warned:
        return None
    missing = missing_bf16_arithmetic()
    if missing is None:
        return None
    _warned = True
    line = (
        f"warning: --precision=mixed_bfloat16 without bf16 arithmetic ({missing}): it runs "
        f"emulated, measured {EMULATED_BF16}; use --precision=float32"
    )
    print(line, file=stream or sys.stderr, flush=True)
    return line


# --------------------------------------------------------------------------------------------
# One trainer per model dir
# --------------------------------------------------------------------------------------------

LOCK_NAME = ".trainer.lock"
_LOCKING_TASKS = (None, "chief", "master")


@contextlib.contextmanager
def trainer_lock(model_dir: str, task: Optional[dict] = None) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``MODEL_DIR/.trainer.lock`` while training.

    A second trainer on the same model dir raises ``UsageError`` naming the holder (pid, host,
    since when) before it writes anything (it only opens the existing lock file). The kernel
    drops a ``flock`` when its process dies, however it dies, so a lock left by a killed run
    never blocks the next one; the file stays (deleting it would let two processes lock two
    different files). Of a ``TF_CONFIG`` cluster, which shares one model dir, only the task that
    writes checkpoints takes the lock (the chief, or worker 0 of a cluster without one).

    ``flock`` holds between processes of one host; on shared storage, whether it holds across
    hosts depends on the file system (NFSv4 and Lustre, for instance, forward it). A model dir
    given as a URL (``gs://...``) is not locked.

    Args:
        model_dir: The model dir; created if missing.
        task: ``distribution.current_task()`` (read from ``TF_CONFIG`` when omitted).
    """
    if task is None:
        import distribution

        task = distribution.current_task()
    if _is_url(model_dir) or not _writes_checkpoints(task):
        yield
        return
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # e.g. a lock file of another user
        raise UsageError(
            f"cannot open {path} ({error.strerror}); check it or pass another --model_dir"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UsageError(
                f"{model_dir} is being trained by {_holder(fd)}; wait for it to finish or stop "
                "it, or pass another --model_dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _writes_checkpoints(task: dict) -> bool:
    if task["type"] in _LOCKING_TASKS:
        return True
    cluster: Sequence = task.get("cluster") or {}
    no_chief = not any(name in cluster for name in ("chief", "master"))
    return task["type"] == "worker" and task["index"] == 0 and no_chief


def _holder(fd: int) -> str:
    """``process 123 on HOST since ...`` from the lock file.

    The holder writes it just after locking, so an empty file is retried for a moment.
    """
    for _ in range(20):
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            holder = None
        if isinstance(holder, dict):
            pid, host, since = (holder.get(key) for key in ("pid", "host", "since"))
            return f"process {pid} on {host} since {since}"
        time.sleep(0.05)
    return "another process"
