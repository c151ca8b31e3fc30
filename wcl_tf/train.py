"""Command line: absl flags -> Config -> training.run(config).

    python -m wcl_tf.train --config=demo
    python -m wcl_tf.train --config=cifar10_r18 --data_dir=DIR
    python -m wcl_tf.train --flagfile=my_run.flags --epochs=5

--config=NAME reads the config NAME that ships in the package (wcl_tf/configs/NAME.flags:
cifar10_r18, cifar10_r18_multicrop, demo, r50, r50_multicrop), from any directory.
--flagfile=PATH reads a flagfile; a --flagfile= line inside a flagfile is relative to
that flagfile's folder. Flags after --config or --flagfile override it.

This is the only module that reads flags. Every flag other than --config is a field of
`wcl_tf.config.Config`.
"""

import dataclasses
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from wcl_tf import config as config_lib  # noqa: E402
from wcl_tf import flagfiles  # noqa: E402

FLAGS = flags.FLAGS

_HELP = {
    "dataset": "'embedded_mnist' (offline, ships with the package), a TFDS name "
               "(cifar10, imagenet2012, ...) or 'folder:/path/to/images' (JPEG/PNG/GIF/BMP; "
               "class subfolders give labels; train/ and test/ subfolders give splits).",
    "data_dir": "TFDS data directory (default: TFDS's own, ~/tensorflow_datasets).",
    "download": "Let TFDS download and prepare the dataset if it is missing.",
    "train_split": "Split used for pretraining (and as kNN memory).",
    "eval_split": "Labelled split for the final kNN evaluation.",
    "image_size": "Side of the square training views, in pixels.",
    "max_train_examples": "Use only the first N training images (0: all).",
    "max_eval_examples": "Use only the first N images of each split in the kNN "
                         "evaluation (0: all).",
    "on_bad_image": "--dataset=folder:... only: 'skip' files that do not decode (counted "
                    "and named in the log) or 'fail' before training, listing them.",
    "backbone": "Encoder architecture.",
    "width": "small_cnn only: channels of its first stage.",
    "head_hidden_dim": "Hidden width H of both projection heads.",
    "head_output_dim": "Output size D of both projection heads.",
    "sync_bn": "Synchronized BatchNorm across replicas (default: on with >1 replica).",
    "init_from": "Start from the backbone and heads of this run folder's final.keras (or "
                 "a .keras file), e.g. an import of the authors' checkpoint "
                 "(wcl_tf.tools.import_torch); fresh optimizer and schedule.",
    "temperature": "Temperature tau of both losses.",
    "graph_loss_weight": "lambda, weight of the weak-label graph loss (0 = SimCLR).",
    "gather_grad": "Instance loss, other replicas' keys: local (default, the authors' "
                   "code: they are constants, only this replica's rows carry gradient) "
                   "or full (they carry gradient back to their replica, so an R-replica "
                   "step equals the 1-replica step on the same global batch). The same "
                   "at one replica.",
    "graph_key_grad": "Graph loss: give its keys gradient too. Off (default) is the "
                      "authors' code: only the anchors get the graph loss's gradient.",
    "global_batch_size": "Images per step over all replicas.",
    "epochs": "Training epochs.",
    "warmup_epochs": "Linear warm-up length, in epochs (per-step schedule).",
    "lr_scaling": "Peak LR rule: sqrt (0.075*sqrt(batch)) or linear (0.3*batch/256).",
    "base_lr": "Peak learning rate; overrides --lr_scaling.",
    "weight_decay": "LARS weight decay (BN parameters and biases excluded).",
    "momentum": "LARS momentum.",
    "trust_coefficient": "LARS trust coefficient eta.",
    "steps_per_epoch": "Steps per epoch (0: train examples // global batch).",
    "weak_aug_epochs": "Epochs that use the weaker MoCo v2 augmentation first.",
    "blur": "Gaussian blur in the augmentation: Pillow's, as the authors' (p = 0.5, sigma "
            "U(0.1, 2); off for 32 px data).",
    "augment_on": "Where jitter, grayscale and blur run: host (tf.data), device "
                  "(inside the train step; the host only decodes, crops and flips) or auto "
                  "(device when a GPU/TPU is present).",
    "num_local_crops": "Multi-crop: M small crops per image (0: two views only).",
    "local_crop_size": "Multi-crop: side of the local crops, in pixels.",
    "local_crop_scale": "Multi-crop: area range of the local crops, 'low,high'.",
    "global_crop_scale": "Multi-crop: area range of the two global views, 'low,high' "
                         "(used when num_local_crops > 0).",
    "knn_crops": "Multi-crop: K local crops kept per image, the most similar to the "
                 "image's global graph embedding (0: none).",
    "local_loss_weight": "Multi-crop: mu, weight of the kept crops' losses.",
    "model_dir": "Where checkpoints, TensorBoard logs and results go.",
    "keep_checkpoints": "Epoch checkpoints kept in model_dir/checkpoints, newest first "
                        "(0: all).",
    "strategy": "Distribution strategy.",
    "precision": "float32, mixed_bfloat16 (TPU, recent GPUs) or mixed_float16 (GPUs; "
                 "dynamic loss scaling is added). Losses stay in float32.",
    "tpu": "TPU name or address for --strategy=tpu ('' = local TPU).",
    "seed": "Random seed.",
    "knn_k": "Neighbours in the kNN evaluation.",
    "knn_temperature": "Temperature of the weighted kNN vote.",
    "eval_every_epochs": "Log kNN top-1 and weak-label purity every N epochs "
                         "(0: only after training).",
    "skip_nonfinite_steps": "Skip up to N steps whose loss or gradients are NaN/Inf "
                            "(never applied either way); 0 stops at the first one, "
                            "keeping the last epoch checkpoint.",
    "steps_per_execution": "Train steps per device call (Keras), lowered to the largest "
                           "divisor of the steps per epoch not above it; callbacks, logs and the "
                           "non-finite guard read results once per call (fewer host "
                           "syncs on GPU/TPU).",
    "verbose": "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.",
}

_ENUMS = {
    "backbone": config_lib.BACKBONES,
    "strategy": config_lib.STRATEGIES,
    "gather_grad": config_lib.GATHER_GRAD,
    "lr_scaling": config_lib.LR_SCALING,
    "precision": config_lib.PRECISIONS,
    "on_bad_image": config_lib.ON_BAD_IMAGE,
    "augment_on": config_lib.AUGMENT_ON,
}


def _define_flags():
    for field in dataclasses.fields(config_lib.Config):
        name, default, help_text = field.name, field.default, _HELP[field.name]
        if name in _ENUMS:
            flags.DEFINE_enum(name, default, _ENUMS[name], help_text)
        elif name == "sync_bn":
            flags.DEFINE_enum(name, "auto", ["auto", "true", "false"], help_text)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(x) for x in default], help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float) or name == "base_lr":
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)


_define_flags()
# Not a Config field: expand_argv replaces it by the config's lines before absl parses the
# command line. Defined so that --help lists it; it never holds a value (and so never
# appears in flags.txt).
flags.DEFINE_string(
    "config", None, "A config that ships in the package, by name, read like --flagfile: "
    f"{', '.join(flagfiles.available_configs())} (wcl_tf/configs/NAME.flags). Later "
    "flags override it.")


def config_from_flags():
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(config_lib.Config)}
    values["sync_bn"] = {"auto": None, "true": True, "false": False}[values["sync_bn"]]
    for field in dataclasses.fields(config_lib.Config):
        if isinstance(field.default, tuple):
            try:
                values[field.name] = tuple(float(x) for x in values[field.name])
            except ValueError:
                raise config_lib.ConfigError(
                    f"--{field.name} takes numbers like 0.05,0.14; got "
                    f"{','.join(values[field.name])!r}.") from None
    return config_lib.Config(**values)


def _write_flags(cfg):
    from wcl_tf import run_folder  # pylint: disable=import-outside-toplevel

    run_folder.makedirs(cfg.model_dir)  # model_dir may be a URL (gs://...).
    run_folder.write_text(run_folder.join(cfg.model_dir, run_folder.FLAGS_FILE),
                          FLAGS.flags_into_string())


def expand_argv(argv):
    """argv with --config=NAME and --flagfile=PATH expanded in place (nested flagfiles
    relative to the flagfile that names them); see wcl_tf.flagfiles."""
    return argv[:1] + flagfiles.expand_args(argv[1:])


def _parse_flags(argv):
    try:
        argv = expand_argv(argv)
    except flagfiles.FlagfileError as err:
        print(f"wcl_tf.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


def main(argv):
    if FLAGS["config"].value is not None:
        raise app.UsageError("--config is read by wcl_tf.train's command line "
                             "(entry_point); with FLAGS(argv) pass expand_argv(argv).")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags look like --name=value")
    if not FLAGS["verbosity"].present:
        # TFDS and TensorFlow log every file they open at INFO; keep the console readable.
        logging.set_verbosity(logging.WARNING)
    # Imported here so that --help answers without starting TensorFlow.
    from wcl_tf import training
    from wcl_tf.data.sources import DataError
    from wcl_tf.strategy import StrategyError

    try:
        cfg = config_from_flags().validate()
        training.run(cfg, log=lambda msg: print(msg, flush=True), on_ready=_write_flags)
    except (config_lib.ConfigError, DataError, StrategyError) as err:
        print(f"wcl_tf.train: error: {err}", file=sys.stderr)
        return 2
    except training.NonFiniteLossError as err:
        print(f"wcl_tf.train: error: {err}", file=sys.stderr)
        return 1
    except training.Preempted as err:
        # 128 + SIGTERM: what a supervisor sees when SIGTERM ends a process, so restart
        # policies act as usual (0 would mark the job done).
        print(f"wcl_tf.train: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def entry_point():
    if __name__ != "__main__":
        # The wcl-train console script: let --help show this module's docstring and flags.
        sys.modules["__main__"].__doc__ = __doc__
        for flag in FLAGS.get_key_flags_for_module(__name__):
            FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry_point()
