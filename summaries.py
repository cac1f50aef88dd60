"""The training summaries the model_fn writes for TensorBoard, and the hook that writes them.

Apart from ``estimator_bridge`` so that the bridge keeps to the model_fn and the Estimator; nothing
here builds a network.
"""

import math
from typing import List

import tensorflow as tf


def train_summaries(images, labels, classes, learning_rate, layer_outputs) -> List:
    """The training summaries for TensorBoard (empty strings in replicas other than the first)."""
    accuracy = tf.reduce_mean(tf.cast(tf.equal(labels, classes), tf.float32))
    summaries = [
        tf.compat.v1.summary.scalar("train_accuracy", accuracy),
        tf.compat.v1.summary.scalar("learning_rate", learning_rate),
    ]
    # Image summaries take 1, 3 or 4 channels; other images show their first channel.
    shown = images if images.shape[-1] in (1, 3, 4) else images[..., :1]
    summaries.append(tf.compat.v1.summary.image("input_images", shown, max_outputs=4))
    conv1 = layer_outputs.get("conv1")
    if conv1 is not None and conv1.shape.rank in (3, 4):
        grid = feature_map_grid(conv1)
        summaries.append(tf.compat.v1.summary.image("conv1_feature_maps", grid, max_outputs=1))
    return summaries


class SummaryHook(tf.compat.v1.train.SummarySaverHook):
    """The Estimator's SummarySaverHook, with the same fetches on every training step.

    The stock hook fetches the summaries only on the steps that write them, so the first
    ``Session.run`` of a training and the second differ, and Grappler optimises the whole
    training graph for each (birnn: 1.4 s of a 3-step training, ``bench/bench_startup.py``).
    Here they sit in a ``tf.cond`` whose predicate is fed on every step: one signature, and the
    summaries are computed only when due, at the same steps as the stock hook's.
    """

    def __init__(self, save_steps: int, output_dir: str, summary: tf.Tensor, due: tf.Tensor):
        super().__init__(save_steps=save_steps, output_dir=output_dir, summary_op=summary)
        self._due = due

    def before_run(self, run_context):
        requests = dict(super().before_run(run_context).fetches)
        requests["summary"] = self._get_summary_op()
        return tf.estimator.SessionRunArgs(requests, {self._due: self._request_summary})


def feature_map_grid(feature_maps: tf.Tensor) -> tf.Tensor:
    """The first example's feature maps as one image ``[1, H, W, 1]``, min-max scaled.

    Conv2D maps ``[batch, h, w, c]`` are tiled row by row in a near-square grid (32 maps of
    28 x 28: 6 x 6 tiles, the last 4 blank, 173 x 173 pixels), with a one-pixel white line
    between tiles: TensorBoard's image card fits a square, where a 4 x 8 grid lost its last
    column to a scroll bar and the old 28 x 896 strip was unreadable. Conv1D maps
    ``[batch, t, c]`` are shown as one ``t x c`` image.
    """
    maps = tf.cast(feature_maps[0], tf.float32)
    maps = maps - tf.reduce_min(maps)
    maps = maps / (tf.reduce_max(maps) + 1e-6)
    if maps.shape.rank == 3:
        channels = int(maps.shape[-1])
        columns = math.ceil(math.sqrt(channels))
        rows = math.ceil(channels / columns)
        height, width = tf.shape(maps)[0] + 1, tf.shape(maps)[1] + 1
        # [c, h, w] with a white line below and right of each map, blank tiles to fill the grid.
        tiles = tf.pad(
            tf.transpose(maps, [2, 0, 1]),
            [[0, rows * columns - channels], [0, 1], [0, 1]],
            constant_values=1.0,
        )
        grid = tf.reshape(tiles, [rows, columns, height, width])
        grid = tf.reshape(tf.transpose(grid, [0, 2, 1, 3]), [rows * height, columns * width])
        maps = grid[:-1, :-1]
    return maps[tf.newaxis, :, :, tf.newaxis]
