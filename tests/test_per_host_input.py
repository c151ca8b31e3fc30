"""Per-host input: with several input pipelines, streamed TFDS data is sharded where it is
read (each pipeline reads its own files, as tfds.ReadConfig(input_context=...) shards
them, or its part of tfds.even_splits when the split has fewer files than pipelines), so
no pipeline decodes the others' examples; together the pipelines see the whole split once.
On the generated stand-in for imagenet2012 (tests/fake_imagenet.py): variable-size JPEGs
in eight files, streamed like ImageNet.
"""

import collections

import numpy as np
import tensorflow as tf

import fake_imagenet as stand_in
from wcl_tf.config import Config
from wcl_tf.data import pipeline, sources

NAME = stand_in.NAME


def _contexts(n=2):
    return [tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i,
                                       num_replicas_in_sync=n) for i in range(n)]


def _keys(ds):
    """Multiset of the examples' bytes (decoded pixels or encoded bytes)."""
    return collections.Counter(
        x.tobytes() if isinstance(x, np.ndarray) else bytes(x)
        for x in ds.as_numpy_iterator())


def _file_images(path):
    """The encoded images stored in one TFRecord file of the stand-in, in file order."""
    return [tf.train.Example.FromString(r).features.feature["image"].bytes_list.value[0]
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def test_split_with_fewer_files_than_pipelines_is_split_by_examples(fake_imagenet):
    """max_train_examples=10 keeps 'train[:10]', which lies in one file: fewer than the
    pipelines, so each reads its part of tfds.even_splits (per-file sharding would leave
    a pipeline without data)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = tfds.builder(NAME, data_dir=fake_imagenet)
    assert len(builder.info.splits["train[:10]"].file_instructions) == 1
    cfg = Config(dataset=NAME, data_dir=fake_imagenet, image_size=32,
                 max_train_examples=10, global_batch_size=4, seed=2)
    whole, n, _ = sources.load_split(NAME, "train[:10]", fake_imagenet, encoded_jpeg=True)
    whole = _keys(whole.map(lambda image, label: image))
    parts = []
    # Private on purpose: the per-host share is what _training_source reads, before any
    # batching or augmentation could hide which examples a pipeline saw.
    for ctx in _contexts():
        kind, source, num_examples = pipeline._training_source(cfg, ctx)
        assert kind == "stream" and num_examples == n == 10
        part = _keys(source())
        assert sum(part.values()) == sources.pipeline_examples(
            NAME, "train", fake_imagenet, ctx, max_examples=10) == 5
        parts.append(part)
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == whole


def test_multi_file_split_is_split_by_files(fake_imagenet):
    """Eight files, two pipelines: each reads four whole files (decoding only those);
    the JPEG bytes come undecoded for the fused decode and crop."""
    data_dir = fake_imagenet
    cfg = Config(dataset=NAME, data_dir=data_dir, image_size=24, global_batch_size=8,
                 seed=4)
    whole, n, _ = sources.load_split(NAME, "train", data_dir, encoded_jpeg=True)
    assert n == stand_in.TRAIN
    whole = _keys(whole.map(lambda image, label: image))
    assert sum(whole.values()) == stand_in.TRAIN
    parts = []
    for ctx in _contexts():
        kind, source, _ = pipeline._training_source(cfg, ctx)
        assert kind == "stream" and source().element_spec.dtype == tf.string
        part = _keys(source())
        assert sum(part.values()) == sources.pipeline_examples(
            NAME, "train", data_dir, ctx) == stand_in.TRAIN // 2
        parts.append(part)
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == whole
    # File by file: pipeline 0 holds files 0, 2, 4, 6 (TFDS's per-file sharding).
    files = [_file_images(path) for path in stand_in.train_files(data_dir)]
    assert len(files) == stand_in.TRAIN_FILES
    assert set(parts[0]) == set(sum(files[0::2], []))

    # The whole pipeline on the streamed JPEGs: decoded crop by crop, deterministic.
    def batches(ctx):
        ds = pipeline.make_pretrain_dataset(cfg, 4, input_context=ctx, steps_per_epoch=10)
        return [b["view_1"].numpy() for b in ds.take(2)]

    ctx = _contexts()[1]
    first, again = batches(ctx), batches(ctx)
    assert first[0].shape == (4, 24, 24, 3) and first[0].dtype == np.float32
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_sliced_split_with_max_examples_is_sharded_after_the_cut(fake_imagenet):
    """'train[:50%]' with max_examples: cut to the first max_examples when read, then every
    other example per pipeline (ds.shard); still disjoint and complete."""
    whole, _, _ = sources.load_split(NAME, "train[:50%]", fake_imagenet, max_examples=30,
                                     encoded_jpeg=True)
    whole = _keys(whole.map(lambda image, label: image))
    assert sum(whole.values()) == 30
    parts = []
    for ctx in _contexts():
        ds, n, _ = sources.load_split(NAME, "train[:50%]", fake_imagenet, max_examples=30,
                                      input_context=ctx, encoded_jpeg=True)
        part = _keys(ds.map(lambda image, label: image))
        assert n == 30 and sum(part.values()) == sources.pipeline_examples(
            NAME, "train[:50%]", fake_imagenet, ctx, max_examples=30) == 15
        parts.append(part)
    assert parts[0] + parts[1] == whole


def test_streamed_order_does_not_depend_on_the_global_seed(fake_imagenet):
    """A global TF seed of 0 (keras.utils.set_random_seed(0), cfg.seed=0 in run) used to
    break tracing the stream's per-epoch shuffle; the order depends on cfg.seed only."""
    cfg = Config(dataset=NAME, data_dir=fake_imagenet, image_size=32, global_batch_size=8,
                 max_train_examples=64, seed=0)
    views = []
    for global_seed in (0, 5, None):
        tf.random.set_seed(global_seed)
        ds = pipeline.make_pretrain_dataset(cfg, 8, steps_per_epoch=4)
        views.append(next(iter(ds))["view_1"].numpy())
    tf.random.set_seed(None)
    np.testing.assert_array_equal(views[0], views[1])
    np.testing.assert_array_equal(views[0], views[2])
