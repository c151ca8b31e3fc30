"""Embeddings of a collection of images with a trained encoder, written as shards.

`load_encoder(...)` gives an `Encoder` from a run folder (its final.keras or another
checkpoint, or a randomly initialised encoder of the run's architecture) or from an
exported SavedModel (wcl_tf.export). `embed_to_folder(encoder, source, out)` streams every
image of `source` (an `ImageFolder` or a `TfdsSplit`) through the evaluation preprocessing
(wcl_tf.data.eval_input: resize + centre crop, or the export's "squash" for small models)
and the encoder in inference mode, on every device of a tf.distribute strategy, and writes
to the folder `out`:

    manifest.json          what was embedded and how (the encoder and its fingerprint, the
                           features, normalisation, dtype, source, the listing's hash) and
                           the complete shards; rewritten (tmp + rename) after each shard,
                           so it is the commit point of a resumable run
    embeddings-NNNNN.npy   float16 or float32 (rows, C): `np.load` reads it, and a float32
                           shard is what faiss's `index.add` takes as it is
    files-NNNNN.csv        one row per embedding: path (relative to the images folder),
                           class (the class folder, or "" without class subfolders),
                           height, width (of the decoded file)

Shard i covers the entries [i * shard_size, (i + 1) * shard_size) of the listing (the
files in sorted order, class by class, as training lists them), so a killed run resumes
after its last complete shard and a rerun writes the same files as an uninterrupted run.
Files that do not decode are skipped and listed in the manifest (on_bad_image="skip", as
in training) or stop the run (on_bad_image="fail"). Only one shard's rows are held: memory
does not grow with the number of images.

`read_embeddings(out)` reads the shards back: (array (N, C), list of file rows, manifest).
"""

import csv
import hashlib
import io
import json
import os
import time

import numpy as np
import tensorflow as tf

from wcl_tf import export, run_folder
from wcl_tf.data import eval_input, folder, sources
from wcl_tf.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "wcl_tf-embeddings-1"
FEATURES = ("backbone", "instance_head", "graph_head")
DTYPES = ("float16", "float32")
FILE_COLUMNS = ("path", "class", "height", "width")
DEFAULT_SHARD_SIZE = 4096


class EmbedError(DataError):
    """The embedding cannot be made or read as asked; the message says what to do."""


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
                             f"{_first_line(err)}") from None
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
                         f"{_first_line(err)}") from None
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
                         f"{_first_line(err)}") from None
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


class ImageFolder:
    """Every image file below `root` (recursively), with its class folder when `root`
    holds only subfolders (wcl_tf.data.folder's rule); or the one image file `root`."""

    def __init__(self, root):
        self.root = os.path.abspath(os.path.expanduser(root))
        if os.path.isfile(self.root):  # one image
            paths, labels, classes = [self.root], [-1], []
            self.root = os.path.dirname(self.root)
        elif not os.path.isdir(self.root):
            raise EmbedError(f"{self.root!r} does not exist: name a folder of images (or, "
                             "for queries, an image file).")
        else:
            paths, labels, classes = folder.list_images(self.root)
        if not paths:
            raise EmbedError(f"no images in {self.root!r} (looked for "
                             f"{', '.join(folder.IMAGE_EXTENSIONS)} files, recursively): "
                             "point --images at a folder of images.")
        self.paths, self.classes = paths, classes
        self.labels = [classes[i] if i >= 0 else "" for i in labels]

    def __len__(self):
        return len(self.paths)

    def record(self):
        return {"images": self.root}

    def row_name(self, index, label):
        """(path relative to root, class folder or "") of listing entry `index`."""
        del label
        return os.path.relpath(self.paths[index], self.root), self.labels[index]

    def listing_hash(self):
        digest = hashlib.sha256()
        for index in range(len(self)):
            digest.update("{}\t{}\n".format(*self.row_name(index, -1)).encode())
        return digest.hexdigest()

    def images(self, start, stop):
        """tf.data of ((listing index, -1), uint8 (h, w, 3)) of entries [start, stop)."""
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.range(start, stop, dtype=tf.int64), tf.constant(self.paths[start:stop])))
        return ds.map(lambda i, path: ((i, tf.constant(-1, tf.int64)),
                                       folder.decode(tf.io.read_file(path))),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class TfdsSplit:
    """The images of a TFDS split (or embedded_mnist), named "<split>/<index>";
    max_examples > 0: its first ones only."""

    def __init__(self, dataset, split, data_dir=None, download=False, max_examples=0):
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.ds, self.count, _ = sources.load_split(dataset, split, data_dir, download,
                                                    max_examples)
        self.class_names = []
        if dataset != sources.EMBEDDED_MNIST:
            label = sources.tfds_builder(dataset, data_dir).info.features.get("label")
            self.class_names = list(getattr(label, "names", []) or [])
        if not self.count:
            raise EmbedError(f"split {split!r} of {dataset!r} has no examples.")

    def __len__(self):
        return self.count

    def record(self):
        return {"dataset": self.dataset, "split": self.split, "num_examples": self.count}

    def listing_hash(self):
        return hashlib.sha256(f"{self.dataset}:{self.split}:{self.count}".encode()).hexdigest()

    def row_name(self, index, label):
        """("<split>/<index>", class name) of example `index`."""
        label = int(label)
        name = self.class_names[label] if 0 <= label < len(self.class_names) else (
            str(label) if label >= 0 else "")
        return f"{self.split}/{index}", name

    def images(self, start, stop):
        """tf.data of ((index, label), uint8 (h, w, 3)) of examples [start, stop)."""
        ds = self.ds.enumerate().skip(start).take(stop - start)
        return ds.map(lambda i, pair: ((i, tf.cast(pair[1], tf.int64)), pair[0]))


def _decoded_batches(source, encoder, start, stop, batch_size):
    """tf.data of (index, image float32 (b, S, S, 3), (h, w)) batches of one shard."""
    def prepare(key, image):
        size = tf.shape(image)[:2]
        return key, encoder.preprocess(image), size

    ds = source.images(start, stop).map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)
    return ds.ignore_errors().batch(int(batch_size)).prefetch(2)


class _Runner:
    """encoder.fn on every replica of `strategy`, rows gathered in order."""

    def __init__(self, encoder, strategy, normalize):
        self.strategy = strategy

        def step(key, images, size):
            features = encoder.fn(images)
            if normalize:
                features = tf.math.l2_normalize(features, axis=1)
            return key, features, size

        @tf.function(reduce_retracing=True)
        def run(batch):
            outputs = strategy.run(step, args=batch)
            return tuple(tf.nest.map_structure(lambda t: strategy.gather(t, axis=0), out)
                         for out in outputs)

        self.run = run

    def __call__(self, ds):
        dist = self.strategy.experimental_distribute_dataset(ds)
        for batch in dist:
            yield tf.nest.map_structure(lambda t: t.numpy(), self.run(batch))


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _csv_bytes(rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FILE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _settings(encoder, source, normalize, dtype, shard_size):
    return {
        "format": FORMAT,
        "encoder": encoder.record,
        "normalize": bool(normalize),
        "dtype": dtype,
        "source": source.record(),
        "num_listed": len(source),
        "listing_sha256": source.listing_hash(),
        "shard_size": int(shard_size),
    }


def check_same_encoder(manifest, encoder, where):
    """Refuses `encoder` when the embeddings of `manifest` (read from `where`) were made
    with other weights or other features (EmbedError)."""
    recorded = manifest["encoder"]
    if (encoder.fingerprint, encoder.record["features"]) != (recorded["fingerprint"],
                                                            recorded["features"]):
        made_by = recorded.get("saved_model") or recorded.get("checkpoint") or (
            f"a randomly initialised {recorded.get('backbone')}")
        raise EmbedError(
            f"the embeddings in {where!r} were made by another model ({made_by}, "
            f"{recorded['features']}, fingerprint {recorded['fingerprint']}) than "
            f"{encoder.describe()} (fingerprint {encoder.fingerprint}): embed the images "
            "again with this model, or drop the model flags to use the recorded one.")


def read_manifest(out):
    path = os.path.join(out, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise EmbedError(f"{out!r} holds no embeddings (no {MANIFEST}): write them with "
                         "python -m wcl_tf.tools.embed --out=...") from None
    except (OSError, ValueError) as err:
        raise EmbedError(f"cannot read {path!r}: {_first_line(err)}") from None
    if manifest.get("format") != FORMAT:
        raise EmbedError(f"{path!r} is not a wcl_tf embeddings manifest.")
    return manifest


def _resume_point(out, settings, overwrite):
    """The manifest's complete shards when `out` holds a run with the same settings."""
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        return []
    manifest = read_manifest(out)
    if overwrite:
        return []
    old = {key: manifest.get(key) for key in settings}
    if old != settings:
        changed = [key for key in settings if old[key] != settings[key]]
        raise EmbedError(f"{out!r} holds embeddings made with other settings ({', '.join(changed)}"
                         f" differ): pass --overwrite to replace them, or another --out.")
    return [s for s in manifest["shards"]
            if os.path.isfile(os.path.join(out, s["embeddings"]))
            and os.path.isfile(os.path.join(out, s["files"]))]


def embed_to_folder(encoder, source, out, batch_size=64, dtype="float16", normalize=True,
                    shard_size=DEFAULT_SHARD_SIZE, on_bad_image="skip", strategy=None,
                    overwrite=False, progress=None):
    """Embeds every image of `source` into the folder `out` (module doc); resumes a run
    with the same settings from its last complete shard. progress(done, total, seconds,
    shard) is called after each batch (shard None) and each written shard (its manifest
    entry); done counts listing entries. Returns the manifest."""
    if dtype not in DTYPES:
        raise EmbedError(f"dtype must be float16 or float32, got {dtype!r}.")
    if on_bad_image not in ("skip", "fail"):
        raise EmbedError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}.")
    if os.path.isfile(out):
        raise EmbedError(f"--out {out!r} is a file; name a folder.")
    os.makedirs(out, exist_ok=True)
    settings = _settings(encoder, source, normalize, dtype, shard_size)
    shards = _resume_point(out, settings, overwrite)
    runner = _Runner(encoder, _strategy(strategy), normalize)
    total = len(source)
    start_time = time.time()

    def commit(complete):
        manifest = {**settings, "shards": shards, "complete": complete,
                    "num_embedded": sum(s["rows"] for s in shards),
                    "num_bad": sum(len(s["bad"]) for s in shards),
                    "dim": next((s["dim"] for s in shards if s["dim"]), 0)}
        _write_atomic(os.path.join(out, MANIFEST),
                      json.dumps(manifest, indent=1).encode("utf-8"))
        return manifest

    begin = shards[-1]["stop"] if shards else 0
    for number, first in enumerate(range(begin, total, shard_size), start=len(shards)):
        stop = min(first + shard_size, total)
        batches = []
        for key, features, size in runner(_decoded_batches(source, encoder, first, stop,
                                                           batch_size)):
            batches.append((key[0], key[1], features.astype(dtype), size))
            if progress and len(key[0]):
                progress(int(key[0][-1]) + 1, total, time.time() - start_time, None)
        shard = _shard_record(source, number, first, stop, batches, dtype, on_bad_image, out)
        shards.append(shard)
        commit(False)
        if progress:
            progress(stop, total, time.time() - start_time, shard)
    return commit(True)


def _assemble(source, first, stop, batches, dtype, on_bad_image):
    """(array (rows, C), file rows, bad paths) of the listing entries [first, stop), from
    the (index, label, features, (h, w)) NumPy batches of those that decoded."""
    if batches:
        index, label, features, size = (np.concatenate(parts) for parts in zip(*batches))
    else:
        index, label = np.zeros([0], np.int64), np.zeros([0], np.int64)
        features, size = None, np.zeros([0, 2], np.int32)
    order = np.argsort(index, kind="stable")  # replicas' rows are gathered in order; kept safe
    index, label, size = index[order], label[order], size[order]
    missing = sorted(set(range(first, stop)) - set(index.tolist()))
    bad = [source.row_name(i, -1)[0] for i in missing]
    if bad and on_bad_image == "fail":
        raise EmbedError(f"{len(bad)} file(s) are not readable images (--on_bad_image=fail), "
                         f"e.g. {bad[0]!r}: remove or fix them, or pass --on_bad_image=skip.")
    array = (np.zeros([0, 0], dtype) if features is None
             else np.ascontiguousarray(features[order].astype(dtype)))
    rows = [(*source.row_name(int(i), int(c)), int(h), int(w))
            for i, c, (h, w) in zip(index, label, size)]
    return array, rows, bad


def _shard_record(source, number, first, stop, batches, dtype, on_bad_image, out):
    """Writes one shard's two files and returns its manifest entry."""
    array, rows, bad = _assemble(source, first, stop, batches, dtype, on_bad_image)
    names = {"embeddings": f"embeddings-{number:05d}.npy", "files": f"files-{number:05d}.csv"}
    _write_atomic(os.path.join(out, names["embeddings"]), _npy_bytes(array))
    _write_atomic(os.path.join(out, names["files"]), _csv_bytes(rows))
    return {**names, "start": int(first), "stop": int(stop), "rows": len(rows),
            "dim": int(array.shape[1]), "bad": bad}


def embed_array(encoder, source, batch_size=64, dtype="float32", normalize=True,
                on_bad_image="skip", strategy=None):
    """In memory, for a few images (queries, notebooks): (embeddings (N, C), file rows
    [{"path", "class", "height", "width"}], bad paths) of every image of `source`."""
    runner = _Runner(encoder, _strategy(strategy), normalize)
    batches = [(key[0], key[1], features, size) for key, features, size
               in runner(_decoded_batches(source, encoder, 0, len(source), batch_size))]
    array, rows, bad = _assemble(source, 0, len(source), batches, dtype, on_bad_image)
    return array, [dict(zip(FILE_COLUMNS, row)) for row in rows], bad


def _strategy(strategy):
    if strategy is not None:
        return strategy
    from wcl_tf import strategy as strategies  # pylint: disable=import-outside-toplevel

    return strategies.build_strategy("one_device")


def read_embeddings(out, mmap=False):
    """(embeddings (N, C), file rows [{"path", "class", "height", "width"}], manifest) of
    the folder `out` written by embed_to_folder (complete shards only). mmap: memory-map
    the shards when there is one (no copy)."""
    manifest = read_manifest(out)
    arrays, files = [], []
    for shard in manifest["shards"]:
        try:
            arrays.append(np.load(os.path.join(out, shard["embeddings"]),
                                  mmap_mode="r" if mmap else None, allow_pickle=False))
            with open(os.path.join(out, shard["files"]), encoding="utf-8", newline="") as f:
                files.extend(csv.DictReader(f))
        except (OSError, ValueError) as err:
            raise EmbedError(f"cannot read shard {shard['embeddings']!r} of {out!r}: "
                             f"{_first_line(err)}; embed again with --overwrite.") from None
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        raise EmbedError(f"{out!r} holds no embeddings (every image was skipped).")
    embeddings = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return embeddings, files, manifest
