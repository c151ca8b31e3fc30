"""Run-directory helpers shared by the evaluation tools (knn_eval, linear_eval, finetune).

The flags every evaluation tool has (define_run_flags), config.json defaults, loading the
checkpoint or a randomly initialised encoder, the data, JSON output and one-line errors.
Run folders are read and written through wcl_tf.run_folder, so --model_dir, --checkpoint
and --output may be URLs (gs://...) as well as local paths.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import flags, logging  # noqa: E402

from wcl_tf import run_folder  # noqa: E402  (imports TensorFlow only when used)

FLAGS = flags.FLAGS

CONFIG_FILE = run_folder.CONFIG_FILE
FINAL_CHECKPOINT = run_folder.FINAL_CHECKPOINT
TRAIN_COMMAND = ("`python -m wcl_tf.train --config=demo --model_dir=runs/demo` writes "
                 "runs/demo/config.json and final.keras")


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
    path = run_folder.join(model_dir, CONFIG_FILE)
    try:
        config = run_folder.read_config(model_dir)
    except (*run_folder.file_errors(), ValueError) as err:
        raise UserError(f"cannot read {path!r}: {one_line(err)}") from None
    return {} if config is None else config


def resolve_run(need_checkpoint=True):
    """Settings of the evaluation from the flags and config.json (no model is built).

    need_checkpoint: whether the trained weights are used (False with --random_init or a
    raw-pixel baseline).
    """
    model_dir = FLAGS.model_dir
    if not model_dir:
        raise UserError("pass --model_dir=RUN_DIR, the directory of a training run "
                        "(e.g. --model_dir=runs/demo).")
    if not run_folder.isdir(model_dir):
        raise UserError(f"model_dir {model_dir!r} not found (no such directory); {TRAIN_COMMAND}.")
    config = read_config(model_dir)

    checkpoint = None
    if need_checkpoint:
        checkpoint = FLAGS.checkpoint or run_folder.join(model_dir, FINAL_CHECKPOINT)
        if not run_folder.isfile(checkpoint):
            raise UserError(f"checkpoint {checkpoint!r} not found; train the model first "
                            f"({TRAIN_COMMAND}) or pass --checkpoint=PATH.keras.")
        if not run_folder.is_zip(checkpoint):
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
    config_path = run_folder.join(model_dir, CONFIG_FILE)
    where = f"not in {config_path!r}" if config else f"and {config_path!r} does not exist"
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
    return FLAGS.output or run_folder.join(run["model_dir"], name)


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
    from wcl_tf.data import eval_input, sources  # pylint: disable=import-outside-toplevel

    arrays = []
    for split in (run["train_split"], run["eval_split"]):
        start = time.time()
        x, y = eval_input.load_arrays(run["dataset"], split, run["image_size"],
                                      run["data_dir"], run["download"],
                                      max_examples=run["max_examples"])
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


ACCURACY_KEYS = ("top1_best", "top1_last", "top5_best", "top5_last")


def accuracy_summary(result):
    """'top-1 best X% / last Y%, top-5 best Z% / last W%' of a linear/finetune result."""
    return (f"top-1 best {100 * result['top1_best']:.2f}% / last "
            f"{100 * result['top1_last']:.2f}%, top-5 best {100 * result['top5_best']:.2f}% / "
            f"last {100 * result['top5_last']:.2f}%")


def write_classifier_results(run, name, title, result, seconds, fields, encoder=None):
    """Writes the JSON of a trained classifier's evaluation (linear probe, fine-tuning) to
    output_path(run, name) and logs `title: <accuracy_summary> [seconds] -> path`.

    The JSON holds the tool's own `fields` first, then what every such tool records: the
    best and last top-1 / top-5, the encoder (default: encoder_name(run)), run_record(run),
    batch size, the learning rate used (result["lr"]), seed, seconds and the per-epoch
    history. Returns the path.
    """
    payload = {
        **fields,
        **{key: result[key] for key in ACCURACY_KEYS},
        "encoder": encoder or encoder_name(run),
        **run_record(run),
        "batch_size": run["batch_size"],
        "lr": result["lr"],
        "seed": run["seed"],
        "seconds": round(seconds, 1),
        "history": result["history"],
    }
    path = output_path(run, name)
    write_json(path, payload)
    log(f"{title}: {accuracy_summary(result)}  [{seconds:.1f} s] -> {path}")
    return path


def write_json(path, payload):
    try:
        run_folder.makedirs(run_folder.parent(path))
        run_folder.write_json(path, payload)
    except run_folder.file_errors() as err:
        raise UserError(f"cannot write {path!r}: {run_folder.error_text(err)}") from None


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
