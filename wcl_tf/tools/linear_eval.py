"""Linear evaluation of a trained WCL encoder (docs/method.md section 5.3).

    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --mode=fast --epochs=100
    python -m wcl_tf.tools.linear_eval --model_dir=runs/c10 --data_dir=DIR --mode=full \
        --epochs=100 --batch_size=256
    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --random_init   # baseline
    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --raw_pixels    # baseline

One Dense layer (N(0, 0.01) init) on the frozen backbone (inference mode), SGD with Nesterov
momentum 0.9, lr 0.2 * batch / 256 (--lr overrides), no weight decay, cosine per step to 0.

    python -m wcl_tf.tools.linear_eval --flagfile=configs/r50_linear.flags --model_dir=RUN

--mode=fast: features of the train and test images (test-time preprocessing) are computed
  once, batch by batch (only the features are held), no augmentation.
--mode=full: the protocol; each training batch is a random resized crop (scale 0.08-1) +
  horizontal flip, through the frozen backbone; test images resized (shorter side
  round(S * 256 / 224)) and centre-cropped to S (wcl_tf/data/eval_input.py).
  --input=stream reads both splits in batches from tf.data, cutting the crops from the
  original images (memory flat in the number of images); --input=memory holds the split
  resized to S (the path for small square datasets, e.g. CIFAR at 32 px, where it is the
  same protocol); --input=auto (default) picks memory exactly when every image is known to
  be square with side <= S (embedded_mnist, fixed-shape TFDS datasets), else stream.
Baselines: --random_init evaluates a randomly initialised encoder of the run's
architecture; --raw_pixels (fast mode) the flattened pixels at image_size.

Dataset, data_dir, image_size and splits default to <model_dir>/config.json. Prints one line
per epoch and the best / last top-1 and top-5, and writes them, the settings and the history
to <model_dir>/linear_eval_{mode}.json (baselines: linear_eval_{mode}_random_init.json,
linear_eval_fast_raw_pixels.json).
"""

import time

from absl import flags

from wcl_tf.tools import _cli, run_dir

FLAGS = flags.FLAGS
run_dir.define_run_flags()
flags.DEFINE_enum("mode", "fast", ["fast", "full"], "fast: cached features, no "
                  "augmentation; full: the protocol, crop + flip through the frozen backbone.")
flags.DEFINE_integer("epochs", 100, "Training epochs of the linear classifier.", lower_bound=1)
flags.DEFINE_float("lr", None, "Peak learning rate. Default: 0.2 * batch_size / 256.")
flags.DEFINE_enum("input", "auto", ["auto", "stream", "memory"], "--mode=full: stream "
                  "batches from tf.data (crops of the original images), hold the split in "
                  "memory at image_size (small square datasets), or auto (memory exactly "
                  "when every image is square with side <= image_size).")
flags.DEFINE_bool("raw_pixels", False, "Baseline (fast mode only): the classifier sees the "
                  "flattened pixels at image_size instead of encoder features.")


def _check_flags():
    if FLAGS.raw_pixels and FLAGS.mode != "fast":
        raise run_dir.UserError("--raw_pixels works with --mode=fast only.")
    if FLAGS.raw_pixels and FLAGS.random_init:
        raise run_dir.UserError("pass either --raw_pixels or --random_init, not both.")
    if FLAGS.lr is not None and FLAGS.lr <= 0:
        raise run_dir.UserError(f"--lr must be > 0, got {FLAGS.lr}.")


def _variant():
    if FLAGS.raw_pixels:
        return "_raw_pixels"
    return "_random_init" if FLAGS.random_init else ""


def _full_input(run):
    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    if FLAGS.input != "auto":
        return FLAGS.input
    return "memory" if eval_input.same_protocol_in_memory(
        run["dataset"], run["image_size"], run["data_dir"]) else "stream"


def _eval_batches(run, split):
    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    return eval_input.eval_batches(run["dataset"], split, run["image_size"],
                                   run["batch_size"], run["data_dir"], run["download"],
                                   max_examples=run["max_examples"])


def _streamed_features(backbone, run, split, log):
    """(features float32 (N, C), labels, num_classes) of one split, batch by batch."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    batches, _, num_classes = _eval_batches(run, split)

    @tf.function(reduce_retracing=True)
    def call(x):
        return tf.cast(backbone(x, training=False), tf.float32)

    start = time.time()
    feats, labels = [], []
    for images, label_batch in batches:
        feats.append(call(images).numpy())
        labels.append(label_batch.numpy())
    if not feats:
        raise run_dir.UserError(f"split {split!r} of {run['dataset']!r} has no examples.")
    log(f"features of {run['dataset']}:{split}: {sum(len(f) for f in feats)} images "
        f"({time.time() - start:.1f} s)")
    return np.concatenate(feats), np.concatenate(labels), num_classes


def _main():
    _check_flags()
    run = run_dir.resolve_run(need_checkpoint=not (FLAGS.random_init or FLAGS.raw_pixels))
    from wcl_tf import linear_eval  # pylint: disable=import-outside-toplevel
    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    log = run_dir.log
    backbone = None if FLAGS.raw_pixels else run_dir.load_encoder(run)
    encoder = "raw pixels" if FLAGS.raw_pixels else run_dir.encoder_name(run)
    lr = linear_eval.default_lr(run["batch_size"]) if FLAGS.lr is None else FLAGS.lr
    data_input = _full_input(run) if FLAGS.mode == "full" else (
        "memory" if FLAGS.raw_pixels else "stream")
    log(f"linear evaluation: mode={FLAGS.mode}, input={data_input}, encoder {encoder}, "
        f"{run['dataset']} {run['train_split']} -> {run['eval_split']}, "
        f"{run['image_size']} px, epochs={FLAGS.epochs}, batch_size={run['batch_size']}, "
        f"lr={lr:.4g}, seed={run['seed']}")

    start = time.time()
    if FLAGS.mode == "fast":
        if FLAGS.raw_pixels:
            (x_train, y_train), (x_test, y_test), num_classes = run_dir.load_data(run, log)
            train_feats = x_train.reshape(len(x_train), -1)
            test_feats = x_test.reshape(len(x_test), -1)
        else:
            train_feats, y_train, num_classes = _streamed_features(
                backbone, run, run["train_split"], log)
            test_feats, y_test, _ = _streamed_features(backbone, run, run["eval_split"], log)
        log(f"features: train {train_feats.shape}, test {test_feats.shape} "
            f"({time.time() - start:.1f} s)")
        result = linear_eval.linear_eval_features(
            train_feats, y_train, test_feats, y_test, num_classes, epochs=FLAGS.epochs,
            batch_size=run["batch_size"], lr=FLAGS.lr, seed=run["seed"], log=log)
        num_train, num_test = len(y_train), len(y_test)
    elif data_input == "memory":
        (x_train, y_train), (x_test, y_test), num_classes = run_dir.load_data(run, log)
        result = linear_eval.linear_eval_full(
            backbone, x_train, y_train, x_test, y_test, num_classes, run["image_size"],
            epochs=FLAGS.epochs, batch_size=run["batch_size"], lr=FLAGS.lr,
            seed=run["seed"], log=log)
        num_train, num_test = len(y_train), len(y_test)
    else:
        train, num_train, num_classes, steps = eval_input.train_batches(
            run["dataset"], run["train_split"], run["image_size"], run["batch_size"],
            FLAGS.epochs, run["seed"], run["data_dir"], run["download"],
            max_examples=run["max_examples"])
        if num_train == 0:
            raise run_dir.UserError(f"split {run['train_split']!r} of {run['dataset']!r} "
                                    "has no examples.")
        test, _, eval_classes = _eval_batches(run, run["eval_split"])
        num_classes = eval_classes or num_classes
        log(f"streaming {run['dataset']}:{run['train_split']} ({num_train} images, "
            f"{steps} steps per epoch) -> {run['eval_split']}")
        result = linear_eval.linear_eval_stream(
            backbone, train, steps, test, num_classes, epochs=FLAGS.epochs,
            batch_size=run["batch_size"], lr=FLAGS.lr, seed=run["seed"], log=log)
        num_test = result["num_test"]
    seconds = time.time() - start
    settings = (f"mode={FLAGS.mode}, input={data_input}, encoder {encoder}, "
                f"{run['dataset']} {run['train_split']} ({num_train}) -> "
                f"{run['eval_split']} ({num_test}), {num_classes} classes, "
                f"{run['image_size']} px, epochs={FLAGS.epochs}, "
                f"batch_size={run['batch_size']}, lr={lr:.4g}, seed={run['seed']}")

    run_dir.write_classifier_results(
        run, f"linear_eval_{FLAGS.mode}{_variant()}.json", f"linear eval ({settings})",
        result, seconds, {
            "mode": FLAGS.mode,
            "raw_pixels": FLAGS.raw_pixels,
            "input": data_input,
            "test_preprocessing": (
                f"square images of side <= {run['image_size']}: bilinear resize to it; "
                f"others: shorter side to {eval_input.resize_size(run['image_size'])} "
                f"(antialiased bilinear), centre crop {run['image_size']}"),
            "num_train": int(num_train),
            "num_test": int(num_test),
            "num_classes": int(num_classes),
            "epochs": FLAGS.epochs,
        }, encoder=encoder)
    return 0


def main():
    """Entry point of the module, of tools/linear_eval.py and of the console script."""
    _cli.run(run_dir.main_wrapper(_main), __name__)


if __name__ == "__main__":
    main()
