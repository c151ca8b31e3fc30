"""Linear evaluation of a trained WCL encoder (WCL_SPEC section 4).

    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --mode=fast --epochs=100
    python -m wcl_tf.tools.linear_eval --model_dir=runs/c10 --data_dir=DIR --mode=full \
        --epochs=100 --batch_size=256
    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --random_init   # baseline
    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo --raw_pixels    # baseline

One Dense layer (N(0, 0.01) init) on the frozen backbone (inference mode), SGD with Nesterov
momentum 0.9, lr 0.2 * batch / 256 (--lr overrides), no weight decay, cosine per step to 0.

--mode=fast: features of the train and test images are computed once, no augmentation.
--mode=full: the protocol; each training batch is a random resized crop (scale 0.08-1) +
  horizontal flip of the train images, through the frozen backbone; test images as loaded.
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


def _main():
    _check_flags()
    run = run_dir.resolve_run(need_checkpoint=not (FLAGS.random_init or FLAGS.raw_pixels))
    from wcl_tf import linear_eval  # pylint: disable=import-outside-toplevel

    log = run_dir.log
    backbone = None if FLAGS.raw_pixels else run_dir.load_encoder(run)
    (x_train, y_train), (x_test, y_test), num_classes = run_dir.load_data(run, log)
    encoder = "raw pixels" if FLAGS.raw_pixels else run_dir.encoder_name(run)
    lr = linear_eval.default_lr(run["batch_size"]) if FLAGS.lr is None else FLAGS.lr
    settings = (f"mode={FLAGS.mode}, encoder {encoder}, {run['dataset']} "
                f"{run['train_split']} ({len(y_train)}) -> {run['eval_split']} "
                f"({len(y_test)}), {num_classes} classes, {run['image_size']} px, "
                f"epochs={FLAGS.epochs}, batch_size={run['batch_size']}, lr={lr:.4g}, "
                f"seed={run['seed']}")
    log(f"linear evaluation: {settings}")

    start = time.time()
    if FLAGS.mode == "fast":
        if FLAGS.raw_pixels:
            train_feats = x_train.reshape(len(x_train), -1)
            test_feats = x_test.reshape(len(x_test), -1)
        else:
            train_feats = linear_eval.encoder_features(backbone, x_train, run["batch_size"])
            test_feats = linear_eval.encoder_features(backbone, x_test, run["batch_size"])
        log(f"features: train {train_feats.shape}, test {test_feats.shape} "
            f"({time.time() - start:.1f} s)")
        result = linear_eval.linear_eval_features(
            train_feats, y_train, test_feats, y_test, num_classes, epochs=FLAGS.epochs,
            batch_size=run["batch_size"], lr=FLAGS.lr, seed=run["seed"], log=log)
    else:
        result = linear_eval.linear_eval_full(
            backbone, x_train, y_train, x_test, y_test, num_classes, run["image_size"],
            epochs=FLAGS.epochs, batch_size=run["batch_size"], lr=FLAGS.lr,
            seed=run["seed"], log=log)
    seconds = time.time() - start

    payload = {
        "mode": FLAGS.mode,
        **{key: result[key] for key in ("top1_best", "top1_last", "top5_best", "top5_last")},
        "encoder": encoder,
        **run_dir.run_record(run),
        "raw_pixels": FLAGS.raw_pixels,
        "num_train": int(len(y_train)),
        "num_test": int(len(y_test)),
        "num_classes": int(num_classes),
        "epochs": FLAGS.epochs,
        "batch_size": run["batch_size"],
        "lr": result["lr"],
        "seed": run["seed"],
        "seconds": round(seconds, 1),
        "history": result["history"],
    }
    path = run_dir.output_path(run, f"linear_eval_{FLAGS.mode}{_variant()}.json")
    run_dir.write_json(path, payload)
    log(f"linear eval ({settings}): {run_dir.accuracy_summary(result)}  [{seconds:.1f} s] "
        f"-> {path}")
    return 0



def main():
    """Entry point of the module, of tools/linear_eval.py and of the console script."""
    _cli.run(run_dir.main_wrapper(_main), __name__)


if __name__ == "__main__":
    main()
