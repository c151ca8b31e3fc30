"""Trains a tiny run and SIGKILLs itself while the epoch-KILL_AT checkpoint is half written.

    python tests/checkpoint_kill_run.py MODEL_DIR KILL_AT [EPOCHS]

The kill lands inside Keras' model.save, after the archive's config and metadata are on
disk and before its weights: the file is a zip without its central directory. KILL_AT=0
runs to the end without a kill. Used by test_reliability.py.
"""

import os
import signal
import sys
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from wcl_tf import training  # noqa: E402
from wcl_tf.config import Config  # noqa: E402


def _kill_while_writing(epoch):
    original = zipfile.ZipFile.writestr
    marker = f".epoch_{epoch:03d}.partial.keras"

    def writestr(self, name, data, *args, **kwargs):
        if str(self.filename or "").endswith(marker) or (
                hasattr(self.fp, "name") and str(self.fp.name).endswith(marker)):
            self.fp.flush()
            os.fsync(self.fp.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, name, data, *args, **kwargs)

    zipfile.ZipFile.writestr = writestr


def main(model_dir, kill_at, epochs=3):
    if kill_at:
        _kill_while_writing(kill_at)
    cfg = Config(dataset="embedded_mnist", backbone="small_cnn", width=4, image_size=16,
                 head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=epochs,
                 steps_per_epoch=2, warmup_epochs=0, max_train_examples=64,
                 max_eval_examples=64, knn_k=5, local_crop_size=8, model_dir=model_dir,
                 verbose=0)
    results = training.run(cfg, log=print)
    print("RESUMED_FROM", results["resumed_from_epoch"], "COMPLETED",
          results["completed_epochs"])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:]))
