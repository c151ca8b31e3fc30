"""augment_on="device": the host decodes, crops and flips, train_step does jitter,
grayscale and blur (wcl_tf.data.augment_layers).

What must hold: the device pipeline hands over exactly the host path's crops; the device
views are the host recipe (same functions, same per-op statistics), drawn per image from
(seed, step, replica id): the same seed gives the same views, two replicas and two steps
never share them; the step trains under MirroredStrategy and the model saves and loads.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf import training
from wcl_tf.config import Config
from wcl_tf.data import augment_layers, photometric, pipeline, recipe, view_assembly

S, L = 16, 8


def _cfg(**kw):
    base = dict(dataset="embedded_mnist", backbone="small_cnn", width=8, head_hidden_dim=32,
                head_output_dim=16, image_size=S, global_batch_size=16, steps_per_epoch=4,
                epochs=2, warmup_epochs=0, weak_aug_epochs=1, augment_on="device",
                max_train_examples=256, seed=3)
    base.update(kw)
    return Config(**base)


def _colour_crops(n, size, seed=0):
    """uint8 (n, size, size, 3): random colours, the left half brighter than the right
    (a flip is visible), no pixel gray."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 200, size=(n, size, size, 3)).astype(np.float32)
    images[..., 0] += 30.0  # red ahead: R != G != B
    images[:, :, : size // 2] += 25.0
    return tf.constant(np.clip(images, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("image_size,num_local", [(28, 0), (S, 2)])
def test_device_pipeline_yields_the_host_pipelines_crops(image_size, num_local):
    """Host mode's views are cropped_views(crops, seed_k) of batch k's crops; device mode
    must yield those very crops (uint8), for data of the training size (MNIST at 28 px,
    batched crops) and for data cropped per image (28 px MNIST cut at S)."""
    cfg = _cfg(image_size=image_size, num_local_crops=num_local, local_crop_size=L,
               knn_crops=min(num_local, 1))
    host = pipeline.make_pretrain_dataset(dataclasses.replace(cfg, augment_on="host"), 8,
                                          steps_per_epoch=4)
    device = pipeline.make_pretrain_dataset(cfg, 8, steps_per_epoch=4)
    for k, (h, d) in enumerate(zip(host.take(6), device.take(6))):
        assert all(v.dtype == tf.uint8 for v in d.values())
        assert set(d) == set(h)
        seed = tf.constant([cfg.seed, k], tf.int64)
        strong = k >= 4  # weak_aug_epochs=1, 4 steps per epoch
        again = view_assembly.cropped_views(d, strong, image_size, L, seed=seed)
        for key in h:
            if image_size == S:  # Cut per image from 28 px: uint8 on both paths.
                # Equal up to float rounding (tf.data fuses ops differently).
                np.testing.assert_allclose(again[key].numpy(), h[key].numpy(), atol=1e-6)
            else:  # 28 x 28 already: batched crops, rounded to uint8 on the device only.
                diff = np.abs(again[key].numpy() - h[key].numpy())
                assert diff.max() < 0.04 and diff.mean() < 0.003, (key, diff.max())


def _layer(**kw):
    return augment_layers.ViewAugmentation(S, L, blur=True, seed=5, weak_aug_epochs=1, **kw)


def test_same_seed_same_views_and_each_step_its_own():
    crops = {"view_1": _colour_crops(8, S), "view_2": _colour_crops(8, S, 1),
             "local": tf.reshape(_colour_crops(16, L, 2), [8, 2, L, L, 3])}
    a = _layer()(crops, step=7, steps_per_epoch=4)
    b = _layer()(crops, step=7, steps_per_epoch=4)
    c = _layer()(crops, step=8, steps_per_epoch=4)
    other_seed = augment_layers.ViewAugmentation(S, L, blur=True, seed=6, weak_aug_epochs=1)(
        crops, step=7, steps_per_epoch=4)
    for key in crops:
        assert a[key].dtype == tf.float32 and a[key].shape[:-1] == crops[key].shape[:-1]
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        assert not np.allclose(a[key].numpy(), c[key].numpy())
        assert not np.allclose(a[key].numpy(), other_seed[key].numpy())
    # What the host path computes for the same crops with the replica's seed.
    host = view_assembly.cropped_views(crops, True, S, L, blur=True,
                                       seed=augment_layers.replica_seed(5, 7, 0))
    for key in crops:
        np.testing.assert_array_equal(a[key].numpy(), host[key].numpy())


def test_weak_recipe_until_weak_aug_epochs_then_strong():
    """Distinguishable recipes: the weak one never jitters or grays, the strong one always
    grays. Steps 0-3 are epoch 0 (weak), step 4 on strong."""
    weak = dataclasses.replace(recipe.WEAK, jitter_prob=0.0, grayscale_prob=0.0)
    strong = dataclasses.replace(recipe.STRONG, jitter_prob=0.0, grayscale_prob=1.0)
    layer = augment_layers.ViewAugmentation(S, seed=1, weak_aug_epochs=1, strong_spec=strong,
                                            weak_spec=weak)
    crops = {"view_1": _colour_crops(8, S), "view_2": _colour_crops(8, S, 1)}
    for step, gray in ((0, False), (3, False), (4, True), (9, True)):
        view = layer(crops, step=step, steps_per_epoch=4)["view_1"].numpy()
        is_gray = np.abs(view[..., 0] - view[..., 1]).max(axis=(1, 2)) < 1e-6
        assert is_gray.all() == gray and is_gray.any() == gray, step


def _op_rates(views, crops):
    """Per view: grayscale (R == G == B everywhere), flipped (left half darker), mean."""
    gray = np.abs(views[..., 0] - views[..., 1]).max(axis=(1, 2)) < 1e-6
    half = views.shape[2] // 2
    flipped = views[:, :, :half].mean(axis=(1, 2, 3)) < views[:, :, half:].mean(axis=(1, 2, 3))
    return gray.mean(), flipped.mean(), views.mean()


def test_device_views_have_the_host_paths_per_op_statistics():
    """Over 1,024 images, the fraction of gray views and the mean level match the host
    path's (and the recipe's probabilities) within binomial noise; draws are per image (a
    shared draw per batch would make the fractions 0 or 1 per batch). Neither flips: the
    crops come flipped (tests/test_crop_flip.py)."""
    n = 256
    crops = {"view_1": _colour_crops(n, S, 4), "view_2": _colour_crops(n, S, 5)}
    layer = augment_layers.ViewAugmentation(S, seed=2, weak_aug_epochs=0)
    device, host = [], []
    for step in range(4):
        device.append(layer(crops, step=step, steps_per_epoch=4)["view_1"].numpy())
        host.append(view_assembly.cropped_views(crops, True, S, seed=tf.constant([9, step]))
                    ["view_1"].numpy())
    d_gray, d_flip, d_mean = _op_rates(np.concatenate(device), crops)
    h_gray, h_flip, h_mean = _op_rates(np.concatenate(host), crops)
    tol = 4 * np.sqrt(0.25 / (4 * n))
    # Grayscale p = 0.2 (plus saturation factors of exactly 0: never, U(0, 1.8)).
    assert abs(d_gray - 0.2) < tol and abs(h_gray - 0.2) < tol
    assert d_flip == 0.0 and h_flip == 0.0
    assert abs(d_mean - h_mean) < 0.02
    for batch in device:  # Per image, not per batch (p = 0.2, 4 sigma: 0.1).
        rate = _op_rates(batch, crops)[0]
        assert 0.1 < rate < 0.3


def test_static_shape_jitter_matches_the_gathered_one():
    images = tf.cast(_colour_crops(16, S), tf.float32) / 255.0
    seed = tf.constant([4, 2], tf.int64)
    args = (0.8, 0.8, 0.8, 0.2, seed)
    dynamic = photometric.color_jitter(images, *args)
    static = photometric.color_jitter(images, *args, static_shapes=True)
    np.testing.assert_allclose(static.numpy(), dynamic.numpy(), atol=1e-5)
    # Under XLA the stateless generators draw other numbers for the same seed (their XLA
    # kernels differ from TensorFlow's): test_device_augmentation_compiles_with_xla
    # checks compilation and per-image draws there.


def test_two_replicas_draw_different_views(two_replica_strategy):
    """The same crops on both replicas at the same step: different views (docs/method.md
    section 3.3: the trap of a generator drawn inside a replicated step), reproducible."""
    cfg = _cfg()
    with two_replica_strategy.scope():
        model = training.build(cfg, two_replica_strategy, 4)
    crops = {"view_1": _colour_crops(4, S), "view_2": _colour_crops(4, S, 1)}

    @tf.function
    def augment_on_replicas():
        return two_replica_strategy.run(lambda: model.augment_views(crops))

    first = augment_on_replicas()
    views = [v.numpy() for v in two_replica_strategy.experimental_local_results(
        first["view_1"])]
    assert len(views) == 2 and not np.allclose(views[0], views[1])
    again = two_replica_strategy.experimental_local_results(augment_on_replicas()["view_1"])
    np.testing.assert_array_equal(again[0].numpy(), views[0])
    # Replica r's views are replica_seed(seed, step, r)'s, as documented.
    expected = view_assembly.cropped_views(crops, False, S, seed=augment_layers.replica_seed(
        cfg.seed, 0, 1))["view_1"]
    np.testing.assert_allclose(views[1], expected.numpy(), atol=1e-5)


def test_device_augmented_training_under_two_replicas_and_save_load(two_replica_strategy,
                                                                     tmp_path):
    cfg = _cfg(num_local_crops=2, local_crop_size=L, knn_crops=1, steps_per_epoch=2)
    data, steps = pipeline.distribute_pretrain_dataset(two_replica_strategy, cfg)
    model = training.build(cfg, two_replica_strategy, steps)
    history = model.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert int(model.optimizer.iterations.numpy()) == steps
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.view_augmentation, augment_layers.ViewAugmentation)
    assert loaded.view_augmentation.get_config() == model.view_augmentation.get_config()


def test_host_batches_into_a_device_model_fail_clearly():
    cfg = _cfg()
    model = training.build(cfg, tf.distribute.get_strategy(), 4)
    floats = {"view_1": tf.zeros([4, S, S, 3]), "view_2": tf.zeros([4, S, S, 3])}
    with pytest.raises(ValueError, match="uint8 crops"):
        model.augment_views(floats)


@pytest.mark.parametrize("layer", [
    augment_layers.ColorJitter(0.4, 0.4, 0.4, 0.1, probability=0.8, seed=1),
    augment_layers.RandomGrayscale(0.2, seed=1),
    augment_layers.RandomGaussianBlur(probability=0.5, seed=1),
    augment_layers.RandomHorizontalFlip(seed=1),
])
def test_single_op_layers_in_a_users_model(layer, tmp_path):
    """Usable on their own: in a Sequential model, identity at inference, a new draw per
    call in training, saved and loaded with their settings."""
    images = tf.cast(_colour_crops(32, S), tf.float32) / 255.0
    model = keras.Sequential([keras.Input((S, S, 3)), layer])
    np.testing.assert_array_equal(model(images, training=False).numpy(), images.numpy())
    a, b = model(images, training=True).numpy(), model(images, training=True).numpy()
    assert a.shape == images.shape and not np.array_equal(a, b)
    changed = np.abs(a - images.numpy()).max(axis=(1, 2, 3)) > 1e-6
    assert 0 < changed.mean() < 1  # Per image, with its probability.
    seed = tf.constant([3, 4], tf.int64)
    np.testing.assert_array_equal(layer(images, seed=seed).numpy(),
                                  layer(images, seed=seed).numpy())
    path = str(tmp_path / "layer.keras")
    model.save(path)
    again = keras.saving.load_model(path).layers[-1]
    assert type(again) is type(layer) and again.get_config() == layer.get_config()


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_ops_on_chosen_rows_only_equal_the_select_path(prob):
    """The host path computes each op only for the images drawn for it (gather, op,
    scatter); the static-shape path computes it for all and selects. Same draws, same
    views, also when no image or every image is drawn (an empty gather)."""
    spec = dataclasses.replace(recipe.STRONG, jitter_prob=prob, grayscale_prob=prob,
                               blur_prob=prob)
    images = tf.cast(_colour_crops(6, S), tf.float32) / 255.0
    seed = tf.constant([8, 1], tf.int64)
    rows = photometric.photometric(images, spec, seed, blur=True)
    select = photometric.photometric(images, spec, seed, blur=True, static_shapes=True)
    np.testing.assert_allclose(rows.numpy(), select.numpy(), atol=1e-5)
    if prob == 0.0:  # Nothing drawn (the flip is the crop's): every image is itself.
        np.testing.assert_array_equal(rows.numpy(), images.numpy())


def test_device_augmentation_compiles_with_xla():
    """TPU / GPU readiness: with jit_compile the model's augmentation takes static shapes
    and compiles with XLA (the rest of the step: test_wcl_model's XLA test), blur and local
    crops included, per-image draws kept."""
    cfg = _cfg(blur=True, num_local_crops=2, local_crop_size=L, knn_crops=1)
    model = training.build(cfg, tf.distribute.get_strategy(), 4)
    model.jit_compile = True
    model.optimizer.build(model.trainable_variables)
    crops = {"view_1": _colour_crops(8, S), "view_2": _colour_crops(8, S, 1),
             "local": tf.reshape(_colour_crops(16, L, 2), [8, 2, L, L, 3])}
    compiled = tf.function(model.augment_views, jit_compile=True)
    assert "HloModule" in compiled.experimental_get_compiler_ir(crops)(stage="hlo")
    views = compiled(crops)
    for key in crops:
        out = views[key].numpy()
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
        flat = out.reshape(8, -1)
        assert len({row.tobytes() for row in flat}) == 8  # Every image its own draw.


def test_consecutive_steps_inside_fit_draw_different_views():
    """The same crops fed at every step of model.fit (2 steps per execution, so two steps
    run inside one traced loop): each step's views are those of its own optimizer step,
    never the previous step's (a step read once at trace time would repeat them)."""
    steps = 4
    cfg = _cfg(steps_per_epoch=steps, epochs=1, steps_per_execution=2)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    model = training.build(cfg, strategy, steps)
    crops = {"view_1": _colour_crops(8, S), "view_2": _colour_crops(8, S, 1)}
    seen = tf.Variable(tf.zeros([steps, 8, S, S, 3]), trainable=False)
    augment_views = model.augment_views

    def recording(data):  # what train_step trains on, stored at its optimizer step
        views = augment_views(data)
        seen[tf.cast(model.optimizer.iterations, tf.int32)].assign(views["view_1"])
        return views

    model.augment_views = recording
    model.fit(tf.data.Dataset.from_tensors(crops).repeat(), epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == steps
    views = seen.numpy()
    for step in range(steps):
        expected = model.view_augmentation(crops, step=step, steps_per_epoch=steps)
        np.testing.assert_allclose(views[step], expected["view_1"].numpy(), atol=1e-6)
        for other in range(step):
            assert np.abs(views[step] - views[other]).mean() > 0.01, (step, other)


@pytest.mark.slow  # three short runs: 166 s measured on the loaded shared 2-core CPU
def test_sigterm_and_resume_with_device_augmentation_end_bit_identical(tmp_path):
    """augment_on="device" on the CPU: SIGTERM in epoch 2, the same call again resumes
    mid-epoch and ends with the uninterrupted run's weights and optimizer state (the
    device draws are keyed by the restored optimizer step)."""
    from test_preemption import _SigtermAt, _weights

    base = _cfg(model_dir=str(tmp_path / "ref"), epochs=2, max_eval_examples=50, knn_k=5,
                eval_every_epochs=0, verbose=0)
    reference = training.run(base, log=lambda line: None)
    cfg = base.replace(model_dir=str(tmp_path / "run"))
    with pytest.raises(training.Preempted, match="optimizer step 6"):
        training.run(cfg, log=lambda line: None, callbacks=[_SigtermAt(1, 1)])
    lines = []
    results = training.run(cfg, log=lines.append)
    assert "resuming in epoch 2 of 2 at step 2 of 4" in "\n".join(lines)
    assert results["augment_on"] == "device" and results["optimizer_steps"] == 8
    want, got = _weights(reference["checkpoint"]), _weights(results["checkpoint"])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
