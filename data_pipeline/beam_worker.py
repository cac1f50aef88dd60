"""Beam's Python SDK worker for the Beam engine's local runs, without the interpreter's teardown.

``python -m data_pipeline.beam_worker`` runs Beam's own worker
(``apache_beam.runners.worker.sdk_worker_main``) and, once the runner has ended it cleanly,
leaves with ``os._exit``: unloading TensorFlow's and Beam's modules at interpreter exit took
3-4 s per process on the project's 2-core machine, and Beam's ``FnApiRunner`` stops its local
workers one after the other, waiting for each to exit. By then every shard the worker wrote is
fsynced, renamed and journalled, and the runner has its results. A worker that fails exits the
ordinary way, with its traceback.
"""

import logging
import os
import sys

from apache_beam.runners.worker import sdk_worker_main


def main() -> None:
    """Runs the worker until the runner ends it, then exits at once."""
    sdk_worker_main.main(sys.argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
