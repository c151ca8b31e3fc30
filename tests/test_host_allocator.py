"""Importing wcl_tf makes TensorFlow keep host tensors in its BFC pool (wcl_tf/__init__.py):
a full-size batch is not faulted in page by page at every allocation, and a value the user
set in the environment is kept. Page faults are counted, not time (no timed tests)."""

import os
import subprocess
import sys

import pytest

resource = pytest.importorskip("resource")  # POSIX only.

# Ten ClipByValue ops on a (32, 224, 224, 3) float batch (19 MB, 4,704 pages); prints the
# minor page faults per op once the first two have run.
_FAULTS = """
import os, resource
import wcl_tf
import tensorflow as tf
x = tf.random.uniform([32, 224, 224, 3])
clip = tf.function(lambda x: tf.raw_ops.ClipByValue(t=x, clip_value_min=0.0,
                                                    clip_value_max=1.0))
clip(x); clip(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    clip(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(os.environ["TF_CPU_ALLOCATOR_USE_BFC"])
"""


def _faults_per_op(**env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_CPU_BFC_MEM_LIMIT_IN_MB")}
    environ.update(env, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                         env=environ, check=True).stdout.split()
    return float(out[-2]), out[-1]


def test_import_pools_host_tensors_and_keeps_the_users_choice():
    pooled, value = _faults_per_op()
    assert value == "true"
    malloc, kept = _faults_per_op(TF_CPU_ALLOCATOR_USE_BFC="false")
    assert kept == "false"  # The user's setting wins.
    if malloc < 1000:
        pytest.skip(f"this C library's malloc faulted {malloc:.0f} pages per 19 MB op: "
                    "nothing for the pool to save here")
    # malloc: every page of each new batch (4,705 per op on glibc); the pool: none.
    assert pooled < 100, (pooled, malloc)
