"""Weighted kNN evaluation of a trained WCL encoder.

    python -m wcl_tf.tools.knn_eval --model_dir=runs/demo     # or: python tools/knn_eval.py
    python -m wcl_tf.tools.knn_eval --model_dir=runs/c10 --data_dir=DIR --k=200 \
        --temperature=0.1 --max_examples=5000

Memory: the train split, queries: the eval split, both read in batches from tf.data
(wcl_tf/data/eval_input.py: square images of side <= image_size are resized to it, others
resized to shorter side round(S * 256 / 224) and centre-cropped to S), through the backbone
in inference mode, L2-normalised; only the features are held (--feature_dtype=float16
halves the memory bank); the k nearest memory features vote with weight exp(sim / temperature)
(wcl_tf/knn.py). Dataset, data_dir, image_size and the splits default to the values in
<model_dir>/config.json (written by training). Prints the settings and the top-1, and writes
them to <model_dir>/knn_eval.json (--random_init: knn_eval_random_init.json).
"""

import time

from absl import flags

from wcl_tf.tools import _cli, run_dir

FLAGS = flags.FLAGS


def define_knn_flags():
    run_dir.define_run_flags()
    flags.DEFINE_integer("k", 200, "Neighbours that vote.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.1, "Temperature T of the vote weight exp(sim / T).",
                       lower_bound=1e-6)
    flags.DEFINE_enum("feature_dtype", "float32", ["float32", "float16"], "dtype the memory "
                      "bank of features is stored in (similarities are float32 either way).")


def knn_main():
    run = run_dir.resolve_run(need_checkpoint=not FLAGS.random_init)
    # Imported after the cheap checks, so that a wrong path fails at once.
    from wcl_tf import knn  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel

    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    encoder = run_dir.load_encoder(run)

    def batches(split):
        return eval_input.eval_batches(run["dataset"], split, run["image_size"],
                                       run["batch_size"], run["data_dir"], run["download"],
                                       max_examples=run["max_examples"])

    memory, _, _ = batches(run["train_split"])
    queries, _, num_classes = batches(run["eval_split"])
    run_dir.log(f"kNN: encoder {run_dir.encoder_name(run)}, k={FLAGS.k}, "
                f"T={FLAGS.temperature}, memory {run['dataset']}:{run['train_split']}, "
                f"queries {run['dataset']}:{run['eval_split']}, {num_classes} classes, "
                f"{FLAGS.feature_dtype} bank")
    start = time.time()
    try:
        top1, num_train, num_test = knn.evaluate_encoder_stream(
            encoder, memory, queries, num_classes, k=FLAGS.k, temperature=FLAGS.temperature,
            feature_dtype=np.dtype(FLAGS.feature_dtype))
    except ValueError as err:
        if "no examples" in str(err):
            raise run_dir.UserError(f"{run['dataset']!r}: {err}") from None
        raise
    seconds = time.time() - start
    y_train, y_test = range(num_train), range(num_test)
    payload = {
        "knn_top1": top1,
        "k": FLAGS.k,
        "temperature": FLAGS.temperature,
        "feature_dtype": FLAGS.feature_dtype,
        "encoder": run_dir.encoder_name(run),
        **run_dir.run_record(run),
        "num_train": int(len(y_train)),
        "num_test": int(len(y_test)),
        "num_classes": int(num_classes),
        "seconds": round(seconds, 1),
    }
    path = run_dir.output_path(run, "knn_eval_random_init.json" if run["random_init"]
                               else "knn_eval.json")
    run_dir.write_json(path, payload)
    run_dir.log(f"kNN top-1 (k={FLAGS.k}, T={FLAGS.temperature}) on {run['dataset']}:"
                f"{run['eval_split']}: {100 * top1:.2f}%  [{run_dir.encoder_name(run)}; "
                f"{len(y_train)} memory / {len(y_test)} queries at {run['image_size']} px; "
                f"{seconds:.1f} s] -> {path}")
    return 0


define_knn_flags()


def main():
    """Entry point of the module, of tools/knn_eval.py and of the console script."""
    _cli.run(run_dir.main_wrapper(knn_main), __name__)


if __name__ == "__main__":
    main()
