"""Shared plumbing for the bench/ scripts: paths, machine info, data, timing and reporting.

Every script does, before anything imports TensorFlow::

    import benchlib  # puts the repo root on sys.path, imports tfenv, silences TF logging

``benchlib`` itself imports TensorFlow only after :mod:`tfenv`, so the process-wide settings in
``tfenv`` (log levels, ``TF_USE_LEGACY_KERAS``) are in place first.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

DEFAULT_WORK_DIR = os.path.join(REPO, "build", "bench")


# --------------------------------------------------------------------------------------------
# Command line and reporting
# --------------------------------------------------------------------------------------------


def csv_list(text: str) -> List[str]:
    """``"cnn, rnn"`` -> ``["cnn", "rnn"]`` (argparse ``type=``)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> List[int]:
    """``"128,512"`` -> ``[128, 512]`` (argparse ``type=``)."""
    return [int(item) for item in csv_list(text)]


def command_line(script: str, args: Any, order: Sequence[str]) -> str:
    """The exact command that reproduces this run, with every flag spelled out.

    Args:
        script: The script's ``__file__``.
        args: The parsed argparse namespace.
        order: Flag names, in the order to print them.

    Returns:
        ``cd <repo> && .venv/bin/python bench/<script> --flag=value ...``; flags whose value is
        None, False or empty are left out, True booleans are printed bare, lists comma-joined,
        dicts as JSON.
    """
    parts = [os.path.relpath(sys.executable, REPO), os.path.relpath(os.path.abspath(script), REPO)]
    for name in order:
        value = getattr(args, name)
        if value is None or value is False or value == {}:
            continue
        if value is True:
            parts.append(f"--{name}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        parts.append(f"--{name}={value}")
    return f"cd {shlex.quote(REPO)} && " + " ".join(shlex.quote(p) for p in parts)


def machine_info() -> Dict[str, Any]:
    """CPU model, core counts, load, library versions and the date, for the report."""
    cpu = platform.processor() or platform.machine()
    flags: List[str] = []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu = value.strip()
                elif key == "cpu MHz" and "MHz" not in cpu:
                    cpu = f"{cpu} @ {float(value):.0f} MHz"
                elif key == "flags":
                    flags = value.split()
                    break
    except (OSError, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    import numpy as np

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu": cpu,
        # The vector/matrix extensions that decide float32 vs bfloat16 speed on CPU.
        "cpu_flags": [
            f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags
        ],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tensorflow_estimator": version("tensorflow-estimator"),
        "tf_keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_header(title: str, command: str, info: Mapping[str, Any]) -> None:
    """Prints what is being measured, the reproducing command and the machine."""
    print(f"== {title}")
    print(f"command: {command}")
    print(
        f"machine: {info['cpu']}; {info['usable_cpus']} usable of {info['logical_cpus']} logical "
        f"CPUs ({' '.join(info['cpu_flags']) or 'no AVX2'}); load average "
        f"{info['load_average_1_5_15']}"
    )
    print(
        f"software: Python {info['python']}, TensorFlow {info['tensorflow']}, "
        f"tensorflow-estimator {info['tensorflow_estimator']}, tf_keras {info['tf_keras']}, "
        f"numpy {info['numpy']}; {info['platform']}"
    )
    print(f"date: {info['date_utc']}")
    busy = info["load_average_1_5_15"][0]
    if busy > 0.5 * (info["usable_cpus"] or 1):
        print(
            f"WARNING: 1-minute load average {busy} on {info['usable_cpus']} CPUs: other work "
            "is running, timings will be low and noisy"
        )
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt(row))
    sys.stdout.flush()


def write_json(path: Optional[str], payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (atomically); no-op for None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def finish_runs(
    benchmark: str,
    command: str,
    info: Mapping[str, Any],
    elapsed: float,
    runs: Sequence[Mapping[str, Any]],
    json_out: Optional[str],
    **payload: Any,
) -> int:
    """Prints the footer of a multi-run benchmark, writes its JSON and returns the exit code.

    Args:
        benchmark: Name stored in the JSON.
        command: The reproducing command line.
        info: ``machine_info()`` from the start of the benchmark.
        elapsed: Seconds the runs took.
        runs: One record per run, stored last; a record with an ``error`` key counts as failed.
        json_out: Where to write the JSON (None: nowhere).
        **payload: Further JSON fields (settings, summary, ...), after the common ones.

    Returns:
        1 if any run failed, else 0.
    """
    load_at_end = machine_info()["load_average_1_5_15"]
    print(f"total {elapsed:.0f}s; load average at the end {load_at_end}")
    print(f"command: {command}")
    errors = [r for r in runs if r.get("error")]
    if errors:
        print(f"{len(errors)} run(s) failed; see the lines above")
    write_json(
        json_out,
        {
            "benchmark": benchmark,
            "command": command,
            "machine": info,
            "load_average_at_end": load_at_end,
            "seconds": round(elapsed, 1),
            **payload,
            "runs": list(runs),
        },
    )
    return 1 if errors else 0


def fmt_rate(value) -> str:
    """A rate with thousands separators, ``-`` when missing or NaN."""
    return "-" if value is None or value != value else f"{value:,.0f}"


def fmt_ratio(a, b) -> str:
    """``a / b`` as ``1.23x``, ``-`` when either is missing, NaN or ``b`` is 0."""
    if a is None or b is None or a != a or b != b or not b:
        return "-"
    return f"{a / b:.2f}x"


def median(values: Sequence[float]) -> float:
    """Median, or NaN for an empty sequence."""
    return statistics.median(values) if values else float("nan")


def log(message: str) -> None:
    """Progress line on stderr (stdout stays the report)."""
    print(message, file=sys.stderr, flush=True)


def run_peak_rss(args: Sequence[str], cwd: str = REPO) -> Dict[str, Any]:
    """Runs a command; returns its exit code, stderr, seconds and peak resident memory (MiB).

    The peak is the child's ``VmHWM`` (high-water mark of its own address space since exec),
    polled every 50 ms; the last value read holds every earlier peak. ``ru_maxrss`` would not
    do: the kernel carries the parent's high-water mark into a forked child across exec.
    """
    import subprocess
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": REPO},
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        peak_kib = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peak_kib = max(peak_kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass  # Exiting: the values read so far stand.
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    return {
        "returncode": proc.returncode,
        "stderr": stderr,
        "seconds": seconds,
        "peak_mib": peak_kib / 1024,
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def default_source_dir() -> Optional[str]:
    """``$MNIST_DIR`` or None (then ``data_pipeline.load_source`` applies its own fallbacks)."""
    return os.environ.get("MNIST_DIR") or None


def ensure_project_data(work_dir: str, source_dir: Optional[str]) -> str:
    """Prepares the project's TFRecord shards under ``work_dir/data`` (reused when complete).

    Returns:
        The data_dir to pass to the project's pipeline.
    """
    import data_pipeline

    data_dir = os.path.join(work_dir, "data")
    started = time.perf_counter()
    try:
        spec = data_pipeline.prepare(data_dir, source_dir=source_dir, progress=False)
    except data_pipeline.DataError as error:  # one line, as the project's CLI prints it
        raise SystemExit(f"error: {error}") from None
    log(
        f"project data: {data_dir} (train {spec.num_records('train')}, test "
        f"{spec.num_records('test')} records; {time.perf_counter() - started:.1f}s)"
    )
    return data_dir


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class StepTimerHook(tf.estimator.SessionRunHook):
    """Times Estimator training steps after the first ``warmup_steps``.

    The clock starts when the ``warmup_steps``-th step returns (``clock_start``, a
    ``time.perf_counter()`` value) and stops in ``end()``. Worker hooks end before the chief's
    ``CheckpointSaverHook``, so the final checkpoint is outside the window.
    """

    def __init__(self, batch_size: int, warmup_steps: int = 1):
        self.batch_size = batch_size
        self.warmup_steps = max(1, warmup_steps)
        self.steps = 0
        self.timed_steps = 0
        self.seconds = 0.0
        self.examples_per_sec = 0.0
        self.clock_start = None

    def after_create_session(self, session, coord):
        self.steps = 0
        self.clock_start = None

    def after_run(self, run_context, run_values):
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.clock_start = time.perf_counter()

    def end(self, session):
        if self.clock_start is None:
            return
        self.seconds = time.perf_counter() - self.clock_start
        self.timed_steps = self.steps - self.warmup_steps
        if self.timed_steps > 0 and self.seconds > 0:
            self.examples_per_sec = self.timed_steps * self.batch_size / self.seconds


class KerasStepTimer(keras.callbacks.Callback):
    """Times ``model.fit`` batches after the first ``warmup_steps`` (tracing, first batch).

    ``clock_start`` is the ``time.perf_counter()`` value at which the clock started.
    """

    def __init__(self, batch_size: int, warmup_steps: int = 1):
        super().__init__()
        self.batch_size = batch_size
        self.warmup_steps = max(1, warmup_steps)
        self.steps = 0
        self.timed_steps = 0
        self.seconds = 0.0
        self.examples_per_sec = 0.0
        self.clock_start = None
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        now = time.perf_counter()
        if self.steps == self.warmup_steps:
            self.clock_start = now
        self._last = now

    def on_train_end(self, logs=None):
        if self.clock_start is None:
            return
        self.seconds = self._last - self.clock_start
        self.timed_steps = self.steps - self.warmup_steps
        if self.timed_steps > 0 and self.seconds > 0:
            self.examples_per_sec = self.timed_steps * self.batch_size / self.seconds
