"""The notebook API of wcl_tf/__init__.py: Config -> build_model -> pretrain_dataset ->
model.fit(dataset, epochs=N) with the epoch length given once, by the Config."""

import subprocess
import sys

import numpy as np

import wcl_tf


def test_fit_takes_the_epoch_length_from_the_config():
    cfg = wcl_tf.Config(dataset="embedded_mnist", image_size=16, backbone="small_cnn",
                        width=4, head_hidden_dim=16, head_output_dim=8, global_batch_size=16,
                        epochs=2, max_train_examples=48, warmup_epochs=1, weak_aug_epochs=1)
    model = wcl_tf.build_model(cfg)
    assert model.steps_per_epoch == 3  # 48 images / 16
    history = model.fit(wcl_tf.pretrain_dataset(cfg), epochs=cfg.epochs, verbose=0).history
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"][-1])
    assert int(model.optimizer.iterations.numpy()) == 6  # 2 epochs x 3 steps, no argument
    # The warm-up ended after one epoch of the schedule fit ran: the LR is past its peak.
    peak = cfg.learning_rate()
    lr = float(model.optimizer.learning_rate.numpy())
    assert 0 <= lr < peak


def test_import_does_not_start_tensorflow():
    out = subprocess.run([sys.executable, "-c", "import sys, wcl_tf; wcl_tf.Config; "
                          "print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_build_model_leaves_the_notebooks_tensorflow_draws_alone():
    """A notebook's tf.random draws after build_model continue as they would without the
    build: the global seed and the op-seed counter are given back (issue #19: restoring
    through tf.random.set_seed restarted the counter, so the next draw repeated the
    first)."""
    import tensorflow as tf

    cfg = wcl_tf.Config(dataset="embedded_mnist", image_size=16, backbone="small_cnn",
                        width=4, head_hidden_dim=8, head_output_dim=4, global_batch_size=16,
                        epochs=1, max_train_examples=32, warmup_epochs=0, seed=3)
    tf.random.set_seed(5)
    without = [tf.random.uniform([4]).numpy() for _ in range(3)]
    assert not np.array_equal(without[0], without[1])
    tf.random.set_seed(5)
    drawn = [tf.random.uniform([4]).numpy()]
    wcl_tf.build_model(cfg)
    drawn += [tf.random.uniform([4]).numpy() for _ in range(2)]
    np.testing.assert_array_equal(drawn, without)
