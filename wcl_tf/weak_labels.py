"""Weak labels: connected components of the 1-nearest-neighbour graph.

docs/method.md section 2.2. For embeddings v (n, d), nn(i) = argmax_{j != i} cos(v_i, v_j)
with ties to the lowest index; the undirected graph with edges {i, nn(i)} is split
into connected components, and each row gets its component's id.

Everything is dense TensorFlow with static shapes (no scipy, no py_function), so it
compiles under XLA (and `weak_labels` always runs XLA-compiled) and runs identically on
every replica of a distributed step.

Why pointer doubling is exact here: the 1-NN graph is a functional graph (one
outgoing edge per node), so each component holds exactly one cycle, and with a
bit-symmetric similarity (nearest_neighbours computes each pair's value once and reads it
for both orders; given a matrix, it is symmetrised) and a
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

# Rows per block of the windows of nearest_neighbours (docs/performance.md: measured).
_BLOCK_ROWS = 256


def nearest_neighbours(v):
    """Index of each row's most cosine-similar other row, ties to the lowest index.

    Decided on a similarity matrix that is bit-symmetric by construction
    (_nearest_neighbours_in_windows); with no static row count, on the bound path
    (nearest_neighbours_bounded).

    Args:
      v: (n, d) float tensor, n >= 2. Rows need not be normalised.
    Returns:
      (n,) int32 tensor.
    """
    n = v.shape[0]
    if n is None:
        return nearest_neighbours_bounded(v)
    v = tf.cast(v, tf.float32)
    # Copies found on the rows as given: TensorFlow's eager l2_normalize rounded 475 of 2547
    # pairs of identical 8-d rows apart.
    later_copy, mate = _duplicates(v)
    v = tf.math.l2_normalize(v, axis=1)
    # Non-finite rows: no copy is set aside, so that every row is decided on U as before.
    finite = tf.reduce_all(tf.math.is_finite(v))
    nn = _nearest_neighbours_in_windows(v, _BLOCK_ROWS, tf.logical_and(later_copy, finite))
    return tf.where(tf.logical_and(finite, mate < n), mate, nn)


def _duplicates(v):
    """(later_copy, mate) for the rows of v (n, d): later_copy[i] when an identical row
    precedes i; mate[i] the lowest other row identical to i, else n.

    Identical rows are exact ties in exact arithmetic, but the windows compute v_i . v_a and
    v_i . v_b in different products (and with the operands' roles swapped), whose rounding
    can differ: 164 of 4096 copied 128-d rows went to another copy than the lowest
    (docs/performance.md). So a row with copies points at its lowest copy (cosine 1, the
    largest there is), and the later copies are masked as columns, which leaves each tie
    to the lowest index. Found by a
    stable sort on a hash of the rows' bits and a comparison with the previous sorted row:
    rows are merged only when equal (a hash collision between different rows interleaved
    with copies can only leave copies unmerged, to be decided on the computed values).
    """
    n, d = v.shape
    prime = 2147483647  # 2^31 - 1: products of residues < 2^62, sums of d residues < 2^63
    weights = tf.constant([pow(1000003, k, prime) for k in range(d)], tf.int64)
    bits = tf.math.floormod(tf.cast(tf.bitcast(v, tf.int32), tf.int64), prime)
    key = tf.math.floormod(tf.reduce_sum(tf.math.floormod(bits * weights, prime), 1), prime)
    order = tf.argsort(key, stable=True)
    rows = tf.gather(v, order)
    first = tf.concat([[True], tf.reduce_any(rows[1:] != rows[:-1], axis=1)], 0)
    run = tf.cumsum(tf.cast(first, tf.int32)) - 1
    # A run holds copies in increasing index order: its first row is the lowest.
    lowest = tf.math.unsorted_segment_min(order, run, n)
    second = tf.minimum(tf.math.unsorted_segment_min(tf.where(first, n, order), run, n), n)
    mate = tf.where(first, tf.gather(second, run), tf.gather(lowest, run))
    back = order[:, tf.newaxis]
    return (tf.scatter_nd(back, tf.logical_not(first), [n]), tf.scatter_nd(back, mate, [n]))


def nearest_neighbours_bounded(v):
    """nearest_neighbours on the whole matmul V V^T, decided by _nearest_neighbours' bound:
    the path for a row count known only at run time, and the previous in-graph path (a
    benchmark column)."""
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


def _layout(n, rows):
    """(blocks, rows per block) for n rows: one block up to `rows` rows, else an odd number
    of blocks (each pair of distinct blocks then meets in exactly one window, see
    _nearest_neighbours_in_windows) of about `rows` rows, padded by fewer than `blocks` rows."""
    if n <= rows:
        return 1, n
    blocks = -(-n // rows)
    blocks += 1 - blocks % 2
    return blocks, -(-n // blocks)


def _mirrored(block):
    """The square block with its upper triangle (diagonal included) copied onto its lower
    one: bit-symmetric whatever the matmul returned below the diagonal."""
    ids = tf.range(block.shape[0], dtype=tf.int32)
    return tf.where(ids[:, tf.newaxis] <= ids[tf.newaxis, :], block, tf.transpose(block))


def _first_max(u, axis, ids):
    """(max, lowest of `ids` (int32, one per entry along `axis`, 0 or 1) attaining it) along
    `axis` of u; where nothing attains it (a NaN max), the largest int32."""
    best = tf.reduce_max(u, axis=axis, keepdims=True)
    ids = ids[:, tf.newaxis] if axis == 0 else ids[tf.newaxis, :]
    first = tf.reduce_min(tf.where(u >= best, ids, tf.int32.max), axis=axis)
    return tf.squeeze(best, axis), first


class _Windows:
    """Block k of the padded unit rows against the window of blocks k, k+1, ..., k+h
    (mod the odd block count nb, h = (nb - 1) / 2): over the nb windows every pair of
    distinct blocks is multiplied exactly once (block j lies in block i's window iff
    j - i mod nb <= h, and then i does not lie in j's), each block once with itself. So
    the nb windows hold nb (nb + 1) / 2 block products, the upper triangle's count, and
    reading each stored value for both (i, j) and (j, i) makes U bit-symmetric by
    construction. The windows are contiguous rows of the padded rows followed by their
    first h blocks again: a slice each, no gather."""

    def __init__(self, v, rows, hidden=None):
        self.n, self.dim = v.shape
        self.blocks, self.rows = _layout(self.n, rows)
        self.half = (self.blocks - 1) // 2
        self.padded = self.blocks * self.rows
        self.width = (self.half + 1) * self.rows
        padded = tf.pad(v, [[0, self.padded - self.n], [0, 0]])
        self.v = tf.concat([padded, padded[:self.half * self.rows]], 0)
        # Padded rows are zero (similarity 0); -3 keeps them, and hidden rows, below every
        # real similarity (>= -1) in both directions, in the additive, TPU-friendly style
        # of the self mask.
        mask = tf.zeros([self.n]) if hidden is None else tf.where(hidden, -3.0, 0.0)
        mask = tf.concat([mask, tf.fill([self.padded - self.n], -3.0)], 0)
        self.mask = tf.concat([mask, mask[:self.half * self.rows]], 0)

    def product(self, k):
        """(rows, width) products of block k's rows with its window's, self and padding
        masked: the diagonal block mirrored, minus 3 on its diagonal."""
        start = k * self.rows
        p = tf.matmul(tf.slice(self.v, [start, 0], [self.rows, self.dim]),
                      tf.slice(self.v, [start, 0], [self.width, self.dim]), transpose_b=True)
        p += (tf.slice(self.mask, [start], [self.rows])[:, tf.newaxis]
              + tf.slice(self.mask, [start], [self.width])[tf.newaxis, :])
        own = _mirrored(p[:, :self.rows]) - 3.0 * tf.eye(self.rows, dtype=tf.float32)
        return tf.concat([own, p[:, self.rows:]], 1)


def _nearest_neighbours_in_windows(v, rows, hidden=None):
    """First argmax of each row of U - 3 I, U the similarity matrix of the unit rows v
    (n, d), bit-symmetric by construction (_Windows), ties to the lowest index.

    Window k gives candidates (value, lowest column attaining it) per row and column: for
    each of its rows, over its own block and over the rest of the window; for each column
    of the rest (rows of later blocks, mod nb), over block k's rows. The candidate sets of a
    row split its columns, so its answer is the lowest column among the candidates
    attaining its largest value. A NaN there is attained by nothing: index n, clamped to
    n - 1 as in _first_argmax. One window at a time in a loop: one compiled body (unrolled
    strips took about 2x the CPU time and compiled 1.8-3.6x as long: docs/performance.md),
    the window's products reduced while they are in cache, and no n x n matrix formed.
    `hidden` rows (bool (n,)) are masked like padding: nobody's neighbour, their own
    answers meaningless.
    """
    w = _Windows(v, rows, hidden)
    n, rows, blocks, half = w.n, w.rows, w.blocks, w.half
    if blocks == 1:
        _, first = _first_max(w.product(0), 1, tf.range(n, dtype=tf.int32))
        return tf.minimum(first, n - 1)

    def window(k):
        start = k * rows
        p = w.product(k)
        own_rows = start + tf.range(rows, dtype=tf.int32)
        # The rest wraps around the end: its lowest column is not always its first.
        rest_columns = (start + rows + tf.range(w.width - rows, dtype=tf.int32)) % w.padded
        return (*_first_max(p[:, :rows], 1, own_rows), *_first_max(p[:, rows:], 1, rest_columns),
                *_first_max(p[:, rows:], 0, own_rows))

    own, first_own, rest, first_rest, col, first_col = tf.map_fn(
        window, tf.range(blocks, dtype=tf.int32), fn_output_signature=(tf.float32, tf.int32) * 3)
    # Window k's column maxima (k, t, :) belong to row block k + 1 + t (mod nb): gathered
    # to (t, row block, :) by static indices.
    source = [[[(b - t) % blocks, t - 1] for b in range(blocks)] for t in range(1, half + 1)]
    col = tf.gather_nd(tf.reshape(col, [blocks, half, rows]), source)
    first_col = tf.gather_nd(tf.reshape(first_col, [blocks, half, rows]), source)
    values = tf.reshape(tf.concat([own[tf.newaxis], rest[tf.newaxis], col], 0),
                        [half + 2, w.padded])[:, :n]
    indices = tf.reshape(tf.concat([first_own[tf.newaxis], first_rest[tf.newaxis], first_col],
                                   0), [half + 2, w.padded])[:, :n]
    best = tf.reduce_max(values, axis=0, keepdims=True)
    return tf.minimum(tf.reduce_min(tf.where(values >= best, indices, n), axis=0), n - 1)


def _symmetric_similarity(v, rows):
    """The whole U - 3 I that _nearest_neighbours_in_windows decides on (padding dropped),
    for tests: each window's products in place, every other entry read across the
    diagonal."""
    w = _Windows(v, rows)
    ids = tf.range(w.padded, dtype=tf.int32)
    scattered = tf.zeros([w.padded, w.padded])
    for k in range(w.blocks):
        cols = (k * w.rows + tf.range(w.width)) % w.padded
        where = tf.stack(tf.meshgrid(k * w.rows + tf.range(w.rows), cols, indexing="ij"), -1)
        scattered = tf.tensor_scatter_nd_update(scattered, where, w.product(k))
    held = (ids[tf.newaxis, :] // w.rows - ids[:, tf.newaxis] // w.rows) % w.blocks <= w.half
    return tf.where(held, scattered, tf.transpose(scattered))[:w.n, :w.n]


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

    Always compiled with XLA, also inside a step that is not: XLA fuses the passes over each
    window's products (mirror, masks, maxima, tie-breaks) that TensorFlow runs one by one.
    For the previous whole-matrix path that was 1.3-1.6x faster on this project's CPU at
    n = 4096-16384 (docs/performance.md); not re-measured for the windows.
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
