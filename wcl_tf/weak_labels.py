"""Weak labels: connected components of the 1-nearest-neighbour graph.

docs/method.md section 2.2. For embeddings v (n, d), nn(i) = argmax_{j != i} cos(v_i, v_j)
with ties to the lowest index; the undirected graph with edges {i, nn(i)} is split
into connected components, and each row gets its component's id.

Everything is dense TensorFlow with static shapes (no scipy, no py_function), so it
compiles under XLA (and `weak_labels` always runs XLA-compiled) and runs identically on
every replica of a distributed step.

Why pointer doubling is exact here: the 1-NN graph is a functional graph (one
outgoing edge per node), so each component holds exactly one cycle, and with a
symmetric similarity (made bit-symmetric, whatever the matmul kernel returns) and a
fixed tie-break every cycle has length 2 (a pair of
mutual nearest neighbours; a longer cycle would need all its similarities equal and
its tie-break indices to decrease around the cycle, which is impossible). Following
nn 2^k >= n times from any node lands on its component's mutual pair {a, b}, and
min(a, b) names the component.
"""

import math

import tensorflow as tf


def nearest_neighbours(v):
    """Index of each row's most cosine-similar other row, ties to the lowest index.

    Args:
      v: (n, d) float tensor, n >= 2. Rows need not be normalised.
    Returns:
      (n,) int32 tensor.
    """
    v = tf.math.l2_normalize(tf.cast(v, tf.float32), axis=1)
    return nearest_neighbours_from_similarity(tf.matmul(v, v, transpose_b=True))


def nearest_neighbours_from_similarity(sim):
    """nearest_neighbours given the (n, n) similarity matrix.

    The matrix is symmetrised first, (S + S^T) / 2, which is bit-symmetric (IEEE addition
    commutes): a GPU/TPU matmul kernel need not return v_i.v_j and v_j.v_i bit for bit,
    and with near ties such asymmetry can give a 1-NN cycle longer than 2, which breaks
    the pointer doubling below (module doc). Symmetric input passes through unchanged.
    """
    sim = tf.cast(sim, tf.float32)
    sim = 0.5 * (sim + tf.transpose(sim))
    n = tf.shape(sim)[0]
    # Exclude self with an additive mask (no boolean selection: TPU-friendly).
    sim = sim - 3.0 * tf.eye(n, dtype=sim.dtype)
    best = tf.reduce_max(sim, axis=1, keepdims=True)
    cols = tf.range(n, dtype=tf.int32)[tf.newaxis, :]
    # Lowest index among the maxima: tf.argmax does not promise a tie-break. A row
    # with NaNs matches nothing (n); clamping keeps every index valid so that such a
    # step still runs to its non-finite loss, which the train step then discards.
    return tf.minimum(tf.reduce_min(tf.where(sim >= best, cols, n), axis=1), n - 1)


def components_of_functional_graph(nn):
    """Component id per node of the undirected graph with edges {i, nn[i]}.

    Valid when every cycle of nn has length 2, as for a 1-NN graph (see module doc).
    The id of a component is the smaller index of its mutual pair.

    Args:
      nn: (n,) int32 tensor, nn[i] != i.
    Returns:
      (n,) int32 tensor.
    """
    nn = tf.convert_to_tensor(nn, tf.int32)
    n_static = nn.shape[0]
    p = nn
    if n_static is not None:
        for _ in range(max(1, math.ceil(math.log2(max(n_static, 2))))):
            p = tf.gather(p, p)
    else:
        n = tf.shape(nn)[0]
        steps = tf.cast(tf.math.ceil(tf.math.log(tf.cast(n, tf.float32)) / math.log(2.0)), tf.int32)
        _, p = tf.while_loop(
            lambda i, q: i < tf.maximum(steps, 1),
            lambda i, q: (i + 1, tf.gather(q, q)),
            (tf.constant(0), p),
        )
    # p[i] is now on i's 2-cycle; the cycle's smaller index labels the component.
    return tf.minimum(p, tf.gather(nn, p))


@tf.function(jit_compile=True)
def _weak_labels_xla(v):
    return components_of_functional_graph(nearest_neighbours(v))


def weak_labels(v):
    """int32 component id per row of v (n, d); ids are row indices, not 0..C-1.

    Always compiled with XLA, also inside a step that is not: XLA fuses the passes over the
    n x n similarity matrix (self mask, row max, tie-break) that TensorFlow runs one by one,
    1.3-1.6x faster on this project's CPU at n = 4096-16384 (docs/performance.md).
    """
    return _weak_labels_xla(tf.stop_gradient(tf.cast(v, tf.float32)))


def num_components(labels):
    """Number of distinct components in a `weak_labels` output."""
    labels = tf.convert_to_tensor(labels, tf.int32)
    ids = tf.range(tf.shape(labels)[0], dtype=tf.int32)
    return tf.reduce_sum(tf.cast(tf.equal(labels, ids), tf.int32))


def component_sizes(labels):
    """(n,) number of members of the component named by each index (0 if none)."""
    labels = tf.convert_to_tensor(labels, tf.int32)
    n = tf.shape(labels)[0]
    return tf.math.unsorted_segment_sum(tf.ones_like(labels), labels, n)
