"""Semi-supervised evaluation: fine-tune a trained WCL encoder on 1% or 10% of the labels.

    python -m wcl_tf.tools.finetune --model_dir=runs/demo --label_fraction=0.1 --epochs=30
    python -m wcl_tf.tools.finetune --model_dir=runs/c10 --data_dir=DIR \
        --label_fraction=0.01 --subset_seed=0

The whole network (backbone in training mode, BatchNorm included, plus a new Dense head) is
trained with SGD, Nesterov momentum 0.9, cosine per step to 0, lr 0.05 * batch / 256 (SimCLR's
rule; --lr overrides), on random resized crops (scale 0.08-1) + horizontal flips. Test
top-1 / top-5 (backbone in inference mode) after every epoch.

Labelled subset: for imagenet2012 the standard subsets TFDS ships as
`imagenet2012_subset/1pct` and `imagenet2012_subset/10pct` (train split; --label_fraction
must be 0.01 or 0.1); for any other dataset a class-balanced subset of the train split
(floor(fraction * N / classes) images per class) drawn with --subset_seed. The JSON output
records the subset's source, seed, size and per-class counts.

Dataset, data_dir, image_size and splits default to <model_dir>/config.json. Writes
<model_dir>/finetune_{percent}pct.json (e.g. finetune_1pct.json; --random_init adds
_random_init: a supervised-from-scratch baseline on the same subset).
"""

import time

from absl import flags

from wcl_tf.tools import _cli, run_dir

FLAGS = flags.FLAGS
run_dir.define_run_flags()
flags.DEFINE_float("label_fraction", 0.01, "Fraction of the training labels to use, in "
                   "(0, 1]; the paper reports 0.01 and 0.1.")
flags.DEFINE_integer("subset_seed", 0, "Seed of the class-balanced subset (not used for "
                     "imagenet2012, whose subsets are fixed).")
flags.DEFINE_integer("epochs", None, "Fine-tuning epochs. Default: 60 for <= 1% of the "
                     "labels, else 30 (SimCLR).", lower_bound=1)
flags.DEFINE_float("lr", None, "Peak learning rate. Default: 0.05 * batch_size / 256.")
flags.DEFINE_float("weight_decay", 0.0, "SGD weight decay (0: none).", lower_bound=0.0)

IMAGENET = "imagenet2012"
IMAGENET_SUBSETS = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}


def _check_flags():
    if not 0.0 < FLAGS.label_fraction <= 1.0:
        raise run_dir.UserError(f"--label_fraction must be in (0, 1] (e.g. 0.01 or 0.1), got "
                                f"{FLAGS.label_fraction}.")
    if FLAGS.lr is not None and FLAGS.lr <= 0:
        raise run_dir.UserError(f"--lr must be > 0, got {FLAGS.lr}.")


def _percent(fraction):
    return f"{100 * fraction:g}"


def _labelled_subset(run, log):
    """(images, labels, subset description) of the labelled training subset."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    from wcl_tf import finetune  # pylint: disable=import-outside-toplevel
    from wcl_tf.data import eval_input, sources  # pylint: disable=import-outside-toplevel

    fraction = FLAGS.label_fraction
    start = time.time()
    if run["dataset"] == IMAGENET:
        name = IMAGENET_SUBSETS.get(fraction)
        if name is None:
            raise run_dir.UserError(
                f"imagenet2012 uses the standard TFDS subsets: --label_fraction must be "
                f"0.01 ({IMAGENET_SUBSETS[0.01]}) or 0.1 ({IMAGENET_SUBSETS[0.1]}), got "
                f"{fraction}.")
        log(f"labelled subset: the standard TFDS subset {name} (train split); "
            "--subset_seed is not used")
        images, labels = eval_input.load_arrays(name, "train", run["image_size"],
                                                run["data_dir"], run["download"],
                                                max_examples=run["max_examples"])
        subset = {"source": name, "seed": None}
    else:
        images, labels = eval_input.load_arrays(run["dataset"], run["train_split"],
                                                run["image_size"], run["data_dir"],
                                                run["download"],
                                                max_examples=run["max_examples"])
        try:
            index = finetune.label_subset(labels, fraction, seed=FLAGS.subset_seed)
        except ValueError as err:
            raise run_dir.UserError(f"cannot draw the labelled subset of "
                                    f"{run['dataset']}:{run['train_split']} "
                                    f"({len(labels)} images): {err}") from None
        images, labels = images[index], labels[index]
        subset = {"source": f"label_subset of {run['dataset']}:{run['train_split']} "
                            f"(first {run['max_examples'] or 'all'} images)",
                  "seed": FLAGS.subset_seed}
    _, _, num_classes = sources.load_split(run["dataset"], run["eval_split"], run["data_dir"],
                                           run["download"])
    subset.update({
        "fraction": fraction,
        "size": int(len(labels)),
        "per_class_counts": finetune.class_counts(labels, num_classes),
    })
    log(f"labelled subset: {subset['size']} images ({subset['source']}, seed "
        f"{subset['seed']}), per class {subset['per_class_counts']} "
        f"({time.time() - start:.1f} s)")
    if len(np.unique(labels)) < 2:
        raise run_dir.UserError("the labelled subset has fewer than 2 classes.")
    return images, labels, subset, num_classes


def _main():
    _check_flags()
    run = run_dir.resolve_run(need_checkpoint=not FLAGS.random_init)
    from wcl_tf import finetune  # pylint: disable=import-outside-toplevel
    from wcl_tf import linear_eval  # pylint: disable=import-outside-toplevel
    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    log = run_dir.log
    backbone = run_dir.load_encoder(run)
    images, labels, subset, num_classes = _labelled_subset(run, log)
    x_test, y_test = eval_input.load_arrays(run["dataset"], run["eval_split"],
                                            run["image_size"], run["data_dir"],
                                            run["download"], max_examples=run["max_examples"])

    fraction = FLAGS.label_fraction
    epochs = FLAGS.epochs or (60 if fraction <= 0.01 else 30)
    lr = FLAGS.lr or linear_eval.default_lr(run["batch_size"], finetune.FINETUNE_LR_BASE)
    settings = (f"{_percent(fraction)}% labels ({subset['size']} images, seed "
                f"{subset['seed']}), encoder {run_dir.encoder_name(run)}, {run['dataset']} "
                f"-> {run['eval_split']} ({len(y_test)}), {num_classes} classes, "
                f"{run['image_size']} px, epochs={epochs}, batch_size={run['batch_size']}, "
                f"lr={lr:.4g}, weight_decay={FLAGS.weight_decay:g}, seed={run['seed']}")
    log(f"fine-tuning: {settings}")

    start = time.time()
    result = finetune.finetune(backbone, images, labels, x_test, y_test, num_classes,
                               epochs=epochs, batch_size=run["batch_size"], lr=lr,
                               seed=run["seed"], weight_decay=FLAGS.weight_decay, log=log)
    seconds = time.time() - start

    suffix = "_random_init" if run["random_init"] else ""
    run_dir.write_classifier_results(
        run, f"finetune_{_percent(fraction)}pct{suffix}.json", f"fine-tune ({settings})",
        result, seconds, {"label_fraction": fraction, "subset": subset,
                          "num_test": int(len(y_test)), "num_classes": int(num_classes),
                          "epochs": epochs, "weight_decay": FLAGS.weight_decay})
    return 0


def main():
    """Entry point of the module, of tools/finetune.py and of the console script."""
    _cli.run(run_dir.main_wrapper(_main), __name__)


if __name__ == "__main__":
    main()
