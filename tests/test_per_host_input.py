"""Per-host input: with several input pipelines, streamed TFDS data is sharded where it is
read (tfds.ReadConfig(input_context=...): each pipeline reads its own files, or its part of
tfds.even_splits when the split has fewer files than pipelines), so no pipeline decodes
the others' examples; together the pipelines see the whole split once.
"""

import collections
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import SHARED_TFDS
from wcl_tf.config import Config
from wcl_tf.data import pipeline, sources

CIFAR = os.path.join(SHARED_TFDS, "cifar10", "3.0.2")


def _contexts(n=2):
    return [tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i,
                                       num_replicas_in_sync=n) for i in range(n)]


def _keys(ds):
    """Multiset of the examples' bytes (decoded pixels or encoded bytes)."""
    return collections.Counter(
        x.tobytes() if isinstance(x, np.ndarray) else bytes(x)
        for x in ds.as_numpy_iterator())


def _fake_jpeg_dataset(root, name="fake_cifar_jpeg", shards=4, per_shard=50):
    """A TFDS dataset folder of `shards` files, CIFAR-10 test images stored as JPEG."""
    out = os.path.join(root, name, "3.0.2")
    os.makedirs(out)
    with open(os.path.join(CIFAR, "dataset_info.json")) as f:
        info = json.load(f)
    info["name"] = name
    info.pop("moduleName", None)
    info["splits"] = [{"name": "train", "filepathTemplate": info["splits"][0][
        "filepathTemplate"], "numBytes": "1", "shardLengths": [str(per_shard)] * shards}]
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(CIFAR, "features.json")) as f:
        features = json.load(f)
    features["featuresDict"]["features"]["image"]["image"]["encodingFormat"] = "jpeg"
    with open(os.path.join(out, "features.json"), "w") as f:
        json.dump(features, f)
    shutil.copy(os.path.join(CIFAR, "label.labels.txt"), out)
    records = tf.data.TFRecordDataset(os.path.join(CIFAR, "cifar10-test.tfrecord-00000-of-00001"))
    records = list(records.take(shards * per_shard).as_numpy_iterator())
    for s in range(shards):
        path = os.path.join(out, f"{name}-train.tfrecord-{s:05d}-of-{shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for raw in records[s * per_shard:(s + 1) * per_shard]:
                example = tf.train.Example.FromString(raw)
                png = example.features.feature["image"].bytes_list.value[0]
                example.features.feature["image"].bytes_list.value[0] = tf.io.encode_jpeg(
                    tf.io.decode_png(png), quality=90).numpy()
                writer.write(example.SerializeToString())
    return name


@pytest.fixture
def shared_cifar(monkeypatch):
    if not os.path.isdir(CIFAR):
        pytest.skip("no prepared cifar10 in the shared TFDS folder")
    monkeypatch.setattr(pipeline, "_CACHE_LIMIT_BYTES", 0)


def test_single_file_split_is_split_by_examples(shared_cifar):
    """CIFAR-10 has one file per split: fewer than the pipelines, so each reads its part of
    tfds.even_splits (per-file sharding would leave a pipeline without data)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = tfds.builder("cifar10", data_dir=SHARED_TFDS)
    assert builder.info.splits["test"].num_shards == 1
    cfg = Config(dataset="cifar10", data_dir=SHARED_TFDS, train_split="test",
                 image_size=32, max_train_examples=300, global_batch_size=16, seed=2)
    whole, n, _ = sources.load_split("cifar10", "test[:300]", SHARED_TFDS)
    whole = _keys(whole.map(lambda image, label: image))
    parts = []
    # Private on purpose: the per-host share is what _training_source reads, before any
    # batching or augmentation could hide which examples a pipeline saw.
    for ctx in _contexts():
        kind, source, num_examples = pipeline._training_source(cfg, ctx)
        assert kind == "stream" and num_examples == n == 300
        part = _keys(source)
        assert sum(part.values()) == sources.pipeline_examples(
            "cifar10", "test", SHARED_TFDS, ctx, max_examples=300) == 150
        parts.append(part)
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == whole


def test_multi_file_split_is_split_by_files(shared_cifar, tmp_path):
    """Four files, two pipelines: each reads two whole files (decoding only those);
    the JPEG bytes come undecoded for the fused decode and crop."""
    name = _fake_jpeg_dataset(str(tmp_path))
    data_dir = str(tmp_path)
    cfg = Config(dataset=name, data_dir=data_dir, image_size=24, global_batch_size=8,
                 seed=4)
    whole, n, _ = sources.load_split(name, "train", data_dir, encoded_jpeg=True)
    assert n == 200
    whole = _keys(whole.map(lambda image, label: image))
    assert sum(whole.values()) == 200
    parts = []
    for ctx in _contexts():
        kind, source, _ = pipeline._training_source(cfg, ctx)
        assert kind == "stream" and source.element_spec.dtype == tf.string
        part = _keys(source)
        assert sum(part.values()) == sources.pipeline_examples(
            name, "train", data_dir, ctx) == 100
        parts.append(part)
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == whole
    # File by file: pipeline 0 holds files 0 and 2 (TFDS shards the file list).
    files = tf.data.TFRecordDataset(sorted(
        os.path.join(data_dir, name, "3.0.2", f) for f in os.listdir(
            os.path.join(data_dir, name, "3.0.2")) if ".tfrecord-" in f))
    images = [tf.train.Example.FromString(r).features.feature["image"].bytes_list.value[0]
              for r in files.as_numpy_iterator()]
    assert set(parts[0]) == set(images[0:50] + images[100:150])

    # The whole pipeline on the streamed JPEGs: decoded crop by crop, deterministic.
    def batches(ctx):
        ds = pipeline.make_pretrain_dataset(cfg, 4, input_context=ctx, steps_per_epoch=10)
        return [b["view_1"].numpy() for b in ds.take(2)]

    ctx = _contexts()[1]
    first, again = batches(ctx), batches(ctx)
    assert first[0].shape == (4, 24, 24, 3) and first[0].dtype == np.float32
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_sliced_split_with_max_examples_is_sharded_after_the_cut(shared_cifar):
    """'test[:50%]' with max_examples: cut to the first max_examples when read, then every
    other example per pipeline (ds.shard); still disjoint and complete."""
    whole, _, _ = sources.load_split("cifar10", "test[:50%]", SHARED_TFDS, max_examples=90)
    whole = _keys(whole.map(lambda image, label: image))
    parts = []
    for ctx in _contexts():
        ds, n, _ = sources.load_split("cifar10", "test[:50%]", SHARED_TFDS, max_examples=90,
                                      input_context=ctx)
        part = _keys(ds.map(lambda image, label: image))
        assert n == 90 and sum(part.values()) == sources.pipeline_examples(
            "cifar10", "test[:50%]", SHARED_TFDS, ctx, max_examples=90) == 45
        parts.append(part)
    assert parts[0] + parts[1] == whole


def test_streamed_order_does_not_depend_on_the_global_seed(monkeypatch):
    """A global TF seed of 0 (keras.utils.set_random_seed(0), cfg.seed=0 in run) used to
    break tracing the stream's per-epoch shuffle; the order depends on cfg.seed only."""
    import tensorflow as tf

    if not os.path.isdir(SHARED_TFDS):
        pytest.skip("no prepared CIFAR-10")
    monkeypatch.setattr(pipeline, "_CACHE_LIMIT_BYTES", 0)
    cfg = Config(dataset="cifar10", data_dir=SHARED_TFDS, image_size=32, global_batch_size=8,
                 max_train_examples=64, seed=0)
    views = []
    for global_seed in (0, 5, None):
        tf.random.set_seed(global_seed)
        ds = pipeline.make_pretrain_dataset(cfg, 8, steps_per_epoch=4)
        views.append(next(iter(ds))["view_1"].numpy())
    tf.random.set_seed(None)
    np.testing.assert_array_equal(views[0], views[1])
    np.testing.assert_array_equal(views[0], views[2])
