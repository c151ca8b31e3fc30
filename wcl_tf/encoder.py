"""A frozen image encoder loaded from a run folder, a checkpoint or an exported SavedModel.

`load_encoder(...)` gives an `Encoder` from a run folder (its final.keras or another
checkpoint, or a randomly initialised encoder of the run's architecture) or from an
exported SavedModel (wcl_tf.export). The Encoder maps images through the evaluation
preprocessing (wcl_tf.data.eval_input: resize + centre crop, or the export's "squash" for
small models) to features, and carries a fingerprint of its weights, which the embeddings
written by wcl_tf.embedding record.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf

from wcl_tf import export, run_folder
from wcl_tf.data import eval_input
from wcl_tf.embed_errors import EmbedError, first_line

FEATURES = ("backbone", "instance_head", "graph_head")


class Encoder:
    """A frozen image encoder: `fn` maps float32 (b, S, S, 3) in [0, 1] to float32 (b, C).

    image_size: S; preprocessing: "resize_center_crop" or "squash" (what the uint8 images
    go through, see wcl_tf.export); record: JSON-ready description of where it came from,
    including `fingerprint`, a hash of the encoder's variables (order-independent), which
    identifies the weights whether they came from a checkpoint or its export.
    """

    def __init__(self, fn, image_size, preprocessing, record, variables):
        self.fn = fn
        self.image_size = int(image_size)
        self.preprocessing = preprocessing
        self.record = dict(record)
        self.record.setdefault("fingerprint", fingerprint(variables))
        self.record.update(image_size=self.image_size, preprocessing=preprocessing)

    @property
    def fingerprint(self):
        return self.record["fingerprint"]

    def describe(self):
        source = self.record.get("saved_model") or self.record.get("checkpoint")
        if self.record.get("random_init"):
            source = (f"randomly initialised {self.record.get('backbone')} (seed "
                      f"{self.record.get('seed')})")
        return (f"{source} [{self.record['features']}, {self.image_size} px, "
                f"{self.preprocessing}]")

    def preprocess(self, image):
        """uint8 (h, w, 3) -> float32 (S, S, 3) in [0, 1]: the evaluation preprocessing."""
        if self.preprocessing == "squash":
            out = eval_input.squash_image(image, self.image_size)
            out.set_shape([self.image_size, self.image_size, 3])
            return out
        return eval_input.eval_image(image, self.image_size)


def fingerprint(variables):
    """sha256 over the sorted per-variable digests (shape and bytes) of `variables`."""
    digests = sorted(
        hashlib.sha256(repr(tuple(v.shape)).encode() + np.ascontiguousarray(
            np.asarray(v.numpy() if hasattr(v, "numpy") else v)).tobytes()).hexdigest()
        for v in variables)
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _where(path):
    """`path` made absolute when local (the manifest is read from other folders), a URL
    as given."""
    if not path or run_folder.is_remote(path):
        return path
    return os.path.abspath(path)


def _keras_encoder(model, features):
    backbone = model.backbone
    if features == "backbone":
        layers = [backbone]
    else:
        layers = [backbone, getattr(model, features)]

    @tf.function(reduce_retracing=True)
    def fn(images):
        x = images
        for layer in layers:
            x = layer(x, training=False)
        return tf.cast(x, tf.float32)

    variables = [v for layer in layers for v in layer.variables]
    return fn, variables


def load_encoder(model_dir=None, checkpoint=None, saved_model=None, features="backbone",
                 random_init=False, seed=0, image_size=None, preprocessing=None):
    """An Encoder from a run folder (model_dir: its config.json and final.keras, or
    `checkpoint`), from a SavedModel written by wcl_tf.export (`saved_model`), or, with
    random_init, a freshly initialised encoder of the run's architecture (the baseline).

    image_size / preprocessing override the run's (config.json, export's default rule);
    a SavedModel's are its own. Raises EmbedError with a one-line message."""
    if features not in FEATURES:
        raise EmbedError(f"features must be one of {', '.join(FEATURES)}, got {features!r}.")
    if saved_model:
        return _load_saved_model(saved_model, features)
    if not model_dir and not checkpoint:
        raise EmbedError("no encoder: pass a run folder (--model_dir=RUN_DIR), a checkpoint "
                         "(--checkpoint=PATH.keras) or an export (--saved_model=EXPORT_DIR).")
    config = {}
    if model_dir:
        if not run_folder.isdir(model_dir):
            raise EmbedError(f"model_dir {model_dir!r} not found (no such directory).")
        try:
            config = run_folder.read_config(model_dir) or {}
        except (*run_folder.file_errors(), ValueError) as err:
            raise EmbedError(f"cannot read the config.json of {model_dir!r}: "
                             f"{first_line(err)}") from None
    image_size = int(image_size or config.get("image_size") or 0)
    if not image_size:
        raise EmbedError("no image size: the run folder has no config.json with image_size; "
                         "pass --image_size=PIXELS.")
    preprocessing = preprocessing or export.default_preprocessing(image_size)
    record = {"features": features}
    if random_init:
        if not config.get("backbone"):
            raise EmbedError(f"random_init needs the run's architecture (backbone, width) "
                             f"from {model_dir!r}/config.json, which has none.")
        if features != "backbone":
            raise EmbedError("random_init embeds with the backbone only (--features=backbone).")
        import keras  # pylint: disable=import-outside-toplevel

        from wcl_tf.models import backbones  # pylint: disable=import-outside-toplevel

        keras.utils.set_random_seed(int(seed))
        backbone = backbones.build_backbone(config["backbone"],
                                            width=int(config.get("width") or 64))
        backbone(tf.zeros([1, image_size, image_size, 3]))

        @tf.function(reduce_retracing=True)
        def fn(images):
            return tf.cast(backbone(images, training=False), tf.float32)

        record.update(random_init=True, seed=int(seed), backbone=config["backbone"],
                      width=config.get("width"), model_dir=_where(model_dir))
        return Encoder(fn, image_size, preprocessing, record, backbone.variables)

    checkpoint = checkpoint or run_folder.join(model_dir, run_folder.FINAL_CHECKPOINT)
    if not run_folder.isfile(checkpoint):
        raise EmbedError(f"no model in {model_dir or run_folder.parent(checkpoint)!r}: "
                         f"{checkpoint!r} not found. Train first (python -m wcl_tf.train "
                         "--config=demo --model_dir=runs/demo) or pass --checkpoint or "
                         "--saved_model.")
    if not run_folder.is_zip(checkpoint):
        raise EmbedError(f"{checkpoint!r} is not a .keras checkpoint (not a zip archive).")
    # Registers LARS and its schedule, which final.keras stores with the model.
    from wcl_tf import optimizers  # noqa: F401  pylint: disable=unused-import

    try:
        model = export.load_checkpoint(checkpoint)
    except Exception as err:  # noqa: BLE001  Reported in one line: a bad or foreign file.
        raise EmbedError(f"cannot load {checkpoint!r} as a WCL .keras checkpoint: "
                         f"{first_line(err)}") from None
    if getattr(model, "backbone", None) is None:
        raise EmbedError(f"{checkpoint!r} holds no WCLModel (no backbone).")
    fn, variables = _keras_encoder(model, features)
    record.update(checkpoint=_where(checkpoint), model_dir=_where(model_dir),
                  random_init=False)
    return Encoder(fn, image_size, preprocessing, record, variables)


def _load_saved_model(path, features):
    if features != "backbone":
        raise EmbedError(f"an exported encoder gives the backbone's features only; pass "
                         f"--features=backbone (not {features!r}) or use --model_dir.")
    if not run_folder.isdir(path):
        raise EmbedError(f"saved_model {path!r} not found (no such directory).")
    try:
        spec = export.read_preprocessing(path)
        loaded = tf.saved_model.load(path)
    except Exception as err:  # noqa: BLE001  A folder that is not a wcl_tf export.
        raise EmbedError(f"{path!r} is not an encoder exported by wcl_tf.tools.export: "
                         f"{first_line(err)}") from None
    signature = loaded.signatures["preprocessed"]

    def fn(images):
        return signature(images=images)["features"]

    record = {"features": features, "saved_model": _where(path), "random_init": False}
    reader = tf.compat.v1.train.NewCheckpointReader(
        run_folder.join(path, "variables", "variables"))
    variables = [reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
                 if key != export.OBJECT_GRAPH_KEY]
    encoder = Encoder(fn, spec["image_size"], spec["preprocessing"], record, variables)
    encoder.loaded = loaded  # keeps the restored variables alive
    return encoder
