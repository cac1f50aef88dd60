"""Starts a local TF_CONFIG cluster (chief, workers, ps, evaluator) as subprocesses on 127.0.0.1.

For tests and demos of ``--mode=train_and_evaluate`` on a cluster without a cluster: every task
is a separate Python process with its own ``TF_CONFIG`` on a free 127.0.0.1 port, sharing one
model dir (on a real cluster: shared storage). The launcher waits for the chief, the workers and
the evaluator to exit, then stops the parameter servers: a ps task only serves variables and
blocks in ``server.join()`` forever (TF 2.15 has no way to shut a ps down from the cluster), so
the launcher ends it with SIGTERM and reports that as ``"stopped": "by launcher"``.

Example (two training processes, one ps, one evaluator, ~1 minute on 2 CPU cores)::

    .venv/bin/python tools/run_cluster.py --data_dir=data/mnist --model_dir=/tmp/ps_cnn \
        --distribution=parameter_server --train_steps=300 --batch_size=32

Prints one JSON object: per task its command, exit code, seconds and log file, plus ``ok``.
Exit code 0 when every chief/worker/evaluator exited 0 within ``--timeout`` seconds.

Task entry points (``--entry``):

* ``estimator`` (default): ``tf.estimator.train_and_evaluate`` on
  ``estimator_bridge.make_estimator`` with the bridge's input, hook and exporter, run by
  ``python tools/run_cluster.py task '<config json>'``;
* ``bridge``: ``jobs.train_and_evaluate(Config(...))`` in the same wrapper;
* ``main``: ``python main.py --mode=train_and_evaluate --distribution=...`` (needs the
  ``--distribution`` flag in ``flags.py``/``main.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import distribution  # noqa: E402 - after the sys.path fix; imports no TensorFlow

ENTRIES = ("estimator", "bridge", "main")
# Seconds a process gets to exit after SIGTERM before SIGKILL.
KILL_GRACE_SECS = 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_cluster(workers: int = 1, ps: int = 1) -> Dict[str, List[str]]:
    """A training cluster of one chief, ``workers`` workers and ``ps`` ps on free local ports."""
    cluster = {"chief": [f"127.0.0.1:{free_port()}"]}
    if workers:
        cluster["worker"] = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
    if ps:
        cluster["ps"] = [f"127.0.0.1:{free_port()}" for _ in range(ps)]
    return cluster


def task_command(entry: str, config: Dict[str, Any]) -> List[str]:
    """The command line that runs one task of ``--mode=train_and_evaluate`` for ``config``."""
    if entry == "main":
        flags = {
            "mode": "train_and_evaluate",
            "model": config["model"],
            "data_dir": config["data_dir"],
            "model_dir": config["model_dir"],
            "batch_size": config["batch_size"],
            "eval_batch_size": config["eval_batch_size"],
            "train_steps": config["train_steps"],
            "save_checkpoints_steps": config["save_checkpoints_steps"],
            "log_every_n_steps": config["log_every_n_steps"],
            "eval_throttle_secs": config["eval_throttle_secs"],
            "distribution": config["distribution"],
            "intra_op_threads": config["intra_op_threads"],
            "inter_op_threads": config["inter_op_threads"],
        }
        # No --limit: main.py applies it to the train split too, which can leave fewer train
        # shards than workers. The evaluator then evaluates the whole test split.
        return [sys.executable, os.path.join(REPO, "main.py")] + [
            f"--{k}={v}" for k, v in flags.items()
        ]
    return [sys.executable, os.path.abspath(__file__), "task", entry, json.dumps(config)]


def run_cluster(
    config: Dict[str, Any],
    *,
    workers: int = 1,
    ps: int = 1,
    evaluator: bool = True,
    entry: str = "estimator",
    log_dir: Optional[str] = None,
    timeout: float = 300.0,
    env: Optional[Dict[str, str]] = None,
    stagger: Optional[bool] = None,
) -> Dict[str, Any]:
    """Runs every task of a local cluster to completion and reports how each one ended.

    Args:
        config: ``estimator_bridge.Config`` fields as JSON-able values (``model_dir`` shared).
        workers: Non-chief training workers.
        ps: Parameter servers (stopped by the launcher once training and evaluation ended).
        evaluator: Start an evaluator task (it is not part of the TF_CONFIG cluster).
        entry: How tasks run; one of :data:`ENTRIES`.
        log_dir: Where ``<task>.log`` files go (default ``<model_dir>/cluster_logs``).
        timeout: Seconds for the whole run; on expiry every task is killed and ``ok`` is False.
        env: Extra environment variables for every task.
        stagger: Start the workers only once the chief wrote its first checkpoint (default:
            for ``parameter_server``). A non-chief worker that finds the variables uninitialised
            checks again only 30 s later (the session manager's ``recovery_wait_secs``), by
            which time a short run is over. Not for ``multi_worker_mirrored`` (its chief cannot
            initialise without every worker) nor ``none`` (without device filters the chief's
            session waits for every task of the cluster).

    Returns:
        ``{"ok", "timed_out", "seconds", "cluster", "command", "tasks": {name: {"returncode",
        "seconds", "stopped", "log"}}}``; ``stopped`` is ``None`` for a task that exited by
        itself, ``"by launcher"`` for a ps stopped after a clean run.
    """
    if entry not in ENTRIES:
        raise ValueError(f"unknown entry {entry!r}; choose one of: {ENTRIES}")
    cluster = make_cluster(workers, ps)
    log_dir = log_dir or os.path.join(config["model_dir"], "cluster_logs")
    os.makedirs(log_dir, exist_ok=True)
    roles = [(t, i) for t in ("ps", "chief", "worker") for i in range(len(cluster.get(t, [])))]
    if evaluator:
        roles.append(("evaluator", 0))
    command = task_command(entry, config)
    procs: Dict[str, Dict[str, Any]] = {}
    start = time.monotonic()
    if stagger is None:
        stagger = config.get("distribution") == "parameter_server"
    try:
        clean, timed_out = _start_and_wait(
            procs, roles, cluster, command, config, log_dir, env, stagger, start + timeout, start
        )
    finally:  # also on KeyboardInterrupt: never leave TensorFlow servers behind
        for task in procs.values():
            if "returncode" not in task:
                _stop(task, start, None)
    finite = [n for n, p in procs.items() if p["type"] != "ps"]
    ok = clean and all(procs[n]["returncode"] == 0 for n in finite)
    ok = ok and all(t["stopped"] == "by launcher" for t in procs.values() if t["type"] == "ps")
    return {
        "ok": ok,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - start, 1),
        "cluster": cluster,
        "command": command,
        "tasks": {
            name: {k: task[k] for k in ("returncode", "seconds", "stopped", "log")}
            for name, task in procs.items()
        },
    }


def _start_and_wait(procs, roles, cluster, command, config, log_dir, env, stagger, deadline, start):
    """Starts the tasks into ``procs``, waits, stops the ps; returns (clean, timed_out)."""
    for task_type, index in sorted(roles, key=lambda role: stagger and role[0] == "worker"):
        if stagger and task_type == "worker" and index == 0:
            _wait_for_first_checkpoint(config["model_dir"], procs["chief0"], deadline)
        name = f"{task_type}{index}"
        task_env = dict(os.environ, **(env or {}))
        task_env["TF_CONFIG"] = json.dumps(distribution.tf_config(cluster, task_type, index))
        task_env.setdefault("PYTHONUNBUFFERED", "1")
        log_path = os.path.join(log_dir, f"{name}.log")
        log = open(log_path, "w")  # noqa: SIM115 - closed when the task ends
        proc = subprocess.Popen(
            command, cwd=REPO, env=task_env, stdout=log, stderr=subprocess.STDOUT
        )
        procs[name] = {"type": task_type, "proc": proc, "log_file": log, "log": log_path}

    finite = [n for n, p in procs.items() if p["type"] != "ps"]
    timed_out = failed = False
    while True:
        for task in procs.values():
            _poll(task, start)
        if all("returncode" in procs[n] for n in finite):
            break
        # A failed task (or a ps that died) leaves the others waiting forever: stop everything.
        failed = any(procs[n].get("returncode") not in (None, 0) for n in finite) or any(
            "returncode" in t for t in procs.values() if t["type"] == "ps"
        )
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            break
        time.sleep(0.5)
    clean = not (failed or timed_out)
    for task in procs.values():
        if "returncode" not in task:
            _stop(task, start, "by launcher" if task["type"] == "ps" and clean else None)
    return clean, timed_out


def _wait_for_first_checkpoint(model_dir: str, chief: Dict[str, Any], deadline: float) -> None:
    """Returns when ``model_dir`` has a checkpoint, the chief exited or the deadline passed."""
    while time.monotonic() < deadline and chief["proc"].poll() is None:
        if os.path.exists(os.path.join(model_dir, "checkpoint")):
            return
        time.sleep(0.2)


def _poll(task: Dict[str, Any], start: float) -> None:
    if "returncode" in task:
        return
    code = task["proc"].poll()
    if code is not None:
        task.update(returncode=code, seconds=round(time.monotonic() - start, 1), stopped=None)
        task["log_file"].close()


def _stop(task: Dict[str, Any], start: float, reason: Optional[str]) -> None:
    """SIGTERM, then SIGKILL after the grace period; records how the task ended."""
    proc = task["proc"]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_SECS)
        stopped = reason or "terminated (timeout or failure elsewhere)"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        stopped = "killed"
    task.update(returncode=proc.returncode, seconds=round(time.monotonic() - start, 1))
    task["stopped"] = stopped
    task["log_file"].close()


# --------------------------------------------------------------------------------------------
# One task (runs in the subprocess)
# --------------------------------------------------------------------------------------------


def run_task(entry: str, config_json: str) -> Dict[str, Any]:
    """Runs ``--mode=train_and_evaluate`` for this process' TF_CONFIG task; returns a summary."""
    import tfenv

    tfenv.silence_python_logging()
    import tensorflow as tf

    if os.environ.get("RUN_CLUSTER_VERBOSE"):  # the Estimator's INFO log, with timestamps
        import logging

        tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.INFO)
        tf.get_logger().setLevel(logging.INFO)
        for handler in tf.get_logger().handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    import data_pipeline
    import estimator_bridge as bridge
    import jobs

    config = bridge.Config(**json.loads(config_json))
    task = distribution.current_task()
    started = time.monotonic()
    if entry == "bridge":
        result = jobs.train_and_evaluate(config)
    else:
        config.validate()
        spec = data_pipeline.load_spec(config.data_dir)
        estimator = bridge.make_estimator(config, spec)
        target = bridge.target_step(config, spec)
        split = "train" if config.eval_split == "train" else "test"
        hook = jobs.ProgressHook(
            batch_size=config.batch_size,
            start_step=bridge.global_step_of(config.model_dir),
            target_step=target,
            every_n_steps=config.log_every_n_steps,
            progress_bar=False,
        )
        exporter = tf.estimator.BestExporter(
            name="best",
            serving_input_receiver_fn=bridge.serving_input_receiver_fn(spec),
            compare_fn=jobs.higher_accuracy(config.model_dir),
            exports_to_keep=3,
        )
        train_input_fn = bridge.make_input_fn(config, "train", True)
        pipeline: Dict[str, int] = {}

        def recording_input_fn(input_context=None):
            # Shows which share of the shards this worker reads.
            if input_context is not None:
                pipeline.update(
                    input_pipeline_id=input_context.input_pipeline_id,
                    num_input_pipelines=input_context.num_input_pipelines,
                    num_replicas_in_sync=input_context.num_replicas_in_sync,
                )
            return train_input_fn(input_context=input_context)

        class StepCounter(tf.estimator.SessionRunHook):
            """Counts the training steps this process ran."""

            steps = 0

            def after_run(self, run_context, run_values):
                self.steps += 1

        counter = StepCounter()
        train_spec = tf.estimator.TrainSpec(
            recording_input_fn, max_steps=target, hooks=[hook, counter]
        )
        eval_spec = tf.estimator.EvalSpec(
            bridge.make_input_fn(config, split, False),
            steps=None,
            name=split,
            exporters=[exporter],
            start_delay_secs=0,
            throttle_secs=config.eval_throttle_secs,
        )
        with data_pipeline.translate_errors():
            # Returns None on a cluster with a distribution strategy (distribute coordinator).
            outcome = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
        metrics = outcome[0] if outcome else None
        result = {k: float(v) for k, v in (metrics or {}).items() if getattr(v, "ndim", 0) == 0}
        result["global_step"] = bridge.global_step_of(config.model_dir)
        result["local_steps"] = counter.steps
        result["input_context"] = pipeline or None
    return {
        "task": task["type"],
        "index": task["index"],
        **result,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: the launcher, or (``task ENTRY JSON``) one task of the cluster."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["task"]:
        if len(argv) != 3 or argv[1] not in ENTRIES:
            print("usage: run_cluster.py task {estimator,bridge} CONFIG_JSON", file=sys.stderr)
            return 2
        print(json.dumps(run_task(argv[1], argv[2]), default=str), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--model", default="cnn")
    parser.add_argument(
        "--distribution", default="parameter_server", choices=distribution.STRATEGIES
    )
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=500)
    parser.add_argument("--eval_limit", type=int, default=2000)
    parser.add_argument("--save_checkpoints_steps", type=int, default=100)
    parser.add_argument("--eval_throttle_secs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra- and inter-op threads")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ps", type=int, default=1)
    parser.add_argument("--no_evaluator", action="store_true")
    parser.add_argument("--entry", default="estimator", choices=ENTRIES)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    config = cluster_config(
        model=args.model,
        data_dir=os.path.abspath(args.data_dir),
        model_dir=os.path.abspath(args.model_dir),
        distribution=args.distribution,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        eval_limit=args.eval_limit,
        save_checkpoints_steps=args.save_checkpoints_steps,
        eval_throttle_secs=args.eval_throttle_secs,
        intra_op_threads=args.threads,
        inter_op_threads=args.threads,
    )
    report = run_cluster(
        config,
        workers=args.workers,
        ps=args.ps,
        evaluator=not args.no_evaluator,
        entry=args.entry,
        timeout=args.timeout,
    )
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cluster_config(**overrides: Any) -> Dict[str, Any]:
    """``estimator_bridge.Config`` fields (JSON-able) for a small, quick cluster run."""
    config = {
        "model": "cnn",
        "batch_size": 32,
        "eval_batch_size": 500,
        "eval_limit": 2000,
        "train_steps": 300,
        "save_checkpoints_steps": 100,
        "log_every_n_steps": 50,
        "progress": False,
        "eval_throttle_secs": 1,
        "distribution": "parameter_server",
        "intra_op_threads": 1,
        "inter_op_threads": 1,
    }
    config.update(overrides)
    return config


if __name__ == "__main__":
    sys.exit(main())
