"""Training data order: a full, seeded reshuffle every epoch (like torch's
DistributedSampler with drop_last), seeded folder subsets, exact batches after a resume,
and no batch drawn by Keras' symbolic build.

The image folder here is sorted by class (10 classes x 40 PNGs). Every image is one
constant colour that names it (red: class, green: image within the class), so a view
made with the identity recipe below (full crop, no colour change, no blur) shows which
image it came from: its centre pixel. Flips and resizing keep a constant image constant.
"""

import dataclasses
import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from wcl_tf.config import Config
from wcl_tf.data import eval_input, folder, pipeline, recipe, sources
from wcl_tf.models.wcl_model import build_wcl_model

CLASSES, PER_CLASS = 10, 40
IDENTITY = dataclasses.replace(recipe.WEAK, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                               jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _colour(cls, item):
    return 20 * cls + 10, 6 * item + 5, 128


def _identify(view):
    """(class, item) of a view of one of the folder's images."""
    r, g, _ = np.round(view[view.shape[0] // 2, view.shape[1] // 2] * 255.0).astype(int)
    assert (r - 10) % 20 == 0 and (g - 5) % 6 == 0, (r, g)
    return (r - 10) // 20, (g - 5) // 6


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("order") / "images"
    for cls in range(CLASSES):
        os.makedirs(root / f"class_{cls:02d}")
        for item in range(PER_CLASS):
            pixels = np.zeros((6 + item % 3, 7, 3), np.uint8) + np.uint8(_colour(cls, item))
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            (root / f"class_{cls:02d}" / f"{item:03d}.png").write_bytes(buffer.getvalue())
    return f"folder:{root}"


def _cfg(dataset, **changes):
    base = dict(dataset=dataset, image_size=8, global_batch_size=64, weak_aug_epochs=100,
                seed=3, blur=False)
    base.update(changes)
    return Config(**base)


def _images(ds, batches):
    """(class, item) of every view_1 row of the first `batches` batches of ds."""
    return [_identify(v) for batch in ds.take(batches) for v in batch["view_1"].numpy()]


def test_load_folder_yields_a_seeded_permutation(sorted_folder):
    # Old code: load_folder had no seed and listed class by class (256 = 7 classes).
    ds, count, _ = folder.load_folder(sorted_folder, "train", seed=0)
    labels = [int(label) for _, label in ds.take(256).as_numpy_iterator()]
    assert count == CLASSES * PER_CLASS and len(set(labels)) >= 9
    again = [int(label) for _, label in folder.load_folder(
        sorted_folder, "train", seed=0)[0].take(256).as_numpy_iterator()]
    other = [int(label) for _, label in folder.load_folder(
        sorted_folder, "train", seed=1)[0].take(256).as_numpy_iterator()]
    assert labels == again and labels != other
    # Without a seed: the old sorted order (class by class).
    files, sorted_labels = folder.select_files(sorted_folder, "train")
    assert sorted_labels == sorted(sorted_labels) and files == sorted(files)


def test_max_examples_is_a_seeded_sample_across_classes(sorted_folder):
    # Old code: the first 100 files, i.e. classes 0, 1 and 2 only.
    for seed in (None, 0, 5):
        ds, count, _ = sources.load_split(sorted_folder, "train", max_examples=100, seed=seed)
        labels = [int(label) for _, label in ds.as_numpy_iterator()]
        assert count == len(labels) == 100 and len(set(labels)) >= 9
    # Evaluation subsets (load_arrays, no seed) are the same every time.
    _, y1 = eval_input.load_arrays(sorted_folder, "train", 8, max_examples=50)
    _, y2 = eval_input.load_arrays(sorted_folder, "train", 8, max_examples=50)
    np.testing.assert_array_equal(y1, y2)
    assert len(set(y1.tolist())) >= 8


def test_training_batches_draw_from_all_classes(sorted_folder, monkeypatch):
    # The old pipeline mixed classes only through a shuffle buffer of _SHUFFLE_BUFFER
    # images; shrunk to 16 here (as 16,384 is small next to ImageNet), its first 256
    # images came from about 7 classes. The new order does not use that buffer for
    # folders.
    monkeypatch.setattr(pipeline, "_SHUFFLE_BUFFER", 16)
    cfg = _cfg(sorted_folder)
    ds = pipeline.make_pretrain_dataset(cfg, 64, steps_per_epoch=6, weak_spec=IDENTITY)
    seen = _images(ds, 12)  # two epochs of 6 x 64 = 384 of the 400 images
    assert len({cls for cls, _ in seen[:256]}) >= 9
    assert len({cls for cls, _ in seen[:64]}) >= 8  # the very first batch too
    epochs = seen[:384], seen[384:]
    assert all(len(set(epoch)) == 384 for epoch in epochs)  # no image twice in an epoch
    assert epochs[0] != epochs[1]  # a new permutation every epoch
    # max_train_examples: a sample across classes, the same in every epoch.
    sample = pipeline.make_pretrain_dataset(_cfg(sorted_folder, max_train_examples=100), 50,
                                            steps_per_epoch=2, weak_spec=IDENTITY)
    seen = _images(sample, 4)
    assert len({cls for cls, _ in seen}) >= 9
    assert set(seen[:100]) == set(seen[100:]) and len(set(seen[:100])) == 100


def test_same_seed_same_order_in_another_pipeline(sorted_folder):
    # A guard, not a fix: the old pipeline was seeded too and passes this.
    cfg = _cfg(sorted_folder)
    first = _images(pipeline.make_pretrain_dataset(cfg, 64, steps_per_epoch=6,
                                                   weak_spec=IDENTITY), 8)
    second = _images(pipeline.make_pretrain_dataset(cfg, 64, steps_per_epoch=6,
                                                    weak_spec=IDENTITY), 8)
    other = _images(pipeline.make_pretrain_dataset(_cfg(sorted_folder, seed=4), 64,
                                                   steps_per_epoch=6, weak_spec=IDENTITY), 8)
    assert first == second and first != other


def test_example_order_is_a_permutation_per_epoch_and_continues_past_one_pass():
    cfg = Config(dataset="embedded_mnist", seed=1)
    # 5 steps of 8 = 40 of 64 examples per epoch (drop_last): epoch 0 and 1 differ.
    order = [int(i) for _, i in pipeline.example_order(cfg, 64, 8, 5).take(80)]
    assert len(set(order[:40])) == 40 and order[:40] != order[40:]
    # 20 steps of 8 = 160 > 64: the epoch walks 2.5 permutations, each complete.
    order = [int(i) for _, i in pipeline.example_order(cfg, 64, 8, 20).take(320)]
    for start in (0, 64, 160, 224):
        assert sorted(order[start:start + 64]) == list(range(64))
    assert order[:64] != order[64:128] and order[:160] != order[160:]
    # Two input pipelines, 2 replicas each: their shares of every step are disjoint and
    # together the same images as one pipeline feeding all 4 replicas.
    single = [int(i) for _, i in pipeline.example_order(cfg, 64, 4, 3, 1, 0, 4).take(48)]
    shares = [[int(i) for _, i in pipeline.example_order(cfg, 64, 4, 3, 2, p, 2).take(24)]
              for p in range(2)]
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        assert shares[0][rows] + shares[1][rows] == single[16 * step:16 * step + 16]


@pytest.mark.parametrize("resume_step", [6, 8, 13])
def test_resumed_pipeline_gives_the_uninterrupted_batches(sorted_folder, resume_step):
    """Strong augmentation and 2 replicas fed by one pipeline: the batches of a pipeline
    started at step s equal the uninterrupted pipeline's from step s on (6: an epoch
    boundary, 8 and 13: mid-epoch). Old code: its shuffle restarted at the first
    permutation, so the images differed."""
    cfg = _cfg(sorted_folder, weak_aug_epochs=1)
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)

    def batches(initial_step, count):
        ds = pipeline.make_pretrain_dataset(cfg, 32, context, steps_per_epoch=6,
                                            initial_step=initial_step)
        return [b["view_1"].numpy() for b in ds.take(count)]

    uninterrupted = batches(0, 2 * resume_step + 4)
    resumed = batches(resume_step, 4)
    for k in range(4):
        np.testing.assert_array_equal(resumed[k], uninterrupted[2 * resume_step + k])


def test_resumed_in_memory_pipeline_gives_the_uninterrupted_batches():
    # embedded MNIST at its own 28 px: decoded once into memory, the batched path.
    cfg = Config(dataset="embedded_mnist", image_size=28, max_train_examples=200,
                 global_batch_size=16, weak_aug_epochs=1, seed=2)
    full = pipeline.make_pretrain_dataset(cfg, 16, steps_per_epoch=12)
    full = [b["view_2"].numpy() for b in full.take(17)]
    resumed = pipeline.make_pretrain_dataset(cfg, 16, steps_per_epoch=12, initial_step=15)
    for k, batch in enumerate(resumed.take(2)):
        np.testing.assert_array_equal(batch["view_2"].numpy(), full[15 + k])


def test_fit_draws_no_batch_for_the_symbolic_build(two_replica_strategy):
    """Keras 3.15 starts an extra iterator of the data at the start of fit to learn the
    batch shapes and draws its first batch (old code: element 0 was produced twice).
    With the model's override it reads no data: the only iterator is the training one,
    so fit's first step trains on the pipeline's batch 0."""
    produced = []

    def record(i):
        produced.append(int(i))
        return i

    def dataset_fn(ctx):
        ds = tf.data.Dataset.range(1000).map(
            lambda i: tf.py_function(record, [i], tf.int64))
        ds = ds.map(lambda i: tf.fill([8, 8, 3], tf.cast(i, tf.float32) / 1000.0))
        ds = ds.batch(2, drop_remainder=True)
        return ds.map(lambda x: {"view_1": x, "view_2": x})

    with two_replica_strategy.scope():
        model = build_wcl_model("small_cnn", head_hidden_dim=8, head_output_dim=4, width=4,
                                image_size=8)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
    dist = two_replica_strategy.distribute_datasets_from_function(dataset_fn)
    model.fit(dist, epochs=1, steps_per_epoch=2, verbose=0)
    assert produced.count(0) == 1, produced[:12]
    assert sorted(produced) == sorted(set(produced))  # no element drawn twice


def _stand_in_config(fake_imagenet, **overrides):
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    return Config(**{**dict(dataset=stand_in.NAME, data_dir=fake_imagenet, image_size=16,
                            global_batch_size=8, weak_aug_epochs=100, seed=5), **overrides})


def _stream(cfg, steps_per_epoch, initial_step=0, count=None):
    """The encoded images the stream gives a single pipeline, batch 8, from initial_step."""
    # Private on purpose: the order of the streamed images is what these tests are about,
    # before augmentation and batching could hide it.
    kind, source, n = pipeline._training_source(cfg)
    assert kind == "stream"
    ds = pipeline._stream_order(cfg, source, n, 8, steps_per_epoch, 1, initial_step)
    return [(int(number), bytes(image)) for number, image in ds.take(count).as_numpy_iterator()]


def test_streamed_tfds_reads_its_files_in_a_new_order_and_shuffle_every_epoch(
        fake_imagenet, monkeypatch):
    """Every epoch of a TFDS stream reads the files in an order of its own (with a buffer
    of one image, what a stream sees when the split is far larger than its buffer) and
    shuffles in a buffer seeded per epoch; each epoch reads every image once."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    cfg = _stand_in_config(fake_imagenet)
    steps = stand_in.TRAIN // 8  # 12 steps of 8: an epoch is the whole split
    file_of = {}
    for f, path in enumerate(stand_in.train_files(fake_imagenet)):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            file_of[tf.train.Example.FromString(raw).features.feature[
                "image"].bytes_list.value[0]] = f

    monkeypatch.setattr(pipeline, "_SHUFFLE_BUFFER", 1)
    images = [image for _, image in _stream(cfg, steps, count=3 * stand_in.TRAIN)]
    epochs = [images[e * stand_in.TRAIN:(e + 1) * stand_in.TRAIN] for e in range(3)]
    file_orders = []
    for epoch in epochs:
        assert sorted(epoch) == sorted(file_of)  # every image once
        files = [file_of[image] for image in epoch]
        order = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]
        assert sorted(order) == list(range(stand_in.TRAIN_FILES)), files  # file by file
        file_orders.append(order)
    assert len({tuple(order) for order in file_orders}) == 3, file_orders

    monkeypatch.setattr(pipeline, "_SHUFFLE_BUFFER", 16384)
    images = [image for _, image in _stream(cfg, steps, count=3 * stand_in.TRAIN)]
    epochs = [images[e * stand_in.TRAIN:(e + 1) * stand_in.TRAIN] for e in range(3)]
    assert all(sorted(epoch) == sorted(file_of) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    # Shuffled within the epoch, not only file by file: consecutive images of one file
    # are the exception.
    runs = sum(file_of[a] == file_of[b] for a, b in zip(epochs[1], epochs[1][1:]))
    assert runs < stand_in.TRAIN // 2, runs


def test_streamed_tfds_resumes_exactly_mid_epoch(fake_imagenet):
    """A run resumed at epoch e, step s reads from the stream exactly what the
    uninterrupted run read from there (file order, shuffle, the images' numbers), and
    makes the same views from them."""
    cfg = _stand_in_config(fake_imagenet, max_train_examples=40)
    steps = 5  # 5 steps of 8 = 40: an epoch is the whole (cut) split
    whole = _stream(cfg, steps, count=3 * 40)
    for initial_step in (7, 11):  # epoch 1 step 2, epoch 2 step 1
        resumed = _stream(cfg, steps, initial_step=initial_step, count=24)
        assert resumed == whole[8 * initial_step:8 * initial_step + 24]

    views = [b["view_1"].numpy() for b in pipeline.make_pretrain_dataset(
        cfg, 8, steps_per_epoch=steps, weak_spec=IDENTITY).take(10)]
    resumed = [b["view_1"].numpy() for b in pipeline.make_pretrain_dataset(
        cfg, 8, steps_per_epoch=steps, weak_spec=IDENTITY, initial_step=7).take(3)]
    for k in range(3):
        np.testing.assert_array_equal(resumed[k], views[7 + k])
