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


# Rows whose nearest neighbour the cheap bound below cannot settle are resolved on their
# exactly symmetrised rows, this many at a time; more of them (many ties, e.g. collapsed
# embeddings) and the whole matrix is symmetrised.
_UNDECIDED_ROW_BUDGET = 32


def nearest_neighbours(v):
    """Index of each row's most cosine-similar other row, ties to the lowest index.

    Args:
      v: (n, d) float tensor, n >= 2. Rows need not be normalised.
    Returns:
      (n,) int32 tensor.
    """
    v = tf.math.l2_normalize(tf.cast(v, tf.float32), axis=1)
    # Finite unit rows give finite similarities (|v_i . v_j| <= 1), which is all the bound in
    # _nearest_neighbours needs; the rows' check costs n x d, not n x n.
    return _nearest_neighbours(tf.matmul(v, v, transpose_b=True),
                               tf.reduce_all(tf.math.is_finite(v)))


def nearest_neighbours_from_similarity(sim):
    """nearest_neighbours given the (n, n) similarity matrix.

    Decided on the symmetrised matrix U = (S + S^T) / 2, which is bit-symmetric (IEEE
    addition commutes): a GPU/TPU matmul kernel need not return v_i.v_j and v_j.v_i bit for
    bit, and with near ties such asymmetry can give a 1-NN cycle longer than 2, which breaks
    the pointer doubling below (module doc). Symmetric input passes through unchanged. U is
    computed only where the answer depends on it (_nearest_neighbours).
    """
    sim = tf.cast(sim, tf.float32)
    return _nearest_neighbours(sim, tf.reduce_all(tf.math.is_finite(sim)))


def _first_argmax(u):
    """Lowest column index of each row's maximum of u (b, n), int32. tf.argmax does not
    promise a tie-break. A row with NaNs matches nothing (n); clamping keeps every index
    valid so that such a step still runs to its non-finite loss, which the train step then
    discards."""
    n = tf.shape(u)[1]
    best = tf.reduce_max(u, axis=1, keepdims=True)
    cols = tf.range(n, dtype=tf.int32)[tf.newaxis, :]
    return tf.minimum(tf.reduce_min(tf.where(u >= best, cols, n), axis=1), n - 1)


def nearest_neighbours_symmetrised(sim):
    """The same answer as nearest_neighbours_from_similarity, by symmetrising the whole
    matrix: (S + S^T) / 2 with the diagonal masked, then each row's first maximum. Its
    fallback, and the reference it is tested (and benchmarked) against."""
    sim = tf.cast(sim, tf.float32)
    return _symmetrised_first_argmax(sim - 3.0 * tf.eye(tf.shape(sim)[0], dtype=sim.dtype))


def _symmetrised_first_argmax(masked):
    return _first_argmax(0.5 * (masked + tf.transpose(masked)))


def _nearest_neighbours(sim, finite):
    """First argmax of each row of U = (M + M^T) / 2, M = sim - 3 I (the self mask: the
    additive form is TPU-friendly), without forming U.

    With a_i, r1_i the column and value of the largest entry of M's row i (any of them if
    tied), r2_i the largest at another column and c_i the largest of M's column i: for
    every j != a_i, U[i, j] = fl(fl(M[i, j] + M[j, i]) / 2) <= fl(fl(r2_i + c_i) / 2) = hi_i,
    because rounded addition and halving are monotonic. So where hi_i < lo_i = U[i, a_i]
    (one gather), a_i is row i's only maximum of U: the answer, taken on U's bit-symmetric
    values. That needs three fused passes over M (argmax, runner-up, column max), no
    transposed copy. Rows the bound leaves open (near or exact ties) get their U row
    computed exactly, up to
    _UNDECIDED_ROW_BUDGET of them; more, or a non-finite `sim` (for which the bound proves
    nothing), and the whole U is formed. Every branch returns what
    nearest_neighbours_symmetrised returns (for |sim| < 2^127: U's diagonal then equals
    M's).
    """
    n = tf.shape(sim)[0]
    masked = sim - 3.0 * tf.eye(n, dtype=sim.dtype)
    # Any maximum will do for a (the bound below settles only unique ones); tf.math.top_k
    # would give r2 in the same pass but is a full sort under XLA on a CPU (25x slower).
    a = tf.argmax(masked, axis=1, output_type=tf.int32)
    rows = tf.range(n, dtype=tf.int32)
    r1 = tf.gather(masked, a, axis=1, batch_dims=1)
    r2 = tf.reduce_max(tf.where(rows[tf.newaxis, :] == a[:, tf.newaxis], -math.inf, masked),
                       axis=1)
    lo = 0.5 * (r1 + tf.gather_nd(masked, tf.stack([a, rows], axis=1)))  # U[i, a_i]
    hi = 0.5 * (r2 + tf.reduce_max(masked, axis=0))
    undecided = tf.logical_not(hi < lo)
    count = tf.reduce_sum(tf.cast(undecided, tf.int32))
    budget = min(_UNDECIDED_ROW_BUDGET, sim.shape[0] or _UNDECIDED_ROW_BUDGET)
    if sim.shape[0] is None:
        budget = tf.minimum(budget, n)

    def resolve_rows():
        # The undecided rows first (top_k keeps the lower index first among equals); the
        # rest of the budget recomputes decided rows, which gives the same answer.
        picked = tf.math.top_k(tf.cast(undecided, tf.int32), budget).indices
        u = 0.5 * (tf.gather(masked, picked)
                   + tf.transpose(tf.gather(masked, picked, axis=1)))
        return tf.tensor_scatter_nd_update(a, picked[:, tf.newaxis], _first_argmax(u))

    return tf.cond(
        tf.logical_and(finite, count <= budget),
        lambda: tf.cond(count > 0, resolve_rows, lambda: a),
        lambda: _symmetrised_first_argmax(masked))


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
