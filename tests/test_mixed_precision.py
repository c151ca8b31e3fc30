import numpy as np
import pytest
import keras
import tensorflow as tf

from wcl_tf.models.wcl_model import build_wcl_model

N, S = 16, 16


@pytest.fixture
def policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model():
    keras.utils.set_random_seed(5)
    return build_wcl_model("small_cnn", head_hidden_dim=32, head_output_dim=16, width=8,
                           image_size=S)


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_loss_matches_float32(policy, name):
    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(size=(N, S, S, 3)).astype(np.float32) for k in ("view_1", "view_2")}
    reference = _model()
    loss32, _ = reference.compute_objective(batch, training=True)
    keras.mixed_precision.set_global_policy(name)
    model = _model()
    model.set_weights(reference.get_weights())
    assert model.backbone.layers[-1].compute_dtype != "float32"
    loss16, logs = model.compute_objective(batch, training=True)
    assert loss16.dtype == tf.float32
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.01)


def test_mixed_float16_step_with_loss_scaling(policy):
    """One loss-scaled fp16 step moves the weights like the float32 step: same direction,
    same size (a missing or doubled unscale would be off by the scale, 2**10 here)."""
    rng = np.random.default_rng(1)
    batch = {k: rng.uniform(size=(N, S, S, 3)).astype(np.float32) for k in ("view_1", "view_2")}
    data = tf.data.Dataset.from_tensor_slices(batch).batch(N)
    reference = _model()
    start = [w.copy() for w in reference.get_weights()]
    reference.compile(optimizer=keras.optimizers.SGD(0.1))
    reference.fit(data, epochs=1, verbose=0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model()
    model.set_weights(start)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=1024.0))
    history = model.fit(data, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert float(model.optimizer.dynamic_scale.numpy()) == 1024.0  # no overflow here
    want = np.concatenate([(b - a).ravel() for a, b in zip(start, reference.get_weights())])
    got = np.concatenate([(b - a).ravel() for a, b in zip(start, model.get_weights())])
    cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cosine > 0.95, cosine
    assert 0.8 < np.linalg.norm(got) / np.linalg.norm(want) < 1.25


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_training_build_applies_the_precision_setting(policy, precision):
    from wcl_tf import training
    from wcl_tf.config import Config

    cfg = Config(backbone="small_cnn", width=4, head_hidden_dim=8, head_output_dim=4,
                 image_size=16, global_batch_size=8, epochs=1, warmup_epochs=0,
                 precision=precision)
    model = training.build(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"), 2)
    assert model.backbone.layers[-1].compute_dtype == precision.split("_")[1]
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")


def test_build_gives_a_notebook_its_policy_and_seeds_back(policy):
    import random

    from tensorflow.python.eager import context

    from wcl_tf import training
    from wcl_tf.config import Config

    def seed_everything():
        random.seed(11)
        np.random.seed(11)
        tf.random.set_seed(11)

    keras.config.set_dtype_policy("float32")
    seed_everything()
    expected = (random.random(), float(np.random.rand()))
    seed_everything()
    cfg = Config(backbone="small_cnn", width=4, head_hidden_dim=8, head_output_dim=4,
                 image_size=16, global_batch_size=8, epochs=1, warmup_epochs=0,
                 precision="mixed_bfloat16", seed=3)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    model = training.build(cfg, strategy, 2)
    assert model.backbone.layers[-1].compute_dtype == "bfloat16"  # built in cfg.precision
    assert keras.config.dtype_policy().name == "float32"  # the notebook's, given back
    assert context.global_seed() == 11
    assert (random.random(), float(np.random.rand())) == expected
    # Still seeded by cfg.seed: the same initial weights on a second build.
    again = training.build(cfg, strategy, 2)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
