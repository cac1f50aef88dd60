"""Runs without --seed differ.

What --seed reproduces bit for bit (initial weights, dropout, input order, augmentation) is
checked on each network's seeded run in test_networks.py, and for a SIGKILLed and resumed run in
test_faults_train.py.
"""

import dataclasses

from cli_helpers import checkpoint_variables, differing_variables

import estimator_bridge
import jobs


def test_without_a_seed_runs_differ(mnist_data_dir, tmp_path):
    config = estimator_bridge.Config(
        model="cnn", data_dir=str(mnist_data_dir), batch_size=16, train_steps=1, progress=False
    )
    runs = []
    for name in "ab":
        jobs.train(dataclasses.replace(config, model_dir=str(tmp_path / name)))
        runs.append(checkpoint_variables(tmp_path / name))
    # The initial weights already differ, and so does every trained weight.
    assert {"conv1/kernel", "dense1/kernel", "logits/kernel"} <= set(differing_variables(*runs))
