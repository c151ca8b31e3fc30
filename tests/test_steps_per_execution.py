"""--steps_per_execution=N with N not dividing the steps per epoch (issue #19): Keras 3
runs ceil(steps / N) * N steps per epoch from an endless dataset, so the schedule, the
weak-to-strong switch and the data epochs drifted from Keras' epochs and a mid-epoch
resume computed the wrong epoch. A run now uses the largest divisor of the epoch length
not above N, and says so."""

import keras
import numpy as np
import pytest

from wcl_tf import training
from wcl_tf.config import Config

from test_preemption import _SigtermAt, _weights

TINY = dict(dataset="embedded_mnist", image_size=16, backbone="small_cnn", width=4,
            head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=2,
            warmup_epochs=1, weak_aug_epochs=1, max_eval_examples=50, knn_k=5,
            eval_every_epochs=0, verbose=0)


@pytest.mark.parametrize("requested,steps,expected", [
    (2, 3, 1), (8, 31, 1), (8, 32, 8), (4, 97, 1), (5, 12, 4), (6, 12, 6), (50, 12, 12),
    (1, 7, 1)])
def test_execution_steps_is_the_largest_divisor_not_above_n(requested, steps, expected):
    assert training.execution_steps(requested, steps) == expected


class _StepsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_end(self, epoch, logs=None):
        self.steps.append(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))


def test_each_epoch_takes_exactly_steps_per_epoch_optimizer_steps(tmp_path):
    """The issue's reproduction: 3 steps per epoch, N=2 (Keras ran 4 per epoch)."""
    cfg = Config(model_dir=str(tmp_path), steps_per_epoch=3, steps_per_execution=2, **TINY)
    lines, seen = [], _StepsAtEpochEnd()
    results = training.run(cfg, log=lines.append, callbacks=[seen])
    assert seen.steps == [3, 6]
    assert results["optimizer_steps"] == 6
    assert "--steps_per_execution=2 does not divide the 3 steps per epoch: using 1" in (
        "\n".join(lines))


@pytest.mark.slow  # three short runs (99 s on the loaded 2-core CPU)
def test_sigterm_mid_epoch_resumes_under_another_n_to_the_uninterrupted_state(tmp_path):
    """6 steps per epoch, N=2, SIGTERM in epoch 2 (saved at step 8), resumed with N=3:
    the rest of the epoch (4 steps) runs 2 per execution, and the run ends at step 12
    with the uninterrupted run's weights and optimizer state."""
    ref_cfg = Config(model_dir=str(tmp_path / "ref"), steps_per_epoch=6,
                     steps_per_execution=2, **TINY)
    reference = training.run(ref_cfg, log=lambda line: None)
    assert reference["optimizer_steps"] == 12
    cfg = ref_cfg.replace(model_dir=str(tmp_path / "run"))
    with pytest.raises(training.Preempted, match="optimizer step 8"):
        training.run(cfg, log=lambda line: None, callbacks=[_SigtermAt(1, 0)])
    lines, seen = [], _StepsAtEpochEnd()
    results = training.run(cfg.replace(steps_per_execution=3), log=lines.append,
                           callbacks=[seen])
    assert "resuming in epoch 2 of 2 at step 2 of 6" in "\n".join(lines)
    assert seen.steps == [12] and results["optimizer_steps"] == 12
    want, got = _weights(reference["checkpoint"]), _weights(results["checkpoint"])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
