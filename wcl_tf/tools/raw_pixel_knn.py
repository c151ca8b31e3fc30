"""kNN top-1 on raw pixels (L2-normalised flattened images): the floor any encoder must beat.

    python -m wcl_tf.tools.raw_pixel_knn --dataset=cifar10 --data_dir=DIR --max_examples=10000
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from wcl_tf.tools import _cli  # noqa: E402

flags.DEFINE_string("dataset", "cifar10", "Dataset.")
flags.DEFINE_string("data_dir", None, "TFDS folder (default: TFDS's own).")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_integer("max_examples", 10000, "First N images of each split (0: all).")
flags.DEFINE_integer("k", 200, "Neighbours.")
flags.DEFINE_float("temperature", 0.1, "Vote temperature.")
FLAGS = flags.FLAGS


def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import numpy as np

    from wcl_tf import knn
    from wcl_tf.data import load_arrays, load_split

    def flat(split):
        x, y = load_arrays(FLAGS.dataset, split, FLAGS.image_size, FLAGS.data_dir,
                           max_examples=FLAGS.max_examples)
        x = x.reshape(len(x), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True), y

    (xm, ym), (xq, yq) = flat("train"), flat("test")
    num_classes = load_split(FLAGS.dataset, "test", FLAGS.data_dir)[2]
    top1 = knn.knn_top1(xm, ym, xq, yq, num_classes, FLAGS.k, FLAGS.temperature)
    print(f"raw-pixel kNN top-1 (k={FLAGS.k}, T={FLAGS.temperature}) on {FLAGS.dataset}, "
          f"{len(xm)} memory / {len(xq)} queries: {100 * top1:.2f}%")



def main():
    """Entry point of the module, of tools/raw_pixel_knn.py and of the console script."""
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
