"""steps_per_execution > 1 on several replicas (WCLModel.make_train_function): Keras
3.15.1's own multi-step loop fails there at the first call ("You must feed a value for
placeholder tensor"); WCLModel's runs the same steps as steps_per_execution=1."""

import keras
import numpy as np
import tensorflow as tf

from wcl_tf.models.wcl_model import build_wcl_model


def _dataset_fn(ctx):
    """Endless, deterministic views: batch k of pipeline p drawn from seed (k, p)."""
    batch = ctx.get_per_replica_batch_size(4)

    def views(k):
        seed = tf.stack([k, tf.cast(ctx.input_pipeline_id, tf.int64)])
        x = tf.random.stateless_uniform([2, batch, 8, 8, 3], seed)
        return {"view_1": x[0], "view_2": x[1]}

    return tf.data.Dataset.range(1 << 30).map(views)


def _train(strategy, steps_per_execution):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_wcl_model("small_cnn", head_hidden_dim=8, head_output_dim=4, width=4,
                                image_size=8, gather_grad="full")
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      steps_per_execution=steps_per_execution)
    seen = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(int(model.optimizer.iterations.numpy()))

    history = model.fit(strategy.distribute_datasets_from_function(_dataset_fn), epochs=2,
                        steps_per_epoch=4, verbose=0, callbacks=[Steps()])
    return model, seen, history.history["loss"]


def test_two_steps_per_execution_on_two_replicas_train_as_one_step_per_call(
        two_replica_strategy):
    one, seen_one, loss_one = _train(two_replica_strategy, 1)
    two, seen_two, loss_two = _train(two_replica_strategy, 2)
    assert seen_one == list(range(1, 9)) and seen_two == [2, 4, 6, 8]
    assert int(two.optimizer.iterations.numpy()) == 8
    for a, b in zip(one.get_weights(), two.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_one, loss_two, rtol=1e-5)
    keras.utils.set_random_seed(0)
    initial = build_wcl_model("small_cnn", head_hidden_dim=8, head_output_dim=4, width=4,
                              image_size=8).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(initial, two.get_weights()))
