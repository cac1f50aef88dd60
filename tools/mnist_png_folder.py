"""Writes MNIST digits as PNG files in class folders: the README's quick start without images.

    .venv/bin/python tools/mnist_png_folder.py my_images --train=3000 --test=500

gives ``my_images/train/<zero..nine>/NNNNN.png`` (the first 3,000 training digits) and
``my_images/test/...`` (the first 500 test digits), 28x28 grayscale, the layout
``--mode=prepare --source_dir=my_images`` reads. MNIST is found as ``--mode=prepare`` finds it
(``--source_dir``, ``$MNIST_DIR``, the Keras cache, or a download).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tfenv  # noqa: E402, F401 - before TensorFlow: its start-up notices stay hidden

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def main() -> None:
    """Parses the arguments and writes the folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (train/ and test/ inside)")
    parser.add_argument("--train", type=int, default=3000, help="training digits (first N)")
    parser.add_argument("--test", type=int, default=500, help="test digits (first N)")
    parser.add_argument("--source_dir", default=None, help="MNIST's IDX files or mnist.npz")
    args = parser.parse_args()

    import tensorflow as tf

    from data_pipeline import load_source

    mnist = load_source(args.source_dir)
    for split, count in (("train", args.train), ("test", args.test)):
        images, labels = mnist.splits[split]
        for index, (image, label) in enumerate(zip(images[:count], labels[:count])):
            folder = os.path.join(args.out, split, NAMES[label])
            os.makedirs(folder, exist_ok=True)
            png = tf.io.encode_png(image[..., None]).numpy()
            with open(os.path.join(folder, f"{index:05d}.png"), "wb") as handle:
                handle.write(png)
    print(
        f"{args.out}: {min(args.train, len(mnist.splits['train'][1]))} train and "
        f"{min(args.test, len(mnist.splits['test'][1]))} test PNG files in 10 class folders"
    )


if __name__ == "__main__":
    main()
