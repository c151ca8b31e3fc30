"""Process-wide random state and dtype policy, set for a block and then given back.

`training.build` seeds Python, NumPy, TensorFlow and Keras (so that a run's initial
weights and its tf.data ops depend only on cfg.seed) and sets Keras' global dtype policy
(so that layers are built in cfg.precision). A notebook that calls it should not find
its own seeds and policy changed afterwards: `scoped(seed, policy)` restores them.

Keras keeps its global seed and seed generator in `keras.src.backend.common.global_state`
(what `keras.utils.set_random_seed` writes); there is no public getter for the generator,
so that private module is read and restored here. TensorFlow's eager random state is the
context's global seed plus the generator that hands the next op seed to every unseeded
random op (`tf.random.set_seed` restarts it); both are private attributes of
`tensorflow.python.eager.context.context()`, saved and put back as they were (through
`tf.random.set_seed` the notebook's next `tf.random.uniform` would repeat its first draw).
"""

import contextlib
import copy
import random

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.random import seed_generator
from keras.src.utils import rng_utils
from tensorflow.python.eager import context

_KERAS_KEYS = (rng_utils.GLOBAL_RANDOM_SEED, seed_generator.GLOBAL_SEED_GENERATOR)


def _tf_state():
    """TensorFlow's eager global seed and its op-seed generator (a random.Random)."""
    ctx = context.context()
    return ctx._seed, copy.deepcopy(getattr(ctx, "_rng", None))  # pylint: disable=protected-access


def _set_tf_state(state):
    """Puts back a _tf_state() without tf.random.set_seed, which would restart the op-seed
    generator and clear the kernel cache (where explicitly seeded ops keep their state)."""
    ctx = context.context()
    ctx._seed, ctx._rng = state[0], copy.deepcopy(state[1])  # pylint: disable=protected-access


@contextlib.contextmanager
def scoped(seed=None, policy=None):
    """Within the block: keras.utils.set_random_seed(seed) (when not None) and Keras'
    global dtype policy `policy` (when not None); afterwards both are as they were."""
    saved_policy = keras.config.dtype_policy()
    saved_python, saved_numpy = random.getstate(), np.random.get_state()
    saved_tf = _tf_state()
    saved_keras = {key: global_state.get_global_attribute(key) for key in _KERAS_KEYS}
    try:
        if policy is not None:
            keras.config.set_dtype_policy(policy)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        yield
    finally:
        keras.config.set_dtype_policy(saved_policy)
        random.setstate(saved_python)
        np.random.set_state(saved_numpy)
        _set_tf_state(saved_tf)
        for key, value in saved_keras.items():
            global_state.set_global_attribute(key, value)


@contextlib.contextmanager
def no_global_tf_seed():
    """TensorFlow's global seed unset within the block, restored afterwards.

    For datasets whose random ops take a tensor seed of their own (the stream path's
    per-epoch shuffle): traced with a global seed of 0, TensorFlow's get_seed compares
    (0, seed_tensor) with (0, 0) and fails on the tensor's truth value; without a global
    seed the op seed alone decides, so the order depends on cfg.seed only.
    """
    saved = _tf_state()
    tf.random.set_seed(None)
    try:
        yield
    finally:
        _set_tf_state(saved)
