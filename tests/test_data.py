"""Tests of wcl_tf.data: sources, two-view augmentation, the pre-training pipeline."""

import dataclasses
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import SHARED_TFDS

from wcl_tf.config import Config
from wcl_tf.data import (cropping, eval_input, photometric, pipeline, recipe, sources,
                         view_assembly)
from wcl_tf.data.sources import DataError

SIZE = 16  # image side for augmentation / pipeline tests (fast on 2 cores)


def _cfg(**changes):
    base = dict(dataset="embedded_mnist", image_size=SIZE, max_train_examples=64,
                global_batch_size=8, weak_aug_epochs=0, seed=0)
    base.update(changes)
    return Config(**base)


def _mnist_batch(count, size=SIZE):
    ds, _, _ = sources.load_split("embedded_mnist", "train", max_examples=count)
    images = np.stack([image for image, _ in ds.as_numpy_iterator()])
    return tf.cast(tf.round(tf.image.resize(images, [size, size])), tf.uint8)


def _coordinate_images(count, size=32):
    """uint8 images whose red channel is the column and green channel the row index."""
    ramp = np.round(np.arange(size) * 255.0 / (size - 1)).astype(np.uint8)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = ramp[None, :]
    image[..., 1] = ramp[:, None]
    return tf.constant(np.repeat(image[None], count, axis=0))


def _crop_only(spec):
    return dataclasses.replace(spec, jitter_prob=0.0, grayscale_prob=0.0)


# --- sources -------------------------------------------------------------------------

def test_embedded_mnist_splits():
    train, n_train, classes = sources.load_split("embedded_mnist", "train")
    test, n_test, classes_test = sources.load_split("embedded_mnist", "test")
    assert (n_train, n_test, classes, classes_test) == (4000, 1000, 10, 10)
    assert train.element_spec[0].shape == (28, 28, 3)
    assert train.element_spec[0].dtype == tf.uint8
    assert train.element_spec[1].dtype == tf.int64
    train_images, train_labels = (t.numpy() for t in train.batch(5000).get_single_element())
    test_images, test_labels = (t.numpy() for t in test.batch(5000).get_single_element())
    assert train_images.shape == (4000, 28, 28, 3) and test_images.shape == (1000, 28, 28, 3)
    # Gray source repeated to 3 channels; real digits (dark background, bright strokes).
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])
    assert train_images.max() == 255 and np.median(train_images) == 0
    # The bundled labels are sorted: a missing shuffle gives train = classes 0-7 only.
    assert np.bincount(train_labels, minlength=10).min() >= 340
    assert np.bincount(train_labels, minlength=10).max() <= 460
    assert np.bincount(test_labels, minlength=10).min() >= 60
    # Disjoint splits: no test image appears in train.
    train_keys = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train_keys for image in test_images)
    # max_examples keeps the first examples of the same fixed order.
    few, n_few, _ = sources.load_split("embedded_mnist", "train", max_examples=5, seed=123)
    few_images, few_labels = map(np.stack, zip(*few.as_numpy_iterator()))
    assert n_few == 5
    np.testing.assert_array_equal(few_images, train_images[:5])
    np.testing.assert_array_equal(few_labels, train_labels[:5])


def test_load_arrays_resizes_to_unit_floats():
    images, labels = eval_input.load_arrays("embedded_mnist", "test", 20, max_examples=12)
    assert images.shape == (12, 20, 20, 3) and images.dtype == np.float32
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9
    ds, _, _ = sources.load_split("embedded_mnist", "test", max_examples=12)
    np.testing.assert_array_equal(labels, [label for _, label in ds.as_numpy_iterator()])


@pytest.mark.parametrize("dataset, split, expected", [
    ("embedded_mnist", "validation", "unknown split 'validation'"),
    ("no_such_dataset_xyz", "train", "list_builders"),
])
def test_bad_names_raise_data_error(dataset, split, expected):
    with pytest.raises(DataError, match=expected):
        sources.load_split(dataset, split)


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        sources.load_split("mnist", "train", data_dir=str(tmp_path), download=False)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert "download_and_prepare()" in message and "download=True" in message


def test_tfds_split_of_the_imagenet_stand_in(fake_imagenet):
    """A prepared TFDS dataset of variable-size JPEGs (tests/fake_imagenet.py): counts,
    classes, decoded uint8 images of their own sizes, the unknown-split message, the
    evaluation arrays (resize + centre crop)."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    ds, count, classes = sources.load_split(stand_in.NAME, "validation",
                                            data_dir=fake_imagenet, max_examples=6)
    pairs = list(ds.as_numpy_iterator())
    assert (count, classes, len(pairs)) == (6, stand_in.NUM_CLASSES, 6)
    shapes = {image.shape for image, _ in pairs}
    assert len(shapes) > 1 and all(
        s[2] == 3 and stand_in.MIN_SIDE <= min(s[:2]) and max(s[:2]) <= stand_in.MAX_SIDE
        for s in shapes)
    assert all(image.dtype == np.uint8 and label.dtype == np.int64 for image, label in pairs)
    with pytest.raises(DataError, match="unknown split 'valid'.*'train'"):
        sources.load_split(stand_in.NAME, "valid", data_dir=fake_imagenet)
    arrays, labels = eval_input.load_arrays(stand_in.NAME, "validation", 16,
                                            data_dir=fake_imagenet, max_examples=3)
    assert arrays.shape == (3, 16, 16, 3) and 0.0 <= arrays.min() and arrays.max() <= 1.0
    np.testing.assert_array_equal(labels, [label for _, label in pairs[:3]])


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_TFDS, "cifar10")),
                    reason="needs CIFAR-10 prepared by TFDS itself in the shared TFDS folder: "
                           "a registered TFDS builder reading its own files (generated data "
                           "covers the same code: test_tfds_split_of_the_imagenet_stand_in)")
def test_cifar10_from_shared_tfds():
    ds, count, classes = sources.load_split("cifar10", "test", data_dir=SHARED_TFDS,
                                            max_examples=6)
    images, labels = map(np.stack, zip(*ds.as_numpy_iterator()))
    assert (count, classes) == (6, 10)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 10
    assert images.std() > 10  # real colour photos, not zeros
    with pytest.raises(DataError, match="unknown split 'valid'.*'train'"):
        sources.load_split("cifar10", "valid", data_dir=SHARED_TFDS)
    arrays, _ = eval_input.load_arrays("cifar10", "test", 16, data_dir=SHARED_TFDS,
                                       max_examples=3)
    assert arrays.shape == (3, 16, 16, 3) and 0.0 <= arrays.min() and arrays.max() <= 1.0


# --- augmentation --------------------------------------------------------------------

def test_recipes_match_spec():
    assert recipe.STRONG.crop_scale == (0.08, 1.0) and recipe.WEAK.crop_scale == (0.2, 1.0)
    assert (recipe.STRONG.brightness, recipe.STRONG.contrast, recipe.STRONG.saturation,
            recipe.STRONG.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (recipe.WEAK.brightness, recipe.WEAK.contrast, recipe.WEAK.saturation,
            recipe.WEAK.hue) == (0.4, 0.4, 0.4, 0.1)
    for spec in (recipe.STRONG, recipe.WEAK):
        assert (spec.jitter_prob, spec.grayscale_prob, spec.blur_prob) == (0.8, 0.2, 0.5)
        assert spec.crop_ratio == pytest.approx((3 / 4, 4 / 3))


@pytest.mark.parametrize("strong", [True, False])
def test_views_shape_dtype_range_and_differ(strong):
    images = _mnist_batch(8)
    view_1, view_2 = view_assembly.two_views(images, tf.constant(strong), SIZE,
                                             seed=tf.constant([1, 2], tf.int64))
    for view in (view_1, view_2):
        assert view.shape == (8, SIZE, SIZE, 3) and view.dtype == tf.float32
        assert float(tf.reduce_min(view)) >= 0.0 and float(tf.reduce_max(view)) <= 1.0
    assert float(tf.reduce_mean(tf.abs(view_1 - view_2))) > 0.02
    # Different crops / colours, not only different flips.
    assert not _equal_up_to_flip(view_1, view_2).any()


def test_flip_is_per_image():
    images = _coordinate_images(32, size=SIZE)
    view_1, view_2 = view_assembly.two_views(images, False, SIZE, weak_spec=WEAK_ID,
                                             seed=tf.constant([0, 5], tf.int64))
    view_1, view_2 = view_1.numpy(), view_2.numpy()
    identical = np.abs(view_1 - view_2).max(axis=(1, 2, 3)) < 1e-4
    mirrored = np.abs(view_1 - view_2[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-4
    assert (identical | mirrored).all()
    assert 4 <= mirrored.sum() <= 28  # each view flipped with p = 0.5, independently


def test_views_in_tf_data_are_static_and_random_per_image_and_call():
    one = _mnist_batch(1)
    same = tf.tile(one, [8, 1, 1, 1])  # 8 copies of one image
    ds = tf.data.Dataset.from_tensors(same).repeat(2).map(
        lambda images: view_assembly.two_views(images, tf.constant(True), SIZE, blur=True),
        num_parallel_calls=2)
    assert ds.element_spec[0].shape == (8, SIZE, SIZE, 3)  # static, blur path included
    (first, _), (second, _) = list(ds)
    first, second = first.numpy(), second.numpy()
    assert len({view.tobytes() for view in first}) == 8  # every copy augmented differently
    assert np.abs(first - second).mean() > 0.02  # a new draw at each call


def test_crop_identity_and_weak_crops_keep_more_than_strong():
    images = tf.cast(_coordinate_images(4), tf.float32) / 255.0
    same = cropping.random_resized_crop(images, 32, (1.0, 1.0), (1.0, 1.0),
                                        tf.constant([0, 1], tf.int64))
    np.testing.assert_allclose(same.numpy(), images.numpy(), atol=1e-5)

    coords = _coordinate_images(256)
    areas = {}
    for name, strong in (("strong", True), ("weak", False)):
        view, _ = view_assembly.two_views(coords, tf.constant(strong), 32,
                                          seed=tf.constant([3, 4], tf.int64),
                                          strong_spec=_crop_only(recipe.STRONG),
                                          weak_spec=_crop_only(recipe.WEAK))
        view = view.numpy()
        # Covered fraction of each axis, from the coordinate ramps (flip-invariant).
        width = view[..., 0].max(axis=(1, 2)) - view[..., 0].min(axis=(1, 2))
        height = view[..., 1].max(axis=(1, 2)) - view[..., 1].min(axis=(1, 2))
        areas[name] = width * height
    assert areas["weak"].min() > 0.17  # scale >= 0.2
    assert (areas["strong"] < 0.17).mean() > 0.04  # scale 0.08 .. 0.2 happens
    assert areas["weak"].mean() > areas["strong"].mean() + 0.03


def _fit_factors(inputs, outputs, targets):
    """Per image least-squares f in outputs - t = f (inputs - t); returns (f, max residual)."""
    x = (inputs - targets).reshape(len(inputs), -1)
    y = (outputs - targets).reshape(len(inputs), -1)
    factors = (x * y).sum(1) / (x * x).sum(1)
    return factors, np.abs(y - factors[:, None] * x).max()


@pytest.mark.parametrize("operation", ["brightness", "contrast", "saturation"])
def test_color_jitter_blends_have_torchvision_meaning(operation):
    # Values in [0.2, 0.5]: no clipping at factors up to 1.8.
    inputs = tf.random.stateless_uniform([16, 6, 6, 3], [1, 2], 0.2, 0.5)
    strengths = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    strengths[operation] = 0.8
    outputs = photometric.color_jitter(inputs, seed=tf.constant([3, 4], tf.int64),
                                       **strengths).numpy()
    inputs = inputs.numpy()
    gray = (inputs * np.array([0.299, 0.587, 0.114], np.float32)).sum(-1, keepdims=True)
    targets = {"brightness": np.zeros_like(inputs),
               "contrast": np.broadcast_to(gray.mean(axis=(1, 2, 3), keepdims=True),
                                           inputs.shape),
               "saturation": np.broadcast_to(gray, inputs.shape)}[operation]
    factors, residual = _fit_factors(inputs, outputs, targets)
    assert residual < 1e-4
    assert factors.min() >= 0.2 - 1e-4 and factors.max() <= 1.8 + 1e-4
    assert factors.std() > 0.2  # drawn per image from U(0.2, 1.8)


def test_color_jitter_hue_keeps_value_and_chroma():
    inputs = tf.random.stateless_uniform([16, 6, 6, 3], [1, 2])
    outputs = photometric.color_jitter(inputs, 0.0, 0.0, 0.0, 0.2,
                                       tf.constant([3, 4], tf.int64)).numpy()
    inputs = inputs.numpy()
    # An HSV hue rotation keeps each pixel's max and min channel values.
    np.testing.assert_allclose(outputs.max(-1), inputs.max(-1), atol=1e-5)
    np.testing.assert_allclose(outputs.min(-1), inputs.min(-1), atol=1e-5)
    assert np.abs(outputs - inputs).mean() > 0.01


def test_color_jitter_identity_and_grayscale():
    images = tf.random.stateless_uniform([4, 8, 8, 3], [5, 6])
    seed = tf.constant([7, 8], tf.int64)
    same = photometric.color_jitter(images, 0.0, 0.0, 0.0, 0.0, seed)
    np.testing.assert_allclose(same.numpy(), images.numpy(), atol=1e-5)
    jittered = photometric.color_jitter(images, 0.8, 0.8, 0.8, 0.2, seed)
    assert float(tf.reduce_mean(tf.abs(jittered - images))) > 0.03
    gray_spec = dataclasses.replace(recipe.STRONG, grayscale_prob=1.0)
    view, _ = view_assembly.two_views(tf.cast(images * 255.0, tf.uint8), True, 8, seed=seed,
                                      strong_spec=gray_spec)
    np.testing.assert_allclose(view[..., 0], view[..., 2], atol=1e-5)


# --- pipeline ------------------------------------------------------------------------

def test_pretrain_dataset_yields_view_batches():
    ds = pipeline.make_pretrain_dataset(_cfg(), 8)
    for key in ("view_1", "view_2"):
        assert ds.element_spec[key].shape == (8, SIZE, SIZE, 3)
        assert ds.element_spec[key].dtype == tf.float32
    batches = list(ds.take(2))
    for batch in batches:
        assert set(batch) == {"view_1", "view_2"}
        assert 0.0 <= float(tf.reduce_min(batch["view_1"]))
        assert float(tf.reduce_max(batch["view_1"])) <= 1.0
    assert float(tf.reduce_mean(tf.abs(batches[0]["view_1"] - batches[1]["view_1"]))) > 0.02


def test_steps_per_epoch():
    assert pipeline.pretrain_steps_per_epoch(_cfg(global_batch_size=32), 100) == 3
    assert pipeline.pretrain_steps_per_epoch(_cfg(steps_per_epoch=5), 100) == 5
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.pretrain_steps_per_epoch(_cfg(global_batch_size=32), 10)


def test_use_strong_augmentation_switches_after_warmup():
    strong = [bool(pipeline.use_strong_augmentation(step, 2, 2)) for step in range(6)]
    assert strong == [False, False, False, False, True, True]
    assert bool(pipeline.use_strong_augmentation(0, 3, 0))


# Distinguishable recipes: WEAK_ID leaves images intact (full crop, no colour), so the
# two views of a weak batch are equal up to a flip; STRONG_SMALL crops 5% of the image.
WEAK_ID = dataclasses.replace(recipe.WEAK, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                              jitter_prob=0.0, grayscale_prob=0.0)
STRONG_SMALL = dataclasses.replace(recipe.STRONG, crop_scale=(0.05, 0.05))


def _equal_up_to_flip(view_1, view_2):
    """(b,) bools: each image's two views are equal, possibly mirrored, and not blank.

    A 5% crop of an MNIST digit's black border is blank in both views; two blank views
    say nothing about the recipe, so they do not count as equal."""
    view_1, view_2 = np.asarray(view_1), np.asarray(view_2)
    same = np.abs(view_1 - view_2).max(axis=(1, 2, 3)) < 1e-4
    mirrored = np.abs(view_1 - view_2[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-4
    shows_something = view_1.std(axis=(1, 2, 3)) > 1e-3
    return (same | mirrored) & shows_something


def test_pipeline_switches_from_weak_to_strong_after_warmup():
    cfg = _cfg(weak_aug_epochs=1, steps_per_epoch=1)
    ds = pipeline.make_pretrain_dataset(cfg, 8, strong_spec=STRONG_SMALL, weak_spec=WEAK_ID)
    first, second = list(ds.take(2))
    assert _equal_up_to_flip(first["view_1"], first["view_2"]).all()  # epoch 0: WEAK
    # Cut per image (28-px MNIST at 16 px), each crop mirrored by its own draw: the two
    # views' flips differ for some images, not all.
    mirrored = np.abs(first["view_1"] - first["view_2"].numpy()[:, :, ::-1]).max(
        axis=(1, 2, 3)) < 1e-4
    assert 0 < mirrored.sum() < len(mirrored)
    assert not _equal_up_to_flip(second["view_1"], second["view_2"]).any()  # epoch 1
    # A run resumed at step 1 starts in epoch 1: STRONG at once.
    resumed = pipeline.make_pretrain_dataset(cfg, 8, strong_spec=STRONG_SMALL, weak_spec=WEAK_ID,
                                             initial_step=1)
    first = next(iter(resumed))
    assert not _equal_up_to_flip(first["view_1"], first["view_2"]).any()


def test_distributed_pipeline_per_replica_batches(two_replica_strategy):
    cfg = _cfg(global_batch_size=8)
    dist, steps = pipeline.distribute_pretrain_dataset(two_replica_strategy, cfg)
    assert steps == 64 // 8
    batch = next(iter(dist))
    shards = two_replica_strategy.experimental_local_results(batch["view_1"])
    assert len(shards) == 2
    assert all(shard.shape == (4, SIZE, SIZE, 3) for shard in shards)


def test_distributed_epoch_switch_counts_global_steps(two_replica_strategy):
    # One input pipeline feeds both replicas: its batches 0 and 1 are step 0.
    cfg = _cfg(global_batch_size=8, weak_aug_epochs=1, steps_per_epoch=1)
    dist = two_replica_strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_pretrain_dataset(
            cfg, ctx.get_per_replica_batch_size(8), ctx, 1,
            strong_spec=STRONG_SMALL, weak_spec=WEAK_ID))
    iterator = iter(dist)
    for step, weak in ((0, True), (1, False)):
        batch = next(iterator)
        local = two_replica_strategy.experimental_local_results
        for view_1, view_2 in zip(local(batch["view_1"]), local(batch["view_2"])):
            assert _equal_up_to_flip(view_1, view_2).all() == weak, step
            assert _equal_up_to_flip(view_1, view_2).any() == weak, step


def test_pipeline_shuffles_each_epoch():
    # Native 28 px (the batched path): WEAK_ID views are then the images themselves.
    cfg = _cfg(max_train_examples=64, weak_aug_epochs=100, image_size=28)
    source = _mnist_batch(64, size=28).numpy().astype(np.float32) / 255.0
    ds = pipeline.make_pretrain_dataset(cfg, 8, steps_per_epoch=8, weak_spec=WEAK_ID)
    views = np.concatenate([batch["view_1"].numpy() for batch in ds.take(16)])

    def position(view):
        error = np.minimum(np.abs(source - view).max(axis=(1, 2, 3)),
                           np.abs(source - view[:, ::-1]).max(axis=(1, 2, 3)))
        assert error.min() < 1e-4
        return int(error.argmin())

    epochs = [[position(v) for v in views[:64]], [position(v) for v in views[64:]]]
    assert sorted(epochs[0]) == list(range(64)) == sorted(epochs[1])  # each image once
    assert max(epochs[0][:8]) >= 16  # the first batch draws from the whole split
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_input_pipelines_get_disjoint_shards():
    cfg = _cfg(max_train_examples=64, weak_aug_epochs=100)  # WEAK_ID throughout
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        ds = pipeline.make_pretrain_dataset(cfg, 8, context, steps_per_epoch=4,
                                            weak_spec=WEAK_ID)
        # One pass over this pipeline's 32 images; views = images, maybe mirrored.
        views = np.concatenate([batch["view_1"].numpy() for batch in ds.take(4)])
        seen.append({min(v.tobytes(), v[:, ::-1].tobytes()) for v in views})
    assert len(seen[0]) == 32 and len(seen[1]) == 32
    assert not seen[0] & seen[1]


def test_non_divisible_global_batch_raises(two_replica_strategy):
    with pytest.raises(DataError, match="not divisible by the 2 replicas: use a multiple of 2"):
        pipeline.distribute_pretrain_dataset(two_replica_strategy, _cfg(global_batch_size=9))


def test_save_view_grid_writes_png(tmp_path):
    path = pipeline.save_view_grid(_cfg(), str(tmp_path / "views.png"), num_images=3)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 2000
