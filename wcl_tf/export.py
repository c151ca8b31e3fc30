"""Serving SavedModel of the WCL encoder f (the backbone), and loaders around it.

`export_encoder(model, path, image_size)` writes a TensorFlow SavedModel that needs neither
wcl_tf nor Keras to run (`tf.saved_model.load(path)` is enough):

    signatures["serving_default"](images=uint8 (b, h, w, 3), any h, w)
        -> the recorded preprocessing to (image_size, image_size) -> / 255
        -> backbone(training=False) -> {"features": float32 (b, C)}

    preprocessing "resize_center_crop" (default when image_size > 64, i.e. trained at
        ImageNet-like sizes): the evaluation's test-time preprocessing
        (wcl_tf.data.eval_input.eval_image): square inputs of side <= image_size are
        resized bilinearly to it; any other input has its shorter side resized to
        round(image_size * 256 / 224) (antialiased bilinear, rounded like PIL) and the
        central image_size x image_size window is cut (the authors' Resize(256) +
        CenterCrop(224));
    preprocessing "squash" (default at image_size <= 64): bilinear resize straight to
        (image_size, image_size) (tf.image.resize, antialias=False, half-pixel centres; no
        crop, the aspect ratio is not kept).

    signatures["preprocessed"](images=float32 (b, image_size, image_size, 3) in [0, 1])
        -> backbone(training=False) -> {"features": float32 (b, C)}

The ImageNet mean/std normalisation is the backbone's first layer, so it is inside both
signatures: callers never normalise. The same contract is written to
`assets/wcl_preprocessing.json` and returned by `export_encoder`.

The restored object also has two plain tf.functions that return the features tensor itself
rather than a dict: `serve(uint8 images)` and `preprocessed(float32 images)`. The second is
what `keras.layers.TFSMLayer(path, call_endpoint="preprocessed")` picks (TFSMLayer prefers an
attribute over a signature of the same name), so a Keras 3 model can be stacked on it
directly (see `load_encoder_for_finetuning`).

Why a `tf.Module` and `tf.saved_model.save` rather than Keras `model.export()`: the Keras
export archive stores every variable twice (docs/method.md section 9); this module stores each
once (`variable_bytes` vs the size of `variables/`, checked in tests/test_export.py).

Paths may be local or URLs (gs://..., ram://...): files go through wcl_tf.run_folder and
tf.io.gfile, and `tf.saved_model.save` / `tf.saved_model.load` take URLs themselves.
"""

import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from wcl_tf import run_folder
from wcl_tf.models import backbones

PREPROCESSING_ASSET = "wcl_preprocessing.json"
SIGNATURES = ("serving_default", "preprocessed")
RESIZE_METHOD = "bilinear"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
PREPROCESSING = ("resize_center_crop", "squash")
# Above this training image size the serving signature defaults to resize + centre crop.
CENTER_CROP_ABOVE = 64
# A Keras model of this name (backbone + Dense, written by wcl_tf.tools.import_torch from a
# linear-evaluation checkpoint) is exported with the output "logits" instead of "features".
CLASSIFIER_NAME = "linear_classifier"


def default_preprocessing(image_size):
    """'resize_center_crop' for models trained above 64 px (ImageNet-like), else 'squash'."""
    return "resize_center_crop" if int(image_size) > CENTER_CROP_ABOVE else "squash"


def _backbone_of(model):
    """The encoder keras.Model: `model.backbone` of a WCLModel, else `model` itself."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        return backbone
    if isinstance(model, keras.Model):
        return model
    raise TypeError(
        f"export_encoder needs a WCLModel or a backbone keras.Model, got {type(model).__name__}.")


def variable_bytes(model):
    """Bytes of all variables (trainable and not) of `model`, each counted once."""
    seen, total = set(), 0
    for v in model.variables:
        key = id(v)
        if key in seen:
            continue
        seen.add(key)
        total += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    return total


def directory_bytes(path):
    """Total size of the files under `path` (a local folder or a URL)."""
    return run_folder.directory_bytes(path)


def saved_variable_bytes(path):
    """{checkpoint key: stored bytes} of the variables of the SavedModel at `path`.

    Besides one entry per variable, the checkpoint holds `_CHECKPOINTABLE_OBJECT_GRAPH`, a
    serialised proto describing the object graph (7.6 KB for the tiny test CNN, 31 KB for
    resnet18_cifar), under OBJECT_GRAPH_KEY.
    """
    # Not tf.train.load_checkpoint: it asks gfile.isdir first, and on ram:// any name
    # prefix ("variables/variables" of "variables/variables.index") is a directory.
    reader = tf.compat.v1.train.NewCheckpointReader(
        run_folder.join(path, "variables", "variables"))
    sizes = {}
    for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)
        sizes[key] = len(value) if isinstance(value, bytes) else int(value.nbytes)
    return sizes


def _resize_record(image_size, preprocessing):
    if preprocessing == "squash":
        return {
            "mode": "direct",
            "method": RESIZE_METHOD,
            "antialias": False,
            "half_pixel_centers": True,
            "note": "tf.image.resize of the whole image straight to image_size x image_size "
                    "(no shorter-side resize, no centre crop, aspect ratio not kept)",
        }
    from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

    return {
        "mode": "resize_center_crop",
        "method": RESIZE_METHOD,
        "antialias": True,
        "resize_shorter_side_to": eval_input.resize_size(image_size),
        "center_crop": int(image_size),
        "note": f"square inputs of side <= {image_size}: bilinear resize to it (no "
                f"antialias); others: shorter side resized to "
                f"{eval_input.resize_size(image_size)} (round({image_size} * 256 / 224); the "
                f"longer side int({eval_input.resize_size(image_size)} * long / short)), "
                f"antialiased bilinear rounded to uint8 values, then the central "
                f"{image_size} x {image_size} window (offsets round((side - "
                f"{image_size}) / 2)): the evaluation's test-time preprocessing",
    }


def preprocessing_spec(image_size, feature_dim, mean_std_note=None, preprocessing=None,
                       output_name="features"):
    """The preprocessing contract of an exported encoder, as a JSON-ready dict."""
    preprocessing = preprocessing or default_preprocessing(image_size)
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got "
                         f"{preprocessing!r}.")
    return {
        "preprocessing": preprocessing,
        "image_size": int(image_size),
        "feature_dim": int(feature_dim),
        "signatures": {
            "serving_default": {
                "input": "images: uint8 (b, h, w, 3), RGB, any h and w",
                "output": f"{output_name}: float32 (b, C)",
            },
            "preprocessed": {
                "input": f"images: float32 (b, {image_size}, {image_size}, 3), RGB in [0, 1]",
                "output": f"{output_name}: float32 (b, C)",
            },
        },
        "value_range": "serving_default: uint8 [0, 255], divided by 255 after resizing; "
                       "preprocessed: float32 [0, 1]",
        "resize": _resize_record(image_size, preprocessing),
        "normalization": {
            "inside_model": True,
            "mean": list(backbones.IMAGENET_MEAN),
            "std": list(backbones.IMAGENET_STD),
            "note": mean_std_note or "ImageNet mean/std normalisation is the backbone's "
                                     "first layer: do not normalise the inputs yourself",
        },
        "batch_norm": "inference mode (moving statistics) in every endpoint",
    }


class _EncoderModule(tf.Module):
    """Holds the backbone (its variables once) and the serving functions."""

    def __init__(self, backbone, image_size, asset_file, preprocessing="squash",
                 output_name="features"):
        super().__init__(name="wcl_encoder")
        self.output_name = output_name
        self.backbone = backbone
        self.image_size = int(image_size)
        self.preprocessing_mode = preprocessing
        self.preprocessing_asset = tf.saved_model.Asset(asset_file)
        size = self.image_size
        self.preprocessed = tf.function(
            self._encode,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        self.serve = tf.function(
            self._serve,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])

    def _encode(self, images):
        features = self.backbone(images, training=False)
        return tf.cast(features, tf.float32)  # (b, C), also under mixed precision

    def _serve(self, images):
        if self.preprocessing_mode == "squash":
            x = tf.image.resize(tf.cast(images, tf.float32),
                                [self.image_size, self.image_size], method=RESIZE_METHOD,
                                antialias=False)
            return self._encode(x / 255.0)
        from wcl_tf.data import eval_input  # pylint: disable=import-outside-toplevel

        size = self.image_size
        shape = tf.shape(images)
        small_square = tf.logical_and(tf.equal(shape[1], shape[2]), shape[1] <= size)
        x = tf.cond(
            small_square,
            lambda: tf.image.resize(tf.cast(images, tf.float32), [size, size],
                                    method=RESIZE_METHOD, antialias=False),
            lambda: eval_input.resize_center_crop(images, size))
        x = tf.reshape(x, [-1, size, size, 3])
        return self._encode(tf.clip_by_value(x / 255.0, 0.0, 1.0))

    def signature_functions(self):
        """{"serving_default", "preprocessed"}: the dict-returning signature functions."""
        size = self.image_size

        @tf.function(input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def serving_default(images):
            return {self.output_name: self._serve(images)}

        @tf.function(input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def preprocessed(images):
            return {self.output_name: self._encode(images)}

        return {"serving_default": serving_default, "preprocessed": preprocessed}


def export_encoder(model, path, image_size, mean_std_note=None, preprocessing=None):
    """Writes the encoder of `model` as a serving SavedModel at `path`.

    Args:
      model: a WCLModel (its `backbone` is exported) or a backbone keras.Model mapping
        float32 images in [0, 1] to pooled features (b, C).
      path: output directory (created; an existing SavedModel there is overwritten).
      image_size: side of the square images the encoder expects, in pixels.
      mean_std_note: optional text recorded with the normalisation in the asset.
      preprocessing: what `serving_default` does to the uint8 images, "resize_center_crop"
        or "squash" (module doc); None: default_preprocessing(image_size). Recorded in the
        asset as "preprocessing".
    Returns:
      The preprocessing dict also written to `path/assets/wcl_preprocessing.json`, with
      `variable_bytes` (the backbone's variable bytes), `variables_dir_bytes` (size of
      `path/variables/`) and `object_graph_bytes` (the part of it that describes the
      object graph rather than storing values) added.
    """
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    backbone = _backbone_of(model)
    # A classifier (backbone + Dense) answers "logits"; an encoder "features".
    output_name = "logits" if backbone.name == CLASSIFIER_NAME else "features"
    if not backbone.built:
        backbone(tf.zeros([1, image_size, image_size, 3]))
    feature_dim = int(backbone.output_shape[-1])
    spec = preprocessing_spec(image_size, feature_dim, mean_std_note, preprocessing,
                              output_name)

    with tempfile.TemporaryDirectory() as tmp:
        asset_file = os.path.join(tmp, PREPROCESSING_ASSET)
        with open(asset_file, "w") as f:
            json.dump(spec, f, indent=2, sort_keys=True)
        module = _EncoderModule(backbone, image_size, asset_file, spec["preprocessing"],
                                output_name)
        tf.saved_model.save(module, path, signatures=module.signature_functions())

    spec = dict(spec)
    spec["variable_bytes"] = variable_bytes(backbone)
    spec["variables_dir_bytes"] = directory_bytes(run_folder.join(path, "variables"))
    spec["object_graph_bytes"] = saved_variable_bytes(path).get(OBJECT_GRAPH_KEY, 0)
    return spec


def read_preprocessing(path):
    """The preprocessing dict stored with an exported encoder."""
    return json.loads(run_folder.read_text(run_folder.join(path, "assets", PREPROCESSING_ASSET)))


def load_encoder_for_finetuning(path, trainable=True, name="wcl_encoder"):
    """The exported encoder as a Keras 3 layer on the `preprocessed` endpoint.

    The layer maps float32 images (b, S, S, 3) in [0, 1] (S = the exported image_size) to
    features (b, C), with the backbone's variables as its weights (trainable unless
    `trainable=False`). BatchNorm stays in inference mode (moving statistics are frozen).

        encoder = load_encoder_for_finetuning("exports/demo")
        S = read_preprocessing("exports/demo")["image_size"]
        classifier = keras.Sequential([
            keras.Input((S, S, 3)), encoder, keras.layers.Dense(10)])

    A model holding a TFSMLayer reloads from `.keras` only with `safe_mode=False`
    (it executes the graph stored in the SavedModel).
    """
    return EncoderLayer(path, call_endpoint="preprocessed", trainable=trainable, name=name)


@keras.saving.register_keras_serializable(package="wcl_tf")
class EncoderLayer(keras.layers.TFSMLayer):
    """keras.layers.TFSMLayer whose weights have valid Keras names.

    Keras 3.15 names each wrapped weight after the TF variable, ":0" included, and
    optimizers with per-weight state (momentum, Adam) then fail with "'..._kernel:0_momentum'
    is not a valid scope name". This drops the ":0".
    """

    def _add_existing_weight(self, weight):
        variable = keras.Variable(
            initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
            shape=weight.shape, name=weight.name.split(":")[0].replace("/", "_"))
        self._track_variable(variable)


def load_checkpoint(path):
    """A WCLModel from a `.keras` file saved by training (safe mode on; local or URL)."""
    import wcl_tf.models.wcl_model  # noqa: F401  Registers WCLModel for deserialisation.

    return run_folder.load_model(path, safe_mode=True)
