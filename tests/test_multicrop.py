"""KNN multi-crop (docs/method.md section 6): losses, selection, step equivalences, data."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import reference
from wcl_tf import losses
from wcl_tf import weak_labels as wl
from wcl_tf.config import Config, ConfigError
from wcl_tf.data import pipeline, view_assembly
from wcl_tf.models.wcl_model import build_wcl_model

N, S, M, L = 8, 16, 3, 8


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _batch(seed=0, m=M):
    rng = np.random.default_rng(seed)
    batch = {k: rng.uniform(size=(N, S, S, 3)).astype(np.float32) for k in ("view_1", "view_2")}
    batch["local"] = rng.uniform(size=(N, m, L, L, 3)).astype(np.float32)
    return batch


def _model(knn_crops=2, mu=1.0, lam=1.0):
    keras.utils.set_random_seed(3)
    # gather_grad="full": the option under which two replicas equal one.
    return build_wcl_model("small_cnn", head_hidden_dim=16, head_output_dim=8, width=4,
                           sync_bn=True, image_size=S, knn_crops=knn_crops,
                           local_loss_weight=mu, graph_loss_weight=lam, gather_grad="full")


@pytest.mark.parametrize("n,m,k", [(6, 4, 1), (16, 6, 3), (10, 2, 2)])
def test_local_losses_match_numpy(rng, n, m, k):
    z1, z2, v1, v2 = (_unit(rng, n, 8) for _ in range(4))
    z_loc, v_loc = _unit(rng, n, m, 8), _unit(rng, n, m, 8)
    tau = 0.2
    want_inst, want_graph, want_kept = reference.multicrop_local_losses(
        z1, z2, v1, v2, z_loc, v_loc, k, tau)
    _, kept = losses.select_local_crops(v_loc, v1, v2, k)
    np.testing.assert_array_equal(np.sort(kept.numpy(), 1), np.sort(want_kept, 1))
    z_kept = tf.reshape(tf.gather(z_loc, kept, batch_dims=1), [-1, 8])
    v_kept = tf.reshape(tf.gather(v_loc, kept, batch_dims=1), [-1, 8])
    rows = tf.repeat(tf.range(n), k)
    inst = losses.local_instance_loss_per_anchor(z_kept, z1, z2, rows, tau)
    graph = losses.local_graph_loss_per_anchor(
        v_kept, v1, v2, wl.weak_labels(v1), wl.weak_labels(v2), rows, tau)
    np.testing.assert_allclose(float(tf.reduce_mean(inst)), want_inst, rtol=1e-5)
    np.testing.assert_allclose(float(tf.reduce_mean(graph)), want_graph, rtol=1e-5)


def test_selection_keeps_the_most_similar_crops():
    v1 = np.array([[1.0, 0.0, 0.0]], np.float32)
    v2 = np.array([[0.8, 0.6, 0.0]], np.float32)  # global embedding ~ (0.95, 0.32, 0)
    v_loc = np.array([[[0, 0, 1],  # background: orthogonal
                       [0.9, 0.436, 0],  # close to the image
                       [0, 1, 0],  # somewhat related
                       [1, 0, 0]]], np.float32)  # close
    sim, kept = losses.select_local_crops(v_loc, v1, v2, 2)
    assert sorted(kept.numpy()[0].tolist()) == [1, 3]
    assert np.argmin(sim.numpy()[0]) == 0


def test_model_objective_matches_numpy():
    model = _model(knn_crops=2, mu=0.5, lam=1.0)
    batch = _batch()
    _, logs = model.compute_objective(batch, training=False)
    z1, v1 = (t.numpy() for t in model.embed(batch["view_1"]))
    z2, v2 = (t.numpy() for t in model.embed(batch["view_2"]))
    z_loc, v_loc = (t.numpy().reshape(N, M, -1)
                    for t in model.embed(batch["local"].reshape(N * M, L, L, 3)))
    inst, graph = reference.wcl_objective(z1, z2, v1, v2, 0.1)
    l_inst, l_graph, _ = reference.multicrop_local_losses(z1, z2, v1, v2, z_loc, v_loc, 2, 0.1)
    np.testing.assert_allclose(float(logs["local_instance_loss"]), l_inst, rtol=1e-5)
    np.testing.assert_allclose(float(logs["local_graph_loss"]), l_graph, rtol=1e-5)
    np.testing.assert_allclose(float(logs["loss"]), inst + graph + 0.5 * (l_inst + l_graph),
                               rtol=1e-5)


def _loss_and_grads(model, batch):
    with tf.GradientTape() as tape:
        loss, _ = model.compute_objective(batch, training=True)
    return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("case", ["k0", "m0"])
def test_k0_or_m0_equals_the_two_view_step(case):
    batch = _batch(m=M if case == "k0" else 0)
    two_view = {k: batch[k] for k in ("view_1", "view_2")}
    loss_a, grads_a = _loss_and_grads(_model(knn_crops=0), two_view)
    model = _model(knn_crops=0)
    loss_b, grads_b = _loss_and_grads(model, batch)
    assert loss_a == loss_b
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)
    # ...while K > 0 does change the loss.
    loss_c, _ = _loss_and_grads(_model(knn_crops=2), _batch())
    assert abs(loss_c - loss_a) > 1e-3


def test_two_replicas_equal_one_replica(two_replica_strategy):
    weights = _model().get_weights()
    batch = _batch()
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two_replica_strategy):
        with strategy.scope():
            model = _model()
            model.set_weights(weights)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        ds = tf.data.Dataset.from_tensor_slices(batch).batch(N)
        logs = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history
        results.append((model.get_weights(), logs))
    (w1, logs1), (w2, logs2) = results
    assert max(np.abs(a - b).max() for a, b in zip(weights, w1)) > 1e-3
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    for key in ("loss", "local_instance_loss", "local_graph_loss", "local_kept_sim"):
        np.testing.assert_allclose(logs1[key], logs2[key], rtol=1e-5)


def test_multi_crop_views_shapes_and_scales():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, size=(4, 32, 32, 3)), tf.uint8)
    views = view_assembly.multi_crop_views(images, True, 32, num_local=5, local_size=12,
                                           seed=tf.constant([1, 2], tf.int64))
    assert views["view_1"].shape == (4, 32, 32, 3)
    assert views["local"].shape == (4, 5, 12, 12, 3)
    local = views["local"].numpy()
    assert 0.0 <= local.min() and local.max() <= 1.0
    assert np.abs(local[:, 0] - local[:, 1]).mean() > 0.01  # crops differ


def test_pipeline_emits_local_crops():
    cfg = Config(dataset="embedded_mnist", image_size=16, global_batch_size=8,
                 num_local_crops=3, local_crop_size=8, knn_crops=2, max_train_examples=64)
    batch = next(iter(pipeline.make_pretrain_dataset(cfg, 8)))
    assert batch["local"].shape == (8, 3, 8, 8, 3)
    assert batch["view_1"].shape == (8, 16, 16, 3)


@pytest.mark.parametrize("changes,message", [
    (dict(num_local_crops=2, knn_crops=3), "knn_crops"),
    (dict(num_local_crops=2, local_crop_size=64), "local_crop_size"),
    (dict(local_crop_scale=(0.5, 0.1)), "local_crop_scale"),
])
def test_bad_multicrop_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(image_size=32, **changes).validate()


def test_multi_member_diagnostic_counts_large_components():
    model = _model(knn_crops=2)
    batch = _batch()
    _, logs = model.compute_objective(batch, training=False)
    _, v1 = model.embed(batch["view_1"])
    _, v2 = model.embed(batch["view_2"])
    expected = []
    for v in (v1, v2):
        labels = reference.scipy_components(reference.nearest_neighbours(v.numpy()))
        sizes = np.bincount(labels)[labels]
        expected.append(np.mean(sizes > 2))  # every image keeps K crops: a per-image mean
    np.testing.assert_allclose(float(logs["local_multi_member"]), np.mean(expected), rtol=1e-6)
