"""Distributed training: a real TF_CONFIG cluster on 127.0.0.1 and MirroredStrategy on 2 CPUs.

Both run in subprocesses: a cluster task needs its own TF_CONFIG and server, and logical CPU
devices must be configured before TensorFlow initialises its runtime (in a process forked from
one that has imported TensorFlow but not started its runtime: ``cli_helpers.run_forked``).
"""

import glob
import importlib.util
import json
import os

import pytest
import tensorflow as tf
from cli_helpers import run_forked

import distribution
import estimator_bridge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_TIMEOUT_SECS = 240
MIRRORED_TIMEOUT_SECS = 150


def _load_launcher():
    path = os.path.join(REPO, "tools", "run_cluster.py")
    spec = importlib.util.spec_from_file_location("run_cluster", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_cluster = _load_launcher()


def _eval_accuracies(eval_dir):
    """``{global_step: accuracy}`` from the evaluator's TensorBoard events."""
    accuracies = {}
    for path in sorted(glob.glob(os.path.join(eval_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "accuracy":
                    accuracies[event.step] = value.simple_value
    return accuracies


def _task_result(log_path):
    """The JSON line a task prints last (``run_cluster.py task``)."""
    with open(log_path) as handle:
        lines = [line for line in handle if line.startswith("{")]
    assert lines, f"no result line in {log_path}:\n{_tail(log_path)}"
    return json.loads(lines[-1])


def _tail(path, lines=25):
    with open(path) as handle:
        return "".join(handle.readlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Strategies and TF_CONFIG (no training)
# --------------------------------------------------------------------------------------------


def test_strategy_names_and_errors():
    assert distribution.STRATEGIES == (
        "none",
        "mirrored",
        "multi_worker_mirrored",
        "parameter_server",
    )
    assert distribution.run_config_kwargs("none") == {}
    with pytest.raises(ValueError, match="unknown distribution 'horovod'.*parameter_server"):
        distribution.run_config_kwargs("horovod")


def test_tf_config_keeps_the_evaluator_out_of_the_cluster():
    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"], "ps": ["h3:1"], "evaluator": ["e"]}
    config = distribution.tf_config(cluster, "evaluator")
    assert config == {
        "cluster": {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"], "ps": ["h3:1"]},
        "task": {"type": "evaluator", "index": 0},
    }
    assert distribution.tf_config(cluster, "worker", 1)["task"] == {"type": "worker", "index": 1}
    with pytest.raises(ValueError, match="no worker task 2"):
        distribution.tf_config(cluster, "worker", 2)
    with pytest.raises(ValueError, match="unknown task type"):
        distribution.tf_config(cluster, "master")


def test_evaluator_task_gets_no_training_strategy(monkeypatch):
    tf_config = distribution.tf_config({"chief": ["h0:1"], "worker": ["h1:1"]}, "evaluator")
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    # Building MultiWorkerMirroredStrategy on the evaluator raises KeyError: 'evaluator'.
    assert distribution.run_config_kwargs("multi_worker_mirrored") == {}
    assert distribution.run_config_kwargs("parameter_server") == {}
    assert distribution.current_task()["type"] == "evaluator"


# --------------------------------------------------------------------------------------------
# A real cluster: chief, worker, ps and evaluator as processes on 127.0.0.1
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parameter_server_cluster_trains_and_evaluates(mnist_data_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    steps = 150
    config = run_cluster.cluster_config(
        data_dir=str(mnist_data_dir),
        model_dir=model_dir,
        distribution="parameter_server",
        train_steps=steps,
        batch_size=32,
        eval_limit=1000,
        save_checkpoints_steps=50,
    )
    report = run_cluster.run_cluster(config, workers=1, ps=1, timeout=CLUSTER_TIMEOUT_SECS)
    logs = {name: _tail(task["log"]) for name, task in report["tasks"].items()}
    assert report["ok"], (
        json.dumps(report, indent=1)
        + "\n"
        + "\n".join(f"--- {name}\n{text}" for name, text in logs.items())
    )
    tasks = report["tasks"]
    assert set(tasks) == {"chief0", "worker0", "ps0", "evaluator0"}
    # Every process ended within the bound: chief, worker and evaluator by themselves with exit
    # code 0, the ps (which serves until killed) by the launcher's SIGTERM once they were done.
    for name in ("chief0", "worker0", "evaluator0"):
        assert tasks[name]["returncode"] == 0 and tasks[name]["stopped"] is None, name
    assert tasks["ps0"]["stopped"] == "by launcher"
    assert tasks["ps0"]["returncode"] == -15
    assert report["seconds"] < CLUSTER_TIMEOUT_SECS

    # The chief wrote checkpoints up to the target step.
    latest = tf.train.latest_checkpoint(model_dir)
    assert latest is not None
    assert int(tf.train.load_checkpoint(latest).get_tensor("global_step")) >= steps
    assert len(tf.train.get_checkpoint_state(model_dir).all_model_checkpoint_paths) >= 2

    # Both training tasks trained, each on its own share of the shards (input pipeline 0 or 1
    # of 2), asynchronously: their steps add up to the global step.
    chief, worker = _task_result(tasks["chief0"]["log"]), _task_result(tasks["worker0"]["log"])
    pipelines = {r["input_context"]["input_pipeline_id"] for r in (chief, worker)}
    assert pipelines == {0, 1}
    assert chief["input_context"]["num_input_pipelines"] == 2
    assert chief["local_steps"] > 0 and worker["local_steps"] > 0, (chief, worker)
    assert chief["local_steps"] + worker["local_steps"] >= steps

    # The evaluator evaluated checkpoints as they appeared, the last one well above chance.
    accuracies = _eval_accuracies(os.path.join(model_dir, "eval_test"))
    assert accuracies, f"no eval events\n{logs['evaluator0']}"
    assert max(accuracies) >= steps
    assert accuracies[max(accuracies)] > 0.5, accuracies
    assert _task_result(tasks["evaluator0"]["log"])["task"] == "evaluator"
    assert os.listdir(os.path.join(model_dir, "export", "best"))


# --------------------------------------------------------------------------------------------
# MirroredStrategy over two logical CPU devices
# --------------------------------------------------------------------------------------------

MIRRORED_SCRIPT = """
import json, sys
import tfenv
import distribution
distribution.split_cpu(2)  # before anything initialises TensorFlow's runtime
tfenv.silence_python_logging()
import tensorflow as tf
import estimator_bridge as bridge
import jobs

devices = distribution.local_devices()
results = {}
for name, config in json.loads(sys.argv[1]).items():
    config = bridge.Config(**config)
    trained = jobs.train(config)
    evaluated = jobs.evaluate(config)
    keys = sorted(key for key, _ in tf.train.list_variables(config.model_dir))
    results[name] = {"devices": devices, "train": trained, "eval": evaluated, "keys": keys}
print(json.dumps(results))
"""
# A user's builder (tests/user_models.py) beside the cnn: Keras names its unnamed layers again
# for each replica, yet they must share one set of variables and checkpoint keys.
USER_BN_NET = "user_models:build_bn_net"


@pytest.fixture(scope="module")
def mirrored_runs(mnist_data_dir, tmp_path_factory):
    """Train and evaluate results of the cnn and a user builder under MirroredStrategy on 2 CPUs.

    Both run in one process of their own (the logical CPUs must exist before TensorFlow's
    runtime starts), forked from a warm interpreter that has imported TensorFlow and main.py's
    modules without starting that runtime (``cli_helpers.run_forked``).
    """
    root = tmp_path_factory.mktemp("mirrored")
    common = {
        "data_dir": str(mnist_data_dir),
        "batch_size": 32,
        "eval_batch_size": 500,
        "eval_limit": 1000,
        "progress": False,
        "distribution": "mirrored",
        "seed": 1,
    }
    configs = {
        "cnn": {
            **common,
            "model": "cnn",
            "model_dir": str(root / "cnn"),
            "train_steps": 100,
            "save_checkpoints_steps": 100,
        },
        "user": {
            **common,
            "model": USER_BN_NET,
            "model_params": {"width": 8},
            "model_dir": str(root / "user"),
            "train_steps": 40,
        },
    }
    run = run_forked(
        MIRRORED_SCRIPT,
        json.dumps(configs),
        timeout=MIRRORED_TIMEOUT_SECS,
        pythonpath=[os.path.join(REPO, "tests")],
        env={"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(mirrored_runs):
    result = mirrored_runs["cnn"]
    assert [d.split("/")[-1] for d in result["devices"]] == ["device:CPU:0", "device:CPU:1"]
    assert result["train"]["global_step"] == 100
    evaluated = result["eval"]
    # Every example counted once: the confusion matrix sums the two replicas' halves.
    assert evaluated["examples"] == 1000
    assert evaluated["accuracy"] > 0.5
    # Checkpoint keys stay <layer>/<weight>, so the Keras round trip works after mirrored runs.
    assert "conv1/kernel" in result["keys"] and "logits/bias" in result["keys"]
    assert not [k for k in result["keys"] if k.startswith("replica_")]


@pytest.mark.slow
def test_user_builder_trains_under_mirrored_strategy(mirrored_runs, mnist_data_dir):
    """Unnamed layers built once per replica still share one set of variables and keys."""
    result = mirrored_runs["user"]
    assert len(result["devices"]) == 2 and result["train"]["global_step"] == 40
    assert result["eval"]["examples"] == 1000 and result["eval"]["accuracy"] > 0.5
    user = estimator_bridge.Config(
        model=USER_BN_NET, model_params={"width": 8}, data_dir=str(mnist_data_dir)
    )
    network = estimator_bridge.describe_network(user)
    assert set(network.keys) <= set(result["keys"])
    assert not [k for k in result["keys"] if "replica" in k]
