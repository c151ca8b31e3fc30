"""Weighted kNN evaluation of a trained WCL encoder.

    python tools/knn_eval.py --model_dir=runs/demo
    python tools/knn_eval.py --model_dir=runs/c10 --data_dir=../shared/tfds --k=200 \
        --temperature=0.1 --max_examples=5000

Memory: the train split, queries: the eval split, both through the backbone in inference
mode, L2-normalised; the k nearest memory features vote with weight exp(sim / temperature)
(wcl_tf/knn.py). Dataset, data_dir, image_size and the splits default to the values in
<model_dir>/config.json (written by training). Prints the settings and the top-1, and writes
them to <model_dir>/knn_eval.json (--random_init: knn_eval_random_init.json).

This file also holds the run-directory helpers that tools/linear_eval.py and
tools/finetune.py import (flags shared by the three tools, config.json defaults, loading the
checkpoint or a randomly initialised encoder, one-line errors). Its own flags are defined
only when it runs as the main program.
"""

import json
import os
import sys
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Runs from a source checkout without installing wcl_tf.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS

CONFIG_FILE = "config.json"
FINAL_CHECKPOINT = "final.keras"
TRAIN_COMMAND = ("`python -m wcl_tf.train --flagfile=configs/demo.flags "
                 "--model_dir=runs/demo` writes runs/demo/config.json and final.keras")


class UserError(Exception):
    """A mistake in the command line or the inputs: reported in one line, no traceback."""


def define_run_flags():
    """Flags every evaluation tool has: where the run is, which data, which encoder."""
    flags.DEFINE_string("model_dir", None, "A training run directory (holds config.json and "
                        "final.keras); results are written there.")
    flags.DEFINE_string("checkpoint", None, "A .keras WCLModel checkpoint to evaluate "
                        "instead of <model_dir>/final.keras (e.g. "
                        "<model_dir>/checkpoints/epoch_005.keras).")
    flags.DEFINE_string("dataset", None, "Dataset ('embedded_mnist' or a TFDS name). "
                        "Default: dataset in config.json.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory. Default: data_dir in "
                        "config.json.")
    flags.DEFINE_integer("image_size", None, "Side of the square images, in pixels. "
                         "Default: image_size in config.json.", lower_bound=8)
    flags.DEFINE_string("train_split", None, "Labelled training split. Default: train_split "
                        "in config.json.")
    flags.DEFINE_string("eval_split", None, "Test split. Default: eval_split in config.json.")
    flags.DEFINE_bool("download", None, "Let TFDS download and prepare a missing dataset. "
                      "Default: download in config.json (else false).")
    flags.DEFINE_integer("max_examples", 0, "Use only the first N images of each split "
                         "(0: all).", lower_bound=0)
    flags.DEFINE_integer("batch_size", 256, "Batch size.", lower_bound=1)
    flags.DEFINE_bool("random_init", False, "Evaluate a randomly initialised encoder of the "
                      "run's architecture (backbone and width from config.json) instead of "
                      "the checkpoint: the baseline.")
    flags.DEFINE_integer("seed", 0, "Random seed (random_init weights, classifier "
                         "initialisation, batch order, augmentation).")
    flags.DEFINE_string("output", None, "Where to write the JSON results. Default: a file in "
                        "model_dir named after the tool.")


def one_line(err, limit=400):
    """The first line of an exception's message, at most `limit` characters."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + " ..."


def read_config(model_dir):
    """config.json of the run as a dict ({} when absent)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path!r}: {one_line(err)}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path!r} is not a JSON object of settings.")
    return config


def resolve_run(need_checkpoint=True):
    """Settings of the evaluation from the flags and config.json; no TensorFlow needed.

    need_checkpoint: whether the trained weights are used (False with --random_init or a
    raw-pixel baseline).
    """
    model_dir = FLAGS.model_dir
    if not model_dir:
        raise UserError("pass --model_dir=RUN_DIR, the directory of a training run "
                        "(e.g. --model_dir=runs/demo).")
    if not os.path.isdir(model_dir):
        raise UserError(f"model_dir {model_dir!r} not found (no such directory); {TRAIN_COMMAND}.")
    config = read_config(model_dir)

    checkpoint = None
    if need_checkpoint:
        checkpoint = FLAGS.checkpoint or os.path.join(model_dir, FINAL_CHECKPOINT)
        if not os.path.isfile(checkpoint):
            raise UserError(f"checkpoint {checkpoint!r} not found; train the model first "
                            f"({TRAIN_COMMAND}) or pass --checkpoint=PATH.keras.")
        if not zipfile.is_zipfile(checkpoint):
            raise UserError(f"{checkpoint!r} is not a .keras checkpoint (not a zip archive); "
                            "pass the final.keras written by training.")

    def setting(name, default=None):
        value = FLAGS[name].value
        if value is None:
            value = config.get(name, default)
        return value

    run = {
        "model_dir": model_dir,
        "checkpoint": checkpoint,
        "dataset": setting("dataset"),
        "data_dir": setting("data_dir"),
        "download": bool(setting("download", False)),
        "image_size": setting("image_size"),
        "train_split": setting("train_split", "train"),
        "eval_split": setting("eval_split", "test"),
        "max_examples": FLAGS.max_examples,
        "batch_size": FLAGS.batch_size,
        "random_init": FLAGS.random_init,
        "seed": FLAGS.seed,
        "backbone": config.get("backbone"),
        "width": config.get("width"),
    }
    where = f"not in {os.path.join(model_dir, CONFIG_FILE)!r}" if config else \
        f"and {os.path.join(model_dir, CONFIG_FILE)!r} does not exist"
    if not run["dataset"]:
        raise UserError(f"no dataset: pass --dataset=NAME (it is {where}).")
    if not run["image_size"]:
        raise UserError(f"no image size: pass --image_size=PIXELS (it is {where}).")
    try:
        run["image_size"] = int(run["image_size"])
    except (TypeError, ValueError):
        raise UserError(f"image_size {run['image_size']!r} in config.json is not a number; "
                        "pass --image_size.") from None
    if FLAGS.random_init and not run["backbone"]:
        raise UserError(f"--random_init needs the run's architecture (backbone, width), "
                        f"which is {where}.")
    return run


def output_path(run, name):
    return FLAGS.output or os.path.join(run["model_dir"], name)


def load_encoder(run):
    """The backbone to evaluate: from the checkpoint, or freshly initialised (--random_init)."""
    import keras  # pylint: disable=import-outside-toplevel

    from wcl_tf import export  # pylint: disable=import-outside-toplevel
    # final.keras stores the compiled LARS optimizer and its schedule: register them, or
    # loading fails with "Could not locate class 'LARS'" (export.load_checkpoint registers
    # only WCLModel).
    from wcl_tf import optimizers  # noqa: F401  pylint: disable=unused-import
    from wcl_tf.models import backbones  # pylint: disable=import-outside-toplevel

    if run["random_init"]:
        keras.utils.set_random_seed(run["seed"])
        try:
            return backbones.build_backbone(run["backbone"], width=int(run["width"] or 64))
        except ValueError as err:
            raise UserError(f"cannot build the run's backbone: {one_line(err)}") from None
    try:
        model = export.load_checkpoint(run["checkpoint"])
    except Exception as err:  # noqa: BLE001  Reported in one line: a bad or foreign file.
        raise UserError(f"cannot load {run['checkpoint']!r} as a WCL .keras checkpoint: "
                        f"{one_line(err)}") from None
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise UserError(f"{run['checkpoint']!r} holds no WCLModel (no backbone).")
    return backbone


def load_data(run, log):
    """((x_train, y_train), (x_test, y_test), num_classes) as float32 [0, 1] arrays."""
    from wcl_tf.data import sources  # pylint: disable=import-outside-toplevel

    arrays = []
    for split in (run["train_split"], run["eval_split"]):
        start = time.time()
        x, y = sources.load_arrays(run["dataset"], split, run["image_size"], run["data_dir"],
                                   run["download"], max_examples=run["max_examples"])
        log(f"loaded {run['dataset']}:{split}: {len(y)} images at {run['image_size']} px "
            f"({time.time() - start:.1f} s)")
        if len(y) == 0:
            raise UserError(f"split {split!r} of {run['dataset']!r} has no examples.")
        arrays.append((x, y))
    _, _, num_classes = sources.load_split(run["dataset"], run["eval_split"], run["data_dir"],
                                           run["download"])
    return arrays[0], arrays[1], num_classes


def encoder_name(run):
    if run["random_init"]:
        return f"randomly initialised {run['backbone']} (seed {run['seed']})"
    return run["checkpoint"]


def run_record(run):
    """The run's checkpoint and data settings, as every tool records them in its JSON."""
    return {key: run[key] for key in ("checkpoint", "random_init", "dataset", "data_dir",
                                      "train_split", "eval_split", "image_size",
                                      "max_examples")}


def accuracy_summary(result):
    """'top-1 best X% / last Y%, top-5 best Z% / last W%' of a linear/finetune result."""
    return (f"top-1 best {100 * result['top1_best']:.2f}% / last "
            f"{100 * result['top1_last']:.2f}%, top-5 best {100 * result['top5_best']:.2f}% / "
            f"last {100 * result['top5_last']:.2f}%")


def write_json(path, payload):
    try:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
    except OSError as err:
        raise UserError(f"cannot write {path!r}: {err.strerror or one_line(err)}") from None


def log(message):
    print(message, flush=True)


def main_wrapper(body):
    """An absl main that runs body() and turns user mistakes into one-line errors."""
    def main(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}; every option is a --flag.",
                  file=sys.stderr)
            return 2
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return body() or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except ValueError as err:
            from wcl_tf.data.sources import DataError  # pylint: disable=import-outside-toplevel

            if not isinstance(err, DataError):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 1
    return main


def define_knn_flags():
    define_run_flags()
    flags.DEFINE_integer("k", 200, "Neighbours that vote.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.1, "Temperature T of the vote weight exp(sim / T).",
                       lower_bound=1e-6)


def knn_main():
    run = resolve_run(need_checkpoint=not FLAGS.random_init)
    # Imported after the cheap checks, so that a wrong path fails at once.
    from wcl_tf import knn  # pylint: disable=import-outside-toplevel

    encoder = load_encoder(run)
    (x_train, y_train), (x_test, y_test), num_classes = load_data(run, log)
    log(f"kNN: encoder {encoder_name(run)}, k={FLAGS.k}, T={FLAGS.temperature}, "
        f"memory {run['dataset']}:{run['train_split']} ({len(y_train)}), queries "
        f"{run['dataset']}:{run['eval_split']} ({len(y_test)}), {num_classes} classes")
    start = time.time()
    top1 = knn.evaluate_encoder(encoder, x_train, y_train, x_test, y_test, num_classes,
                                k=FLAGS.k, temperature=FLAGS.temperature,
                                batch_size=run["batch_size"])
    seconds = time.time() - start
    payload = {
        "knn_top1": top1,
        "k": FLAGS.k,
        "temperature": FLAGS.temperature,
        "encoder": encoder_name(run),
        **run_record(run),
        "num_train": int(len(y_train)),
        "num_test": int(len(y_test)),
        "num_classes": int(num_classes),
        "seconds": round(seconds, 1),
    }
    path = output_path(run, "knn_eval_random_init.json" if run["random_init"]
                       else "knn_eval.json")
    write_json(path, payload)
    log(f"kNN top-1 (k={FLAGS.k}, T={FLAGS.temperature}) on {run['dataset']}:"
        f"{run['eval_split']}: {100 * top1:.2f}%  [{encoder_name(run)}; "
        f"{len(y_train)} memory / {len(y_test)} queries at {run['image_size']} px; "
        f"{seconds:.1f} s] -> {path}")
    return 0


if __name__ == "__main__":
    define_knn_flags()
    app.run(main_wrapper(knn_main))
