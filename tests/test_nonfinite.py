"""Non-finite guard: a NaN/Inf step is never applied; it stops the run (message with step
and LR, last good checkpoint kept and loadable) or is skipped up to N times."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf import callbacks as callbacks_lib
from wcl_tf import optimizers, run_folder, training
from wcl_tf.config import Config
from wcl_tf.export import load_checkpoint
from wcl_tf.models.wcl_model import build_wcl_model

_B, _S = 8, 16


def _model():
    keras.utils.set_random_seed(0)
    model = build_wcl_model("small_cnn", 16, 8, width=8, image_size=_S)
    cfg = Config(global_batch_size=_B, epochs=2, warmup_epochs=0, base_lr=0.1)
    model.compile(optimizer=optimizers.build_optimizer(cfg, 4))
    return model


def _batches(poisoned):
    """4 batches of two views; the batches listed in `poisoned` carry a NaN pixel."""
    rng = np.random.default_rng(1)
    views = rng.uniform(size=(4, 2, _B, _S, _S, 3)).astype(np.float32)
    for i in poisoned:
        views[i, 0, 0, 0, 0, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices(
        {"view_1": views[:, 0], "view_2": views[:, 1]})


def _weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def test_nonfinite_step_is_not_applied():
    model = _model()
    model.fit(_batches([]).take(1), verbose=0)  # build the optimizer
    before = _weights(model)
    steps = int(model.optimizer.iterations.numpy())
    logs = model.fit(_batches([0]).take(1), verbose=0).history
    after = _weights(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(model.optimizer.iterations.numpy()) == steps + 1  # schedule stays aligned
    assert logs["nonfinite_steps"] == [1.0]
    # The bad step does not enter the epoch means (they would be NaN).
    assert logs["loss"] == [0.0]


def test_two_replicas_agree_to_skip(two_replica_strategy):
    """Only replica 0's rows hold the NaN; both replicas must skip, or they diverge."""
    with two_replica_strategy.scope():
        model = _model()
    model.fit(_batches([]).take(1), verbose=0)
    before = _weights(model)
    model.fit(_batches([0]).take(1), verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model)))


def test_guard_stops_at_first_nonfinite_step_by_default():
    model = _model()
    guard = callbacks_lib.NonFiniteGuard(max_skips=0, log=lambda _: None)
    model.fit(_batches([2]), epochs=1, callbacks=[guard], verbose=0)
    assert guard.tripped is not None
    assert guard.tripped["optimizer_step"] == 2 and guard.tripped["batch"] == 3
    assert guard.tripped["learning_rate"] == pytest.approx(
        float(model.optimizer._learning_rate(2)))  # Keras' schedule lookup (private)
    assert all(np.isfinite(w).all() for w in _weights(model))


def test_guard_skips_up_to_n_steps_and_logs_each():
    model = _model()
    lines = []
    guard = callbacks_lib.NonFiniteGuard(max_skips=2, log=lines.append)
    history = model.fit(_batches([1, 3]), epochs=1, callbacks=[guard], verbose=0).history
    assert guard.tripped is None and guard.skipped == 2
    assert len(lines) == 2 and "optimizer step 1" in lines[0] and "update skipped" in lines[0]
    assert history["nonfinite_steps"] == [2.0] and np.isfinite(history["loss"][0])
    assert int(model.optimizer.iterations.numpy()) == 4
    # A third one is one too many.
    model.fit(_batches([0]), epochs=1, callbacks=[guard], verbose=0)
    assert guard.tripped is not None and guard.tripped["skipped_so_far"] == 3


class _PoisonWeights(keras.callbacks.Callback):
    """Sets one backbone kernel entry to NaN before batch `batch` of epoch `epoch` (0-based)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self._current = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._current, batch) == (self.epoch, self.batch):
            kernel = self.model.backbone.trainable_weights[0]
            value = kernel.numpy()
            value.flat[0] = np.nan
            kernel.assign(value)


def test_nan_stops_the_run_and_the_last_checkpoint_loads(tmp_path):
    cfg = Config(dataset="embedded_mnist", backbone="small_cnn", width=8, image_size=16,
                 head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=3,
                 steps_per_epoch=3, warmup_epochs=0, max_train_examples=64,
                 max_eval_examples=64, knn_k=5, local_crop_size=8,
                 model_dir=str(tmp_path / "run"), verbose=0)
    with pytest.raises(training.NonFiniteLossError) as err:
        training.run(cfg, log=lambda _: None, callbacks=[_PoisonWeights(epoch=1, batch=1)])
    message = str(err.value)
    # Epoch 2, batch 2: optimizer step 3 + 1 = 4, with its learning rate.
    assert "optimizer step 4 (epoch 2, batch 2, learning rate" in message, message
    assert "epoch_001.keras (epoch 1)" in message and "resumes from it" in message
    assert run_folder.latest_checkpoint(cfg.model_dir)[0] == 1
    assert not os.path.exists(run_folder.checkpoint_path(cfg.model_dir, 2))
    assert not os.path.exists(os.path.join(cfg.model_dir, run_folder.RESULTS_FILE))
    model = load_checkpoint(run_folder.checkpoint_path(cfg.model_dir, 1))
    assert all(np.isfinite(w).all() for w in model.get_weights())
    # The message's advice: the same command with --skip_nonfinite_steps resumes from
    # epoch 1 (the setting may change between attempts) and finishes.
    assert "--skip_nonfinite_steps=N" in message
    results = training.run(cfg.replace(skip_nonfinite_steps=2), log=lambda _: None)
    assert results["resumed_from_epoch"] == 1 and results["completed_epochs"] == 3


def test_guard_reads_the_count_once_per_execution():
    model = _model()
    model.compile(optimizer=model.optimizer, steps_per_execution=2)
    calls = []
    counter = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: calls.append(batch))
    lines = []
    guard = callbacks_lib.NonFiniteGuard(max_skips=2, log=lines.append)
    history = model.fit(_batches([1, 2]), epochs=1, callbacks=[guard, counter],
                        verbose=0).history
    assert len(calls) == 2  # one host read per execution of 2 steps, not 4
    assert guard.skipped == 2 and guard.tripped is None
    assert history["nonfinite_steps"] == [2.0]
    assert "one of optimizer steps 0-1" in lines[0] and "one of optimizer steps 2-3" in lines[1]
    assert int(model.optimizer.iterations.numpy()) == 4
