"""Embeddings of a collection of images with a trained encoder, written as shards.

`embed_to_folder(encoder, source, out)` streams every image of `source` (a
wcl_tf.embed_sources ImageFolder or TfdsSplit) through the encoder's evaluation
preprocessing and the encoder (a wcl_tf.encoder Encoder, from `load_encoder`) in inference
mode, on every device of a tf.distribute strategy, and writes to the folder `out`:

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
`embed_array(encoder, source)` embeds a few images in memory (queries, notebooks).
"""

import csv
import io
import json
import os
import time

import numpy as np
import tensorflow as tf

from wcl_tf.embed_errors import EmbedError, first_line

MANIFEST = "manifest.json"
FORMAT = "wcl_tf-embeddings-1"
DTYPES = ("float16", "float32")
FILE_COLUMNS = ("path", "class", "height", "width")
DEFAULT_SHARD_SIZE = 4096


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
        raise EmbedError(f"cannot read {path!r}: {first_line(err)}") from None
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
                             f"{first_line(err)}; embed again with --overwrite.") from None
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        raise EmbedError(f"{out!r} holds no embeddings (every image was skipped).")
    embeddings = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return embeddings, files, manifest
