"""wcl_tf.train's command line on two replicas of this machine's CPU.

    python tests/paper_shaped_run.py --config=r50_multicrop ... (any wcl_tf.train flags)

The CPU is split into two logical devices before TensorFlow starts, and --strategy=mirrored
builds a MirroredStrategy over both (on a machine without GPUs TensorFlow's default
MirroredStrategy holds the CPU alone). Everything else is the command line's own: flags,
exit status 143 after SIGTERM, resume on the same command. Used by test_paper_shaped_run.py.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from wcl_tf import strategy as strategy_lib  # noqa: E402
from wcl_tf import train  # noqa: E402

_build = strategy_lib.build_strategy


def _two_cpu_replicas(name="one_device", tpu=""):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return _build(name, tpu)


strategy_lib.build_strategy = _two_cpu_replicas

if __name__ == "__main__":
    sys.argv[0] = "wcl_tf.train"
    train.entry_point()
