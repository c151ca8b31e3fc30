"""Tests for wcl_tf.models.backbones and wcl_tf.models.heads.

ResNet-50 is built but only run on one tiny image; layer-level numerics are checked
against NumPy references of torchvision's (symmetric) padding.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from wcl_tf.models import backbones
from wcl_tf.models.backbones import backbone_output_dim, build_backbone
from wcl_tf.models.heads import build_projection_head


@pytest.fixture(scope="module")
def resnet50():
    return build_backbone("resnet50")


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _layers_of(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


def _images(rng, n, size):
    return rng.random((n, size, size, 3), dtype=np.float32)


# --- NumPy references of torch ops (NHWC, HWIO kernels) ---------------------------------

def _torch_conv2d(x, kernel, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += np.einsum("nhwc,cd->nhwd", patch, kernel[i, j])
    return out


def _torch_maxpool(x, size, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    ho = (x.shape[1] - size) // stride + 1
    wo = (x.shape[2] - size) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(size):
        for j in range(size):
            out = np.maximum(
                out, x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride])
    return out


def _torch_out(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


# --- shapes and sizes -------------------------------------------------------------------

@pytest.mark.parametrize("name, size, kwargs, dim", [
    ("small_cnn", 32, {"width": 8}, 64),
    ("small_cnn", 28, {"width": 32}, 256),
    ("resnet18_cifar", 32, {}, 512),
])
def test_output_shape_small_models(name, size, kwargs, dim, rng):
    model = build_backbone(name, **kwargs)
    assert model.name == "backbone"
    out = model(_images(rng, 2, size), training=False)
    assert tuple(out.shape) == (2, dim)
    assert backbone_output_dim(model) == dim
    assert np.all(np.isfinite(out.numpy()))


@pytest.mark.parametrize("size", [32, 64])
def test_resnet50_output_shape(resnet50, size, rng):
    out = resnet50(_images(rng, 1, size), training=False)
    assert tuple(out.shape) == (1, 2048)
    assert backbone_output_dim(resnet50) == 2048


@pytest.mark.parametrize("size", [33, 64])
def test_resnet50_feature_map_sizes_match_torchvision(resnet50, size):
    names = ["conv1", "maxpool", "layer1_2_out", "layer2_3_out", "layer3_5_out",
             "layer4_2_out"]
    probe = keras.Model(resnet50.input, [resnet50.get_layer(n).output for n in names])
    outs = probe.predict(np.zeros((1, size, size, 3), np.float32), verbose=0)
    s = _torch_out(size, 7, 2, 3)
    expected = [s]
    s = _torch_out(s, 3, 2, 1)
    expected += [s, s]
    for _ in range(3):
        s = _torch_out(s, 3, 2, 1)
        expected.append(s)
    assert [o.shape[1] for o in outs] == expected
    assert [o.shape[2] for o in outs] == expected
    assert [o.shape[3] for o in outs] == [64, 64, 256, 512, 1024, 2048]


def test_resnet50_padding_matches_torchvision_numerically(resnet50, rng):
    # Even sizes: Keras "same" at stride 2 would pad bottom/right only and shift the grid.
    x = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
    y = resnet50.get_layer("conv1")(resnet50.get_layer("conv1_pad")(x)).numpy()
    ref = _torch_conv2d(x, resnet50.get_layer("conv1").kernel.numpy(), 2, 3)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)

    x = rng.random((1, 8, 8, 64)).astype(np.float32)  # Post-ReLU, >= 0.
    y = resnet50.get_layer("maxpool")(resnet50.get_layer("maxpool_pad")(x)).numpy()
    np.testing.assert_allclose(y, _torch_maxpool(x, 3, 2, 1), rtol=0, atol=0)

    x = rng.standard_normal((1, 8, 8, 128)).astype(np.float32)
    conv = resnet50.get_layer("layer2_0_conv2")
    y = conv(resnet50.get_layer("layer2_0_conv2_pad")(x)).numpy()
    ref = _torch_conv2d(x, conv.kernel.numpy(), 2, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_normalization_uses_imagenet_statistics(rng):
    model = build_backbone("small_cnn", width=4)
    x = _images(rng, 2, 8)
    y = model.get_layer("normalize")(x).numpy()
    mean = np.array(backbones.IMAGENET_MEAN, np.float32)
    std = np.array(backbones.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(y, (x - mean) / std, rtol=1e-5, atol=1e-5)


# --- parameter counts, strides, convolutions --------------------------------------------

def test_parameter_counts(resnet50):
    # torchvision resnet50 / resnet18 parameter numel without fc (resnet18 with 3x3 stem).
    assert _trainable_count(resnet50) == 23_508_032
    assert _trainable_count(build_backbone("resnet18_cifar")) == 11_168_832
    w = 32  # 4 bias-free 3x3 convs + BN gamma/beta.
    expected = 9 * (3 * w + w * 2 * w + 2 * w * 4 * w + 4 * w * 8 * w) + 2 * 15 * w
    assert _trainable_count(build_backbone("small_cnn", width=w)) == expected


def test_resnet50_stride_on_3x3_conv(resnet50):
    convs = {layer.name: layer for layer in _layers_of(resnet50, keras.layers.Conv2D)}
    assert len(convs) == 53  # 1 stem + 16 blocks * 3 + 4 projections.
    assert convs["conv1"].strides == (2, 2) and convs["conv1"].kernel_size == (7, 7)
    strided = {"conv1"}
    for stage in (2, 3, 4):
        prefix = f"layer{stage}_0_"
        assert convs[prefix + "conv1"].kernel_size == (1, 1)
        assert convs[prefix + "conv1"].strides == (1, 1)
        assert convs[prefix + "conv2"].kernel_size == (3, 3)
        assert convs[prefix + "conv2"].strides == (2, 2)
        assert convs[prefix + "downsample_0"].strides == (2, 2)
        strided |= {prefix + "conv2", prefix + "downsample_0"}
    assert convs["layer1_0_downsample_0"].strides == (1, 1)  # 64 -> 256, no stride.
    assert {n for n, c in convs.items() if c.strides != (1, 1)} == strided


def test_resnet18_cifar_stem_and_strides():
    model = build_backbone("resnet18_cifar")
    convs = {layer.name: layer for layer in _layers_of(model, keras.layers.Conv2D)}
    assert len(convs) == 1 + 8 * 2 + 3
    assert convs["conv1"].kernel_size == (3, 3) and convs["conv1"].strides == (1, 1)
    assert not _layers_of(model, keras.layers.MaxPooling2D)
    assert {n for n, c in convs.items() if c.strides != (1, 1)} == {
        f"layer{s}_0_{c}" for s in (2, 3, 4) for c in ("conv1", "downsample_0")}


@pytest.mark.parametrize("name", ["resnet50", "resnet18_cifar", "small_cnn"])
def test_convolutions_have_no_bias(name, resnet50):
    model = resnet50 if name == "resnet50" else build_backbone(name, width=8)
    convs = _layers_of(model, keras.layers.Conv2D)
    assert convs
    for conv in convs:
        assert not conv.use_bias, conv.name
        assert conv.bias is None
        assert [w.name for w in conv.weights] == ["kernel"]


def test_conv_init_is_fan_out_normal(resnet50):
    # 1x1, 512 -> 2048: fan_out = 2048 (std 0.03125) != fan_in = 512 (std 0.0625).
    kernel = resnet50.get_layer("layer4_0_conv3").kernel.numpy()
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / 2048), rel=0.03)
    # Each layer has its own initializer seed: same-shape convs differ.
    a = resnet50.get_layer("layer1_1_conv2").kernel.numpy()
    b = resnet50.get_layer("layer1_2_conv2").kernel.numpy()
    assert not np.allclose(a, b)


@pytest.mark.parametrize("sync_bn", [False, True])
@pytest.mark.parametrize("name", ["resnet50", "resnet18_cifar", "small_cnn"])
def test_batch_norm_settings(name, sync_bn, resnet50):
    if name == "resnet50" and not sync_bn:
        model = resnet50
    else:
        model = build_backbone(name, sync_bn=sync_bn, width=8)
    bns = _layers_of(model, keras.layers.BatchNormalization)
    assert len(bns) == len(_layers_of(model, keras.layers.Conv2D))
    for bn in bns:
        assert bn.momentum == 0.9, bn.name
        assert bn.epsilon == 1e-5, bn.name
        assert bn.synchronized is sync_bn, bn.name


def test_name_prefix():
    model = build_backbone("small_cnn", width=4, name_prefix="ema")
    assert model.name == "ema_backbone"
    assert all(layer.name.startswith("ema_") for layer in model.layers)
    assert model.get_layer("ema_stage1_conv") is not None
    default = build_backbone("small_cnn", width=4)
    assert "stage1_conv" in [layer.name for layer in default.layers]


def test_unknown_backbone_raises():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet101")
    message = str(info.value)
    assert "resnet101" in message
    for valid in ("resnet50", "resnet18_cifar", "small_cnn"):
        assert valid in message


# --- projection head --------------------------------------------------------------------

@pytest.mark.parametrize("sync_bn", [False, True])
def test_projection_head_structure(sync_bn, rng):
    head = build_projection_head(16, 32, 8, sync_bn=sync_bn, name="graph_head")
    assert head.name == "graph_head"
    types = [type(layer).__name__ for layer in head.layers]
    assert types == ["InputLayer", "Dense", "BatchNormalization", "ReLU", "Dense",
                     "BatchNormalization", "ReLU", "Dense"]
    dense = _layers_of(head, keras.layers.Dense)
    assert [d.units for d in dense] == [32, 32, 8]
    assert all(d.use_bias for d in dense)
    assert all(d.activation is keras.activations.linear for d in dense)
    for bn in _layers_of(head, keras.layers.BatchNormalization):
        assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.9, 1e-5, sync_bn)
    assert all(layer.name.startswith("graph_head_") for layer in head.layers)
    # PyTorch nn.Linear init: uniform in +-1/sqrt(fan_in).
    k = dense[1].kernel.numpy()
    assert np.abs(k).max() <= 1 / np.sqrt(32) and k.std() > 0.5 / np.sqrt(3 * 32)
    out = head(rng.standard_normal((4, 16)).astype(np.float32), training=False).numpy()
    assert out.shape == (4, 8)
    # No normalisation inside: the caller L2-normalises.
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)


# --- serialization ----------------------------------------------------------------------

def test_keras_save_load_round_trip(tmp_path, rng):
    backbone = build_backbone("small_cnn", width=4)
    head = build_projection_head(backbone_output_dim(backbone), 16, 8)
    x = _images(rng, 4, 16)
    # Move the BN statistics away from their initial values first.
    head(backbone(x, training=True), training=True)
    for model, inputs in ((backbone, x), (head, backbone(x, training=False))):
        path = str(tmp_path / f"{model.name}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        assert loaded.name == model.name
        assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
        np.testing.assert_array_equal(
            loaded(inputs, training=False).numpy(), model(inputs, training=False).numpy())


# --- synchronized BatchNorm under MirroredStrategy --------------------------------------


def _two_replica_setup(strategy, sync_bn, rng):
    """Backbone + head built in the strategy, a one-device copy with equal weights, and a
    global batch of 4 whose two halves have different statistics."""
    x = _images(rng, 4, 8)
    x[2:] = 0.5 * x[2:] + 0.5
    with strategy.scope():
        backbone = build_backbone("small_cnn", sync_bn=sync_bn, width=4)
        head = build_projection_head(backbone_output_dim(backbone), 8, 4, sync_bn=sync_bn)
    ref_backbone = build_backbone("small_cnn", width=4)
    ref_head = build_projection_head(backbone_output_dim(backbone), 8, 4)
    ref_backbone.set_weights(backbone.get_weights())
    ref_head.set_weights(head.get_weights())

    def local_rows(ctx):
        i = ctx.replica_id_in_sync_group
        return tf.constant(x[2 * i:2 * i + 2])

    dist_x = strategy.experimental_distribute_values_from_function(local_rows)
    return x, (backbone, head), (ref_backbone, ref_head), dist_x


def _bn_stats(strategy, models):
    """{layer/stat: [per-replica values]} for every BN layer of `models`."""
    stats = {}
    for model in models:
        for bn in _layers_of(model, keras.layers.BatchNormalization):
            for var in (bn.moving_mean, bn.moving_variance):
                stats[f"{bn.name}/{var.name}"] = [
                    v.numpy() for v in strategy.experimental_local_results(var.value)]
    return stats


def _forward(strategy, models, dist_x, use_function):
    backbone, head = models

    def replica_fn(images):
        return head(backbone(images, training=True), training=True)

    def step(d):
        return strategy.run(replica_fn, args=(d,))

    if use_function:
        step = tf.function(step)
    return np.concatenate(
        [t.numpy() for t in strategy.experimental_local_results(step(dist_x))])


@pytest.mark.parametrize("use_function", [True, False], ids=["tf_function", "eager"])
def test_sync_bn_matches_one_device_global_batch(two_replica_strategy, use_function, rng):
    strategy = two_replica_strategy
    x, models, ref_models, dist_x = _two_replica_setup(strategy, True, rng)
    out = _forward(strategy, models, dist_x, use_function)
    ref_backbone, ref_head = ref_models
    ref_out = ref_head(ref_backbone(x, training=True), training=True).numpy()
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
    ref_stats = _bn_stats(tf.distribute.get_strategy(), ref_models)
    stats = _bn_stats(strategy, models)
    assert len(stats) == 2 * (4 + 2)
    for key, per_replica in stats.items():
        assert len(per_replica) == 2
        (ref,) = ref_stats[key]
        assert not np.allclose(ref, 0.0 if "mean" in key else 1.0), key  # Stats moved.
        for value in per_replica:
            np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-6, err_msg=key)


def test_unsynced_bn_keeps_per_replica_statistics(two_replica_strategy, rng):
    # Control for the test above: without synchronized=True each replica updates its own
    # copy of the moving statistics from its local half batch (aggregation NONE, no error),
    # so the copies differ from each other and from the global-batch statistics.
    strategy = two_replica_strategy
    x, models, ref_models, dist_x = _two_replica_setup(strategy, False, rng)
    _forward(strategy, models, dist_x, use_function=True)
    (ref,) = _bn_stats(tf.distribute.get_strategy(), ref_models)["stage1_bn/moving_mean"]
    replica0, replica1 = _bn_stats(strategy, models)["stage1_bn/moving_mean"]
    assert not np.allclose(replica0, replica1, atol=1e-4)
    assert not np.allclose(replica0, ref, atol=1e-4)


def test_sync_bn_gradients_sum_to_one_device_gradient(two_replica_strategy, rng):
    strategy = two_replica_strategy
    x, models, ref_models, dist_x = _two_replica_setup(strategy, True, rng)
    weights = rng.standard_normal((4, 4)).astype(np.float32)  # (n, d) fixed loss weights.

    def loss_fn(backbone, head, images, w):
        out = head(backbone(images, training=True), training=True)
        return tf.reduce_sum(out * w) / 4.0  # Share of the global-batch loss.

    def replica_fn(images):
        i = tf.distribute.get_replica_context().replica_id_in_sync_group
        w = tf.gather(weights, 2 * i + tf.range(2))
        variables = models[0].trainable_variables + models[1].trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_fn(*models, images, w)
        return tape.gradient(loss, variables)

    grads = tf.function(lambda d: strategy.run(replica_fn, args=(d,)))(dist_x)
    summed = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None).numpy()
              for g in grads]

    variables = ref_models[0].trainable_variables + ref_models[1].trainable_variables
    with tf.GradientTape() as tape:
        loss = loss_fn(*ref_models, x, weights)
    ref_grads = tape.gradient(loss, variables)
    assert len(summed) == len(ref_grads)
    for g, r, v in zip(summed, ref_grads, variables):
        r = r.numpy()
        # Synchronized BN computes var = E[x^2] - E[x]^2 (one pass), the one-device BN
        # two-pass moments: float32 round-off differs at about 1e-3 of the largest entry.
        # (Biases in front of a BN have a true gradient of 0: hence the absolute floor.)
        atol = max(2e-3 * np.abs(r).max(), 1e-5)
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=atol,
                                   err_msg=v.path)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_fused_batch_norm_equals_keras_batch_norm(training, rng):
    """FusedBatchNormalization (TF's fused kernel) = keras BatchNormalization: outputs,
    input and parameter gradients, moving statistics (biased variance, as Keras)."""
    from wcl_tf.models.batch_norm import FusedBatchNormalization

    x = tf.constant(rng.normal(2.0, 3.0, size=(4, 5, 6, 7)), tf.float32)
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
    for layer in (keras_bn, fused):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 7, dtype=np.float32))
        layer.beta.assign(np.linspace(-1.0, 1.0, 7, dtype=np.float32))
        layer.moving_mean.assign(np.full(7, 0.3, np.float32))
        layer.moving_variance.assign(np.full(7, 1.7, np.float32))
    weights = tf.sin(x)
    results = []
    for layer in (keras_bn, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * weights)
        results.append([loss, *tape.gradient(loss, [x, layer.gamma, layer.beta]),
                        layer.moving_mean, layer.moving_variance])
    for ours, theirs in zip(results[1], results[0]):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-5, atol=2e-5)
    moved = not np.allclose(keras_bn.moving_mean.numpy(), 0.3)
    assert moved == training


def test_fused_batch_norm_falls_back_and_serializes(rng):
    from wcl_tf.models.batch_norm import FusedBatchNormalization

    layer = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")
    dense_input = tf.constant(rng.normal(size=(6, 3)), tf.float32)  # 2-D: Keras path
    reference = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    np.testing.assert_allclose(layer(dense_input, training=True).numpy(),
                               reference(dense_input, training=True).numpy(), atol=1e-5)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is FusedBatchNormalization and clone.get_config() == layer.get_config()
    assert all(isinstance(bn, FusedBatchNormalization)
               for bn in _layers_of(build_backbone("small_cnn", width=4),
                                    keras.layers.BatchNormalization))
