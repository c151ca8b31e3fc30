"""Runs the first steps of the demo config and prints their losses as JSON (one line).

    python tests/determinism_run.py MODEL_DIR SEED STEPS

Used by test_determinism.py: two processes with the same --seed must print the same.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from wcl_tf import training  # noqa: E402
from wcl_tf.config import Config  # noqa: E402


class _StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        # Running mean of the epoch so far: equal sequences <=> equal per-step losses.
        self.losses.append(float(logs["loss"]))


def main(model_dir, seed, steps):
    # configs/demo.flags, cut to `steps` steps of one epoch.
    cfg = Config(dataset="embedded_mnist", image_size=28, backbone="small_cnn", width=32,
                 head_hidden_dim=256, head_output_dim=64, global_batch_size=128,
                 epochs=1, steps_per_epoch=steps, warmup_epochs=1, weak_aug_epochs=0,
                 knn_k=20, max_eval_examples=256, seed=seed, model_dir=model_dir,
                 verbose=0)
    recorder = _StepLosses()
    training.run(cfg, log=lambda _: None, callbacks=[recorder])
    print(json.dumps(recorder.losses))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
