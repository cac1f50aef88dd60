"""Where the training time goes: the Estimator bridge against variants that each change one thing.

Reproduces the diagnostic figures of the README's "Where the time went" list. For one network and
batch size, every variant trains from scratch for ``--steps`` steps, each run in a fresh process,
in alternating rounds whose variant order rotates, and is timed like ``bench_throughput.py``'s
bridge contender (the first ``--warmup_steps`` steps excluded, no checkpoint inside the window):

* ``baseline``: ``jobs.train`` with the Config of ``bench_throughput``'s bridge;
* ``const_input``: the bridge's Estimator (``estimator_bridge.make_estimator``) fed one real batch,
  read once through the project's pipeline, repeated from memory: the input pipeline's share;
* ``threads_1x1``, ``threads_1x2``, ``threads_2x2``: Config ``intra_op_threads``/
  ``inter_op_threads`` 1/1, 1/2, 2/2;
* ``xla_autojit``: ``TF_XLA_FLAGS=--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit``;
* ``onednn_off``: ``TF_ENABLE_ONEDNN_OPTS=0``;
* ``generic_gru``: ``estimator_bridge._use_fused_recurrent_kernels`` patched out, so the Keras
  GRUs run their generic per-step cell (networks with recurrent layers only);
* ``dynamic_batch``: the training pipeline built with ``drop_remainder=False``, so the batch
  dimension is unknown to the graph (as the bridge had it before);
* ``seeded``: Config ``seed=0``, the price of a reproducible run (the baseline is unseeded);
* ``tfdata_1thread``: the training pipeline on a private tf.data pool of one thread;
* ``tfdata_no_autotune``: the training pipeline with tf.data's autotuning off;
* ``estimator_floor``: an Estimator over one scalar variable on the same input pipeline, batch,
  RunConfig and hooks: the per-step cost of the Estimator machinery plus the input alone.

Prints one line per run, then the median examples/s and ms/step of every variant, its ratio to
``baseline`` and what it changes; for ``baseline`` also the start-up (seconds from the call to
the session, then to the first timed step) and the first three steps, of which the second is slow
because its fetches differ from the first's (TensorFlow prunes and optimises the graph anew).
``--op_profile`` then traces one step (the first timed one) of an extra baseline run (or of each
variant listed, ``--op_profile=baseline,onednn_off``) with ``RunOptions(trace_level=FULL_TRACE)``
and prints the op types that took the most kernel time, which shows whether oneDNN (``_Mkl*``)
kernels run.

Quick check::

    .venv/bin/python bench/diagnose_step.py --model=rnn --steps=15 --warmup_steps=3 --rounds=1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import bench_throughput  # noqa: E402
import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import data_pipeline  # noqa: E402
import estimator_bridge  # noqa: E402
import jobs  # noqa: E402
import keras_models  # noqa: E402

FIRST_STEPS = 3  # start-up steps timed one by one
TOP_OPS = 12  # op types listed by --op_profile
# Ops that run a function body; the trace lists the body's kernels separately.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall", "While", "If", "Case"})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the training step.

    Attributes:
        name: The ``--variants`` name.
        changes: What differs from ``baseline``, for the table.
        config: ``estimator_bridge.Config`` fields to override.
        env: Environment variables the run's process starts with.
        recurrent_only: Only for networks with GRU/LSTM layers.
    """

    name: str
    changes: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    recurrent_only: bool = False


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline", "jobs.train, as bench_throughput's bridge"),
        Variant("const_input", "one constant in-memory batch, repeated, instead of the TFRecords"),
        Variant(
            "threads_1x1",
            "intra_op_threads=1, inter_op_threads=1",
            config={"intra_op_threads": 1, "inter_op_threads": 1},
        ),
        Variant(
            "threads_1x2",
            "intra_op_threads=1, inter_op_threads=2 (independent ops side by side, one core each)",
            config={"intra_op_threads": 1, "inter_op_threads": 2},
        ),
        Variant(
            "threads_2x2",
            "intra_op_threads=2, inter_op_threads=2",
            config={"intra_op_threads": 2, "inter_op_threads": 2},
        ),
        Variant(
            "xla_autojit",
            "TF_XLA_FLAGS=--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit",
            env={"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"},
        ),
        Variant("onednn_off", "TF_ENABLE_ONEDNN_OPTS=0", env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
        Variant(
            "generic_gru",
            "GRUs run the generic per-step cell (fused-kernel fix patched out)",
            recurrent_only=True,
        ),
        Variant("dynamic_batch", "training batches without a static batch dimension"),
        Variant(
            "seeded",
            "--seed=0: seeded initialisers, step-keyed dropout, tf.data in a fixed order",
            config={"seed": 0},
        ),
        Variant("tfdata_1thread", "tf.data on a private pool of one thread"),
        Variant("tfdata_no_autotune", "tf.data autotuning off (fixed parallelism and buffers)"),
        Variant(
            "estimator_floor",
            "one-variable model_fn, same input, RunConfig and hooks",
        ),
    )
}
FLAG_ORDER = (
    "model",
    "batch_size",
    "steps",
    "warmup_steps",
    "rounds",
    "variants",
    "op_profile",
    "work_dir",
    "source_dir",
    "json_out",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="rnn", choices=keras_models.MODEL_NAMES)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80, help="Training steps per run.")
    parser.add_argument(
        "--warmup_steps",
        type=int,
        default=10,
        help="Steps excluded from the timing at the start of every run.",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Rounds; the median is reported.")
    parser.add_argument(
        "--variants",
        type=benchlib.csv_list,
        default=list(VARIANTS),
        help=f"Comma-separated subset of {','.join(VARIANTS)} (default: all).",
    )
    parser.add_argument(
        "--op_profile",
        type=benchlib.csv_list,
        nargs="?",
        const=["baseline"],
        default=None,
        metavar="VARIANTS",
        help="After the rounds, trace the first timed step of one more run of each of these "
        "variants (bare flag: baseline) and print the op types that took the most time.",
    )
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None, help="Write results as JSON here.")
    args = parser.parse_args(argv)
    for flag in ("variants", "op_profile"):
        chosen = getattr(args, flag)
        unknown = sorted(set(chosen or ()) - set(VARIANTS))
        if unknown or chosen == []:
            parser.error(f"bad --{flag} {chosen}; choose from {list(VARIANTS)}")
    if args.warmup_steps < 1 or args.steps <= max(args.warmup_steps, FIRST_STEPS - 1):
        parser.error(
            f"--warmup_steps must be at least 1 and less than --steps, which must be at least "
            f"{FIRST_STEPS}"
        )
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch_size must be positive")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class PhaseTimerHook(benchlib.StepTimerHook):
    """A ``StepTimerHook`` that also times the start-up: session creation and the first steps.

    Attributes:
        session_s: Seconds from ``called`` until the session was created (graph build, variable
            initialisation, step-0 checkpoint).
        first_steps_s: Wall seconds of each of the first ``FIRST_STEPS`` ``session.run`` calls.
    """

    def __init__(self, batch_size: int, warmup_steps: int, called: float):
        super().__init__(batch_size, warmup_steps)
        self.called = called
        self.session_s: Optional[float] = None
        self.first_steps_s: List[float] = []
        self._step_start = 0.0

    def after_create_session(self, session, coord):
        super().after_create_session(session, coord)
        self.session_s = time.perf_counter() - self.called
        self.first_steps_s = []

    def before_run(self, run_context):
        self._step_start = time.perf_counter()

    def after_run(self, run_context, run_values):
        if len(self.first_steps_s) < FIRST_STEPS:
            self.first_steps_s.append(time.perf_counter() - self._step_start)
        super().after_run(run_context, run_values)


class OpTraceHook(tf.estimator.SessionRunHook):
    """Traces one step (``FULL_TRACE``) and totals its kernel time by op type.

    Attributes:
        op_micros: ``{op type: (total microseconds, executions)}`` of the traced step.
    """

    def __init__(self, step: int):
        self.step = step
        self.op_micros: Dict[str, Tuple[int, int]] = {}
        self._steps = 0

    def before_run(self, run_context):
        if self._steps + 1 == self.step:
            options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
            return tf.estimator.SessionRunArgs(fetches=None, options=options)
        return None

    def after_run(self, run_context, run_values):
        self._steps += 1
        if self._steps == self.step:
            self.op_micros = op_time_by_type(run_values.run_metadata.step_stats)


def op_time_by_type(step_stats) -> Dict[str, Tuple[int, int]]:
    """``{op type: (summed all_end_rel_micros, executions)}`` over every device of a step.

    A kernel's ``timeline_label`` reads ``name = OpType(inputs)``; it names the kernel that ran
    after graph rewrites (``_MklNativeFusedMatMul`` rather than ``MatMul`` when oneDNN is on).
    """
    totals: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for device in step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op = label.split(" = ", 1)[1].split("(", 1)[0] if " = " in label else node.node_name
            totals[op][0] += node.all_end_rel_micros
            totals[op][1] += 1
    return {op: (micros, count) for op, (micros, count) in totals.items()}


# --------------------------------------------------------------------------------------------
# One run of each variant (in the child process)
# --------------------------------------------------------------------------------------------


def bridge_config(args, data_dir: str, model_dir: str, **overrides) -> estimator_bridge.Config:
    """``bench_throughput``'s bridge Config (float32) for this run, with ``overrides``."""
    return bench_throughput.bridge_config(
        data_dir, model_dir, args.model, args.batch_size, args.steps, **overrides
    )


def train_input_fn(config: estimator_bridge.Config) -> Callable[[], tf.data.Dataset]:
    """The training input_fn that ``jobs.train`` builds for ``config``."""
    return estimator_bridge.make_input_fn(config, "train", True)  # private, but the same one


def train_like_bridge(config, estimator, input_fn, hooks) -> None:
    """``estimator.train`` the way ``jobs.train`` calls it, from a fresh model_dir.

    The bridge's own progress and signal hooks run first, as there: the progress hook fetches
    the global step every step, which the comparison with ``baseline`` must include.
    """
    progress = jobs.ProgressHook(
        batch_size=config.batch_size,
        start_step=0,
        target_step=config.train_steps,
        every_n_steps=config.log_every_n_steps,
        progress_bar=config.progress,
    )
    bridge_hooks = [progress, jobs.StopOnSignalHook()]
    with data_pipeline.translate_errors(config.data_dir):
        estimator.train(input_fn, max_steps=config.train_steps, hooks=[*bridge_hooks, *hooks])


def _train_bridge(config, hooks, batch) -> None:
    jobs.train(config, hooks=hooks)


def _train_const_input(config, hooks, batch) -> None:
    # The pipeline's keys and dtypes; the batch dimension becomes static (the pipeline's is None).
    def input_fn():
        return tf.data.Dataset.from_tensors(batch).repeat()

    train_like_bridge(config, estimator_bridge.make_estimator(config), input_fn, hooks)


def _train_generic_gru(config, hooks, batch) -> None:
    # The bridge calls this after building each Keras model; without it the GRUs keep the
    # per-step cell that Keras picks in a TF1 graph.
    with mock.patch.object(estimator_bridge, "_use_fused_recurrent_kernels", lambda model: None):
        jobs.train(config, hooks=hooks)


def _train_patched_input(overrides: Mapping[str, Any] = (), options=None):
    """A trainer whose training pipeline gets ``make_dataset`` kwargs and/or tf.data options."""
    real = data_pipeline.reader.make_dataset

    def patched(*args, **kwargs):
        dataset = real(*args, **{**kwargs, **dict(overrides)})
        return dataset.with_options(options) if options is not None else dataset

    def trainer(config, hooks, batch) -> None:
        with mock.patch.object(data_pipeline.reader, "make_dataset", patched):
            jobs.train(config, hooks=hooks)

    return trainer


def _one_thread() -> tf.data.Options:
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    return options


def _no_autotune() -> tf.data.Options:
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def _floor_model_fn(features, labels, mode, params):
    """One scalar variable; the loss reads the images so that every step consumes a batch."""
    del labels, params  # the iterator yields the labels all the same
    weight = tf.compat.v1.get_variable("weight", [], initializer=tf.compat.v1.ones_initializer())
    loss = tf.square(weight) * tf.reduce_mean(features["image"])
    tf.compat.v1.add_to_collection(estimator_bridge.LOSS_COLLECTION, loss)  # for ProgressHook
    global_step = tf.compat.v1.train.get_or_create_global_step()
    train_op = tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(loss, global_step)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)


def _train_floor(config, hooks, batch) -> None:
    # The bridge's RunConfig (session config, checkpoint and summary settings) without its model.
    run_config = estimator_bridge.make_estimator(config).config
    estimator = tf.estimator.Estimator(_floor_model_fn, config=run_config)
    train_like_bridge(config, estimator, train_input_fn(config), hooks)


# ``trainer(config, hooks, batch)`` for the variants that do more than change the Config or the
# environment of jobs.train.
TRAINERS = {
    "const_input": _train_const_input,
    "generic_gru": _train_generic_gru,
    "estimator_floor": _train_floor,
    # The bridge's batches are all full either way; this only hides the static batch dimension.
    "dynamic_batch": _train_patched_input({"drop_remainder": False}),
    "tfdata_1thread": _train_patched_input(options=_one_thread()),
    "tfdata_no_autotune": _train_patched_input(options=_no_autotune()),
}


def run_one(args, data_dir: str, name: str, batch=None, trace: bool = False) -> Dict[str, Any]:
    """One timed run of variant ``name`` in this process -> result dict (or ``{"error": ...}``).

    Args:
        args: The parsed flags.
        data_dir: The prepared data.
        name: A ``VARIANTS`` key.
        batch: ``(features, labels)`` numpy arrays, for ``const_input``.
        trace: Also trace the first timed step (``op_micros`` in the result).
    """
    scratch = os.path.join(args.work_dir, "diagnose_runs")
    os.makedirs(scratch, exist_ok=True)
    model_dir = tempfile.mkdtemp(prefix=f"{name}-{args.model}-b{args.batch_size}-", dir=scratch)
    variant = VARIANTS[name]
    called = time.perf_counter()
    timer = PhaseTimerHook(args.batch_size, args.warmup_steps, called)
    tracer = OpTraceHook(args.warmup_steps + 1)
    try:
        config = bridge_config(args, data_dir, model_dir, **variant.config)
        trainer = TRAINERS.get(name, _train_bridge)
        trainer(config, [timer, tracer] if trace else [timer], batch)
        return {
            "examples_per_sec": float(timer.examples_per_sec),
            "ms_per_step": 1000 * timer.seconds / max(timer.timed_steps, 1),
            "seconds": timer.seconds,
            "startup_s": timer.clock_start - called,
            "session_s": timer.session_s,
            "first_steps_s": timer.first_steps_s,
            # As the child saw them: the proof that the variant's environment took effect.
            "env": {key: os.environ.get(key) for key in variant.env},
            **({"op_micros": tracer.op_micros} if trace else {}),
        }
    except Exception as error:  # noqa: BLE001 - report, keep the other runs going
        traceback.print_exc()
        return {"examples_per_sec": None, "error": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The parent: processes, rounds, report
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(overrides: Mapping[str, str]):
    """Sets environment variables for processes started inside the block, then restores them.

    A spawned child re-imports this script, and with it TensorFlow, before it runs anything, so
    TensorFlow settings read at start-up (oneDNN, XLA flags) must be in the environment it
    inherits. This process is idle meanwhile and reads neither again.
    """
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_isolated(args, data_dir: str, name: str, batch, trace: bool = False) -> Dict[str, Any]:
    """``run_one`` in a fresh ``spawn`` process started with the variant's environment."""
    context = multiprocessing.get_context("spawn")
    with environment(VARIANTS[name].env), context.Pool(1) as pool:
        return pool.apply(run_one, (args, data_dir, name, batch, trace))


def has_recurrent_layers(model: str) -> bool:
    """Whether the network has GRU/LSTM layers (built in a throwaway graph)."""
    with tf.Graph().as_default():
        network = keras_models.build_model(model)
    return any(isinstance(m, (keras.layers.GRU, keras.layers.LSTM)) for m in network.submodules)


def read_one_batch(args, data_dir: str) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """One training batch through the bridge's input_fn, as numpy (same keys and dtypes)."""
    config = bridge_config(args, data_dir, model_dir="")
    with data_pipeline.translate_errors(data_dir):
        features, labels = next(iter(train_input_fn(config)()))
    return {key: value.numpy() for key, value in features.items()}, labels.numpy()


def summarise(variants: Sequence[str], runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for name in variants:
        case = [r for r in runs if r["variant"] == name and r.get("examples_per_sec")]
        row: Dict[str, Any] = {"variant": name, "changes": VARIANTS[name].changes}
        row["rounds"] = [r["examples_per_sec"] for r in case]
        for key in ("examples_per_sec", "ms_per_step", "startup_s", "session_s"):
            row[key] = benchlib.median([r[key] for r in case]) if case else None
        row["first_steps_s"] = [
            benchlib.median([r["first_steps_s"][i] for r in case]) for i in range(FIRST_STEPS)
        ]
        rows.append(row)
    base = next((r["examples_per_sec"] for r in rows if r["variant"] == "baseline"), None)
    for row in rows:
        rate = row["examples_per_sec"]
        row["vs_baseline"] = rate / base if rate and base else None
    return rows


def print_summary(args, rows: List[Dict[str, Any]]) -> None:
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    print()
    print(
        f"{args.model}, batch {args.batch_size}: median over {args.rounds} round(s) of "
        f"{args.steps} steps (first {args.warmup_steps} excluded); startup = seconds from the "
        "call to the first timed step"
    )
    table = [
        [
            row["variant"],
            benchlib.fmt_rate(row["examples_per_sec"]),
            benchlib.fmt_ratio(row["examples_per_sec"], base and base["examples_per_sec"]),
            "-" if row["ms_per_step"] is None else f"{row['ms_per_step']:.1f}",
            "-" if row["startup_s"] is None else f"{row['startup_s']:.1f}",
            row["changes"],
        ]
        for row in rows
    ]
    benchlib.print_table(
        ["variant", "examples/s", "vs baseline", "ms/step", "startup s", "changes"], table
    )
    if base and base["session_s"] is not None:
        steps = ", ".join(f"{s:.2f}" for s in base["first_steps_s"])
        print(
            f"baseline start-up: session ready {base['session_s']:.2f}s after the call; steps "
            f"1-{FIRST_STEPS} took {steps} s (step 2 fetches no step-0 summaries: a new fetch "
            f"set, pruned and optimised anew); steady state {base['ms_per_step']:.1f} ms/step"
        )


def print_op_profile(name: str, op_micros: Mapping[str, Tuple[int, int]], step: int) -> None:
    # A function call's time spans the kernels it runs, which the trace also lists one by one
    # (the fused GRU loop is a PartitionedCall); counting both would count them twice.
    calls = {op: m for op, (m, _) in op_micros.items() if op in CALL_OPS}
    kernels = {op: value for op, value in op_micros.items() if op not in CALL_OPS}
    total = sum(micros for micros, _ in kernels.values()) or 1
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:TOP_OPS]
    print()
    print(
        f"op profile, {name}, step {step}: top {len(top)} of {len(kernels)} op types by summed "
        f"kernel time ({total / 1000:.1f} ms over all threads)"
    )
    benchlib.print_table(
        ["op type", "ms", "share", "runs"],
        [[op, f"{m / 1000:.2f}", f"{100 * m / total:.1f}%", n] for op, (m, n) in top],
    )
    if calls:
        spans = ", ".join(f"{op} {m / 1000:.1f} ms" for op, m in sorted(calls.items()))
        print(f"function calls (their kernels are counted above): {spans}")
    mkl = {op: m for op, (m, _) in op_micros.items() if op.startswith("_Mkl")}
    print(
        f"oneDNN (_Mkl*) kernels: {len(mkl)} op types, {100 * sum(mkl.values()) / total:.0f}% of "
        f"the kernel time{': ' + ', '.join(sorted(mkl)) if mkl else ''}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header("where the training step's time goes: estimator_bridge", command, info)
    os.makedirs(args.work_dir, exist_ok=True)
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)

    variants = list(args.variants)
    skipped = {}
    if any(VARIANTS[v].recurrent_only for v in variants) and not has_recurrent_layers(args.model):
        for name in [v for v in variants if VARIANTS[v].recurrent_only]:
            skipped[name] = f"{args.model} has no GRU/LSTM layers"
            variants.remove(name)
            print(f"{name}: skipped, {skipped[name]}")
    batch = read_one_batch(args, data_dir)  # read once, shipped to every const_input run

    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for name in variants[shift:] + variants[:shift]:
            result = run_isolated(args, data_dir, name, batch)
            runs.append({"round": round_index + 1, "variant": name, **result})
            status = result.get("error") or (
                f"{benchlib.fmt_rate(result['examples_per_sec'])} examples/s, "
                f"{result['ms_per_step']:.1f} ms/step ({result['seconds']:.1f}s timed, "
                f"{result['startup_s']:.1f}s startup; steps 1-{FIRST_STEPS}: "
                + "/".join(f"{s:.2f}" for s in result["first_steps_s"])
                + " s)"
            )
            print(f"round {round_index + 1}/{args.rounds}  {name:<15} {status}", flush=True)
    elapsed = time.perf_counter() - started

    rows = summarise(variants, runs)
    print_summary(args, rows)
    profiles = {}
    for name in [v for v in args.op_profile or () if v not in skipped]:
        result = run_isolated(args, data_dir, name, batch, trace=True)
        if result.get("op_micros"):
            profiles[name] = result["op_micros"]
            print_op_profile(name, profiles[name], args.warmup_steps + 1)
        else:
            print(f"op profile, {name}: no trace ({result.get('error', 'empty step stats')})")
    return benchlib.finish_runs(
        "diagnose_step",
        command,
        info,
        elapsed,
        runs,
        args.json_out,
        settings={k: getattr(args, k) for k in FLAG_ORDER},
        skipped=skipped,
        summary=rows,
        op_profiles=profiles,
    )


if __name__ == "__main__":
    sys.exit(main())
