"""A non-finite gradient on ONE replica, with a finite loss: no replica applies the step.

The fault is an identity layer after the backbone whose gradient is Inf on replica 1
only, so the global loss stays finite and only the all-replica gradient flag can see it.
Under dynamic loss scaling (LossScaleOptimizer, mixed_float16) Keras 3.15 decides on
replica 0's gradients alone: before the fix, the summed Inf reached the weights.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf.models import backbones, heads
from wcl_tf.models.wcl_model import WCLModel

N, S = 8, 16


class _InfGradOnReplica1(keras.layers.Layer):
    """Identity forward; backward multiplies the gradient by Inf on replica 1 while armed."""

    def __init__(self, armed, **kwargs):
        super().__init__(**kwargs)
        self.armed = armed

    def call(self, x):
        armed = self.armed

        @tf.custom_gradient
        def identity(x):
            def grad(dy):
                ctx = tf.distribute.get_replica_context()
                on_replica_1 = (ctx is not None and ctx.num_replicas_in_sync > 1
                                and ctx.replica_id_in_sync_group == 1)
                factor = tf.where(tf.logical_and(armed, on_replica_1), np.inf, 1.0)
                return dy * tf.cast(factor, dy.dtype)
            return tf.identity(x), grad

        return identity(x)


@pytest.fixture
def policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model(armed):
    keras.utils.set_random_seed(3)
    net = backbones.build_backbone("small_cnn", sync_bn=True, width=4)
    dim = net.output_shape[-1]
    backbone = keras.Sequential([keras.Input((S, S, 3)), net, _InfGradOnReplica1(armed)])
    model = WCLModel(backbone,
                     heads.build_projection_head(dim, 16, 8, sync_bn=True, name="instance_head"),
                     heads.build_projection_head(dim, 16, 8, sync_bn=True, name="graph_head"))
    model(tf.zeros([1, S, S, 3]))
    return model


def _data():
    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(size=(N, S, S, 3)).astype(np.float32) for k in ("view_1", "view_2")}
    return tf.data.Dataset.from_tensor_slices(batch).batch(N)


def _run(strategy, loss_scaled):
    armed = tf.Variable(True, trainable=False)
    with strategy.scope():
        model = _model(armed)
        optimizer = keras.optimizers.SGD(0.1)
        if loss_scaled:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=1024.0)
        model.compile(optimizer=optimizer)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(_data(), epochs=1, verbose=0).history
    return model, before, history, armed


# loss_scaled=False in the slow tier (CI's 20 minutes); in the default tier
# test_nonfinite::test_two_replicas_agree_to_skip (a non-finite step on 2 replicas, no loss
# scaling, not applied).
@pytest.mark.parametrize("loss_scaled", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_inf_gradient_on_one_replica_is_not_applied(two_replica_strategy, policy, loss_scaled):
    if loss_scaled:
        keras.mixed_precision.set_global_policy("mixed_float16")
    model, before, history, armed = _run(two_replica_strategy, loss_scaled)
    after = [w.numpy() for w in model.trainable_weights]
    assert np.isfinite(history["loss"][0])  # the loss never saw the fault
    assert all(np.isfinite(w).all() for w in after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # nothing applied
    assert int(model.optimizer.iterations.numpy()) == 1  # the schedule stays aligned
    if loss_scaled:
        # An overflow under loss scaling: scale halved, counter reset, not a "bad step".
        assert float(model.optimizer.dynamic_scale.numpy()) == 512.0
        assert int(model.optimizer.step_counter.numpy()) == 0
        assert history["nonfinite_steps"] == [0.0]
    else:
        assert history["nonfinite_steps"] == [1.0]
    # Disarmed, the next step is applied on every replica and stays finite.
    armed.assign(False)
    model.fit(_data(), epochs=1, verbose=0)
    moved = [w.numpy() for w in model.trainable_weights]
    assert all(np.isfinite(w).all() for w in moved)
    assert max(np.abs(a - b).max() for a, b in zip(after, moved)) > 0
    if loss_scaled:
        assert float(model.optimizer.dynamic_scale.numpy()) == 512.0
        assert int(model.optimizer.step_counter.numpy()) == 1


def test_loss_scale_grows_after_finite_steps(policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    armed = tf.Variable(False, trainable=False)
    model = _model(armed)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=64.0, dynamic_growth_steps=2))
    model.fit(_data().repeat(), epochs=1, steps_per_epoch=4, verbose=0)
    assert float(model.optimizer.dynamic_scale.numpy()) == 256.0  # doubled twice
    assert int(model.optimizer.iterations.numpy()) == 4
