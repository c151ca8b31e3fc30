"""Test set-up: split the CPU into 2 logical devices before TensorFlow starts.

This lets real MirroredStrategy runs (2 replicas) execute in CI on a CPU-only box.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

SHARED_TFDS = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tfds"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def two_replica_strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
