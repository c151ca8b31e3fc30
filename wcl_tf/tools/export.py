"""Export the encoder of a trained WCL checkpoint as a serving SavedModel.

    python -m wcl_tf.tools.export --model_dir=runs/demo --export_dir=exports/demo
    python -m wcl_tf.tools.export --checkpoint=runs/demo/final.keras --export_dir=exports/demo \
        --image_size=28

--model_dir uses <model_dir>/final.keras and reads image_size from <model_dir>/config.json
(written by training); --image_size overrides it. The SavedModel has the signatures
`serving_default` (uint8 images of any size) and `preprocessed` (float32 images in [0, 1] at
image_size); see wcl_tf/export.py. --preprocessing says what serving_default does to the
uint8 images: resize_center_crop (the evaluation's test-time preprocessing, shorter side to
round(S * 256 / 224) then the central S x S; the default above 64 px) or squash (bilinear
straight to S x S; the default at 64 px and below); it is recorded in
assets/wcl_preprocessing.json. Prints the signatures, the export size and the variable
bytes. Every path may also be a URL (gs://bucket/run): files go through wcl_tf.run_folder.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import flags, logging  # noqa: E402

from wcl_tf import run_folder  # noqa: E402  (imports TensorFlow only when used)
from wcl_tf.tools import _cli  # noqa: E402
from wcl_tf.tools.run_dir import CONFIG_FILE, FINAL_CHECKPOINT, UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A .keras WCLModel checkpoint (e.g. "
                    "runs/demo/final.keras). Default: <model_dir>/final.keras.")
flags.DEFINE_string("model_dir", None, "A training run directory: uses its final.keras and "
                    "the image_size in its config.json.")
flags.DEFINE_string("export_dir", None, "Where to write the SavedModel. "
                    "Default: <model_dir>/export.")
flags.DEFINE_integer("image_size", None, "Side of the square images the encoder expects, "
                     "in pixels. Default: image_size from config.json.", lower_bound=1)
flags.DEFINE_enum("preprocessing", None, ["resize_center_crop", "squash"], "What the "
                  "serving_default signature does to uint8 images of any size. Default: "
                  "resize_center_crop when image_size > 64, else squash.")
flags.DEFINE_string("mean_std_note", None, "Optional note stored with the normalisation in "
                    "assets/wcl_preprocessing.json.")

def _resolve_paths():
    """(checkpoint, export_dir, image_size) from the flags and config.json."""
    if not FLAGS.checkpoint and not FLAGS.model_dir:
        raise UserError("pass --checkpoint=PATH.keras or --model_dir=RUN_DIR "
                        "(e.g. --model_dir=runs/demo).")
    checkpoint = FLAGS.checkpoint or run_folder.join(FLAGS.model_dir, FINAL_CHECKPOINT)
    if not run_folder.isfile(checkpoint):
        raise UserError(
            f"checkpoint {checkpoint!r} not found; train a model first, e.g. "
            "`python -m wcl_tf.train --config=demo --model_dir=runs/demo` "
            "writes runs/demo/final.keras.")
    if not run_folder.is_zip(checkpoint):
        raise UserError(f"{checkpoint!r} is not a .keras checkpoint (not a zip archive); "
                        "pass the final.keras written by training.")
    export_dir = FLAGS.export_dir
    if not export_dir:
        if not FLAGS.model_dir:
            raise UserError("pass --export_dir=DIR (where to write the SavedModel).")
        export_dir = run_folder.join(FLAGS.model_dir, run_folder.EXPORT_DIR)
    if run_folder.isfile(export_dir):
        raise UserError(f"--export_dir {export_dir!r} is a file; name a directory.")

    image_size = FLAGS.image_size
    config_dirs = [FLAGS.model_dir] if FLAGS.model_dir else []
    config_dirs.append(run_folder.parent(checkpoint))
    if image_size is None:
        for directory in config_dirs:
            path = run_folder.join(directory, CONFIG_FILE)
            if run_folder.isfile(path):
                try:
                    image_size = int(run_folder.read_config(directory)["image_size"])
                except (*run_folder.file_errors(), ValueError, KeyError, TypeError) as err:
                    raise UserError(f"cannot read image_size from {path!r} ({err!r}); "
                                    "pass --image_size.") from None
                break
    if image_size is None:
        raise UserError(f"no {CONFIG_FILE} next to {checkpoint!r}: pass --image_size "
                        "(the training image size, e.g. --image_size=28).")
    return checkpoint, export_dir, image_size


def _describe_signatures(export_dir):
    """Lines describing each signature of the written SavedModel (reloaded from disk)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(export_dir)
    lines = []
    for name, fn in loaded.signatures.items():
        inputs = fn.structured_input_signature[1]
        ins = ", ".join(f"{k}: {v.dtype.name} {tuple(v.shape)}" for k, v in inputs.items())
        outs = ", ".join(f"{k}: {v.dtype.name} {tuple(v.shape)}"
                         for k, v in fn.structured_outputs.items())
        lines.append(f"  {name}({ins}) -> {{{outs}}}")
    return lines


def _mib(n):
    return f"{n / 2**20:.2f} MiB ({n:,} bytes)"


def _main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; every option is a --flag.",
              file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines while saving.
    try:
        checkpoint, export_dir, image_size = _resolve_paths()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    from wcl_tf import export

    try:
        model = export.load_checkpoint(checkpoint)
    except Exception as err:  # noqa: BLE001  Reported in one line: a bad or foreign file.
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot load {checkpoint!r} as a WCL .keras checkpoint: {message}",
              file=sys.stderr)
        return 1
    try:
        spec = export.export_encoder(model, export_dir, image_size,
                                     mean_std_note=FLAGS.mean_std_note,
                                     preprocessing=FLAGS.preprocessing)
    except (*run_folder.file_errors(), TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot export to {export_dir!r}: {message}", file=sys.stderr)
        return 1

    print(f"Exported the encoder of {checkpoint} to {export_dir} "
          f"(image_size {image_size}, {spec['feature_dim']} features, serving "
          f"preprocessing {spec['preprocessing']}).")
    print("Signatures:")
    for line in _describe_signatures(export_dir):
        print(line)
    print("Preprocessing: "
          f"{run_folder.join(export_dir, 'assets', export.PREPROCESSING_ASSET)}")
    print(f"Export size:    {_mib(export.directory_bytes(export_dir))}")
    print(f"variables/:     {_mib(spec['variables_dir_bytes'])} "
          f"({spec['variables_dir_bytes'] / spec['variable_bytes']:.3f}x the variable bytes; "
          f"{spec['object_graph_bytes']:,} bytes of it describe the object graph)")
    print(f"Variable bytes: {_mib(spec['variable_bytes'])}")
    return 0



def main():
    """Entry point of the module, of tools/export.py and of the console script."""
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
