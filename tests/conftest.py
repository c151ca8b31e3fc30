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


# Started first, so that the two pytest processes (pytest.ini: -n 2) end together instead
# of one waiting for the other's last multi-minute test.
_LONGEST = ("test_multi_worker_run.py::", "test_notebook.py::test_notebook_executes",
            "test_preemption.py::test_sigterm", "test_installed_package.py::test_installed_")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with WCL_SLOW_TESTS=1: CI (the README's test command)
    must stay within 20 minutes on a 2-core box; the slow tier repeats what the default
    tier covers in a heavier form (benchmark modes other than gpu, a second two-worker
    run, two-worker numerics that the mirrored tests already pin down, kill-and-resume
    variants; each slow test names its default-tier cousin). The longest tests go first."""
    items.sort(key=lambda item: not any(name in item.nodeid for name in _LONGEST))
    if os.environ.get("WCL_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="slow tier: set WCL_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_collective_keys():
    """Gives each MirroredStrategy made after this a collective group key of its own.

    Every new MirroredStrategy over the same devices starts at the same collective group
    and instance keys, and TensorFlow's collective executor remembers instance parameters
    per process: a second strategy whose collectives differ in shape or order fails with
    "Shape mismatch in the collective instance 100" and then every later collective in the
    process fails too. TensorFlow's own tests bump this class attribute for the same reason.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 1000
    yield


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
    """data_dir of the generated stand-in for imagenet2012 (tests/fake_imagenet.py), built
    once per session in a temporary folder; the dataset's name is fake_imagenet.NAME."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    return stand_in.build(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture
def two_replica_strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
