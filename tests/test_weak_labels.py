import numpy as np
import pytest
import tensorflow as tf

import reference
from wcl_tf import weak_labels as wl


def _clustered(rng, n, d, clusters, noise):
    centres = rng.normal(size=(clusters, d))
    return centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))


@pytest.mark.parametrize("n,d", [(2, 3), (3, 2), (17, 8), (256, 16), (1000, 32), (4096, 16)])
def test_random_inputs_match_scipy(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    nn = wl.nearest_neighbours(v).numpy()
    np.testing.assert_array_equal(nn, reference.nearest_neighbours(v))
    labels = wl.weak_labels(v).numpy()
    assert reference.same_partition(labels, reference.scipy_components(nn))


@pytest.mark.parametrize("n", [64, 4096])
def test_clustered_inputs_match_scipy(rng, n):
    v = _clustered(rng, n, 8, clusters=5, noise=0.05).astype(np.float32)
    labels = wl.weak_labels(v).numpy()
    nn = reference.nearest_neighbours(v)
    assert reference.same_partition(labels, reference.scipy_components(nn))
    assert wl.num_components(labels).numpy() == len(np.unique(labels))


def test_ties_go_to_the_lowest_index():
    # Rows 1, 2 and 3 are identical: each of them is equally close to the others.
    v = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [1, 0.01]], np.float32)
    nn = wl.nearest_neighbours(v).numpy()
    np.testing.assert_array_equal(nn, [4, 2, 1, 1, 0])
    labels = wl.weak_labels(v).numpy()
    assert reference.same_partition(labels, [0, 1, 1, 1, 0])


def test_many_ties_match_scipy(rng):
    # Quantised embeddings: plenty of exactly equal similarities.
    v = rng.integers(-1, 2, size=(512, 3)).astype(np.float32)
    v[np.all(v == 0, axis=1)] = 1.0
    nn = wl.nearest_neighbours(v).numpy()
    np.testing.assert_array_equal(nn, reference.nearest_neighbours(v))
    assert reference.same_partition(wl.weak_labels(v).numpy(), reference.scipy_components(nn))


def test_long_chain_is_one_component():
    # Points on a line with growing gaps: i's nearest neighbour is i - 1, a chain
    # of depth n - 2 that min-label propagation would need n steps for.
    n = 100
    angles = np.cumsum(np.linspace(0.01, 0.03, n))
    v = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    nn = reference.nearest_neighbours(v)
    assert len(np.unique(reference.scipy_components(nn))) == 1
    np.testing.assert_array_equal(wl.nearest_neighbours(v).numpy(), nn)
    assert nn[-1] == n - 2 and nn[2] == 1  # really a chain
    labels = wl.weak_labels(v).numpy()
    assert len(np.unique(labels)) == 1


def test_every_component_has_two_members(rng):
    labels = wl.weak_labels(rng.normal(size=(300, 4)).astype(np.float32))
    sizes = wl.component_sizes(labels).numpy()
    assert sizes[sizes > 0].min() >= 2
    assert sizes.sum() == 300


def test_compiles_with_xla(rng):
    v = rng.normal(size=(128, 8)).astype(np.float32)
    fn = tf.function(wl.weak_labels, jit_compile=True)
    assert reference.same_partition(fn(v).numpy(), wl.weak_labels(v).numpy())
    # Also without a static batch size (tf.while_loop path).
    dyn = tf.function(wl.weak_labels, input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    assert reference.same_partition(dyn(v).numpy(), wl.weak_labels(v).numpy())


def test_asymmetric_similarity_from_a_kernel_still_gives_valid_components():
    # Three near-tied points whose matmul came back slightly asymmetric (as GPU/TPU kernels
    # may): row 0 prefers 1, row 1 prefers 2, row 2 prefers 0 -- a 3-cycle, on which
    # pointer doubling is not exact. Symmetrised, the ties go to the lowest index.
    e = 1e-6
    sim = np.array([[1.0, 0.9 + e, 0.9],
                    [0.9, 1.0, 0.9 + e],
                    [0.9 + e, 0.9, 1.0]], np.float32)
    assert not np.array_equal(sim, sim.T)
    nn = wl.nearest_neighbours_from_similarity(tf.constant(sim)).numpy()
    np.testing.assert_array_equal(nn, [1, 0, 0])
    labels = wl.components_of_functional_graph(nn).numpy()
    assert reference.same_partition(labels, reference.scipy_components(nn))


def test_symmetrising_changes_nothing_for_symmetric_input(rng):
    v = rng.normal(size=(64, 8)).astype(np.float32)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = (unit @ unit.T).astype(np.float32)
    sim = np.triu(sim) + np.triu(sim, 1).T  # exactly symmetric
    np.testing.assert_array_equal(wl.nearest_neighbours_from_similarity(tf.constant(sim)),
                                  reference.nearest_neighbours(v))


def _whole_matrix_symmetrised(sim):
    """The previous implementation, verbatim: symmetrise all of S, mask self, first max."""
    sim = tf.cast(sim, tf.float32)
    sim = 0.5 * (sim + tf.transpose(sim))
    n = tf.shape(sim)[0]
    sim = sim - 3.0 * tf.eye(n, dtype=sim.dtype)
    best = tf.reduce_max(sim, axis=1, keepdims=True)
    cols = tf.range(n, dtype=tf.int32)[tf.newaxis, :]
    return tf.minimum(tf.reduce_min(tf.where(sim >= best, cols, n), axis=1), n - 1)


def _adversarial_similarities(rng, n, count):
    """Similarity matrices as a matmul kernel may return them, and worse: exactly symmetric,
    off by one ulp between S[i, j] and S[j, i] (in either direction, at the row maxima
    too), with exact and near ties (duplicate and quantised rows, a row maximum copied to
    other columns), clustered and collapsed embeddings."""
    for k in range(count):
        kind = k % 6
        if kind == 0:
            v = rng.normal(size=(n, 8))
        elif kind == 1:  # duplicates: exact ties
            v = rng.normal(size=(n, 8))
            v[rng.integers(0, n, n // 3)] = v[rng.integers(0, n, n // 3)]
        elif kind == 2:  # quantised: many equal similarities
            v = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
            v[np.all(v == 0, axis=1)] = 1.0
        elif kind == 3:
            v = _clustered(rng, n, 8, clusters=3, noise=1e-4)
        elif kind == 4:  # all but collapsed: every row undecided
            v = np.ones((n, 4)) + 1e-7 * rng.normal(size=(n, 4))
        else:
            v = rng.normal(size=(n, 4))
        unit = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        sim = unit @ unit.T
        if k % 2:
            sim = np.triu(sim) + np.triu(sim, 1).T  # exactly symmetric
        # One-ulp asymmetry on a random third of the entries, and on every row maximum.
        flip = rng.random((n, n)) < 1 / 3
        off = sim - 3 * np.eye(n, dtype=np.float32)
        flip[np.arange(n), off.argmax(1)] = True
        sim = np.where(flip, np.nextafter(sim, np.where(rng.random((n, n)) < 0.5,
                                                        np.inf, -np.inf).astype(np.float32)),
                       sim).astype(np.float32)
        if k % 3 == 0:  # a row's maximum copied to another column: an exact tie in S
            i, j = rng.integers(0, n, 2)
            if i != j:
                sim[i, j] = off[i].max()
        yield sim


@pytest.mark.parametrize("n", [3, 40, pytest.param(2, marks=pytest.mark.slow),
                               pytest.param(5, marks=pytest.mark.slow),
                               pytest.param(96, marks=pytest.mark.slow)])
def test_equals_the_whole_matrix_symmetrisation_on_adversarial_inputs(rng, n, monkeypatch):
    """Every branch (bound settles the row; undecided rows resolved on their own; whole
    matrix) returns the previous implementation's 1-NN bit for bit, eager and under XLA
    with static shapes."""
    spec = [tf.TensorSpec([n, n], tf.float32)]
    old = tf.function(_whole_matrix_symmetrised, input_signature=spec)
    sims = list(_adversarial_similarities(rng, n, 24))
    undecided_somewhere = False
    for budget in (wl._UNDECIDED_ROW_BUDGET, 0, n):  # default; whole matrix; rows only
        monkeypatch.setattr(wl, "_UNDECIDED_ROW_BUDGET", budget)
        new_xla = tf.function(wl.nearest_neighbours_from_similarity, jit_compile=True,
                              input_signature=spec)
        for sim in sims:
            want = old(sim).numpy()
            np.testing.assert_array_equal(new_xla(sim).numpy(), want)
            np.testing.assert_array_equal(wl.nearest_neighbours_from_similarity(sim), want)
            np.testing.assert_array_equal(wl.nearest_neighbours_symmetrised(sim), want)
            np.testing.assert_array_equal(
                wl.components_of_functional_graph(new_xla(sim)).numpy(),
                wl.components_of_functional_graph(want).numpy())
            t = 0.5 * (sim + sim.T) - 3 * np.eye(n, dtype=np.float32)
            undecided_somewhere |= bool(np.any(np.sum(t == t.max(1, keepdims=True), 1) > 1))
    assert undecided_somewhere or n < 5  # the inputs held exact ties of symmetrised rows


def test_last_bit_asymmetry_at_the_row_maximum():
    # S[0, 1] > S[0, 2] by one ulp but S[1, 0] < S[2, 0] by three: on U, 2 wins row 0
    # although the raw row maximum is at 1 (the bound must not settle it); row 2 ties on U.
    x = np.float32(0.75)
    up = np.nextafter(x, np.float32(1))
    down3 = x
    for _ in range(3):
        down3 = np.nextafter(down3, np.float32(0))
    sim = np.array([[1, up, x, 0],
                    [down3, 1, x, 0],
                    [x, x, 1, 0],
                    [0, 0, 0, 1]], np.float32)
    want = _whole_matrix_symmetrised(sim).numpy()
    np.testing.assert_array_equal(want, [2, 2, 0, 0])
    np.testing.assert_array_equal(wl.nearest_neighbours_from_similarity(sim), want)
    xla = tf.function(wl.nearest_neighbours_from_similarity, jit_compile=True)
    np.testing.assert_array_equal(xla(tf.constant(sim)), want)


@pytest.mark.parametrize("n,d", [(512, 16), pytest.param(4096, 128, marks=pytest.mark.slow)])
def test_bound_path_equals_the_previous_implementation_on_embeddings(rng, n, d):
    """The bound path (no static row count) under XLA against the whole-matrix
    symmetrisation of the same matmul, labels bit for bit, on random, clustered and
    duplicate-holding embeddings."""
    def bounded(v):
        return wl.components_of_functional_graph(wl.nearest_neighbours_bounded(v))

    def previous(v):
        v = tf.math.l2_normalize(v, axis=1)
        return wl.components_of_functional_graph(
            _whole_matrix_symmetrised(tf.matmul(v, v, transpose_b=True)))

    previous = tf.function(previous, jit_compile=True)
    for v in (rng.normal(size=(n, d)), _clustered(rng, n, d, clusters=7, noise=0.01),
              np.repeat(rng.normal(size=(n // 2, d)), 2, axis=0)):
        v = tf.constant(v, tf.float32)
        np.testing.assert_array_equal(tf.function(bounded, jit_compile=True)(v).numpy(),
                                      previous(v).numpy())


def test_non_finite_similarities_take_the_whole_matrix_path(rng):
    sim = rng.normal(size=(6, 6)).astype(np.float32)
    sim[2, 4] = np.nan
    sim[1, 3] = np.inf
    np.testing.assert_array_equal(wl.nearest_neighbours_from_similarity(sim),
                                  _whole_matrix_symmetrised(sim).numpy())
    v = rng.normal(size=(6, 3)).astype(np.float32)
    v[3, 0] = np.nan
    nn = wl.nearest_neighbours(v).numpy()
    assert np.all((nn >= 0) & (nn < 6))


def _embeddings(rng, kind, n, d):
    """Random, clustered, exactly duplicated (exact ties) or quantised (many equal
    similarities) rows."""
    if kind == "random":
        return rng.normal(size=(n, d)).astype(np.float32)
    if kind == "clustered":
        return _clustered(rng, n, d, clusters=3, noise=0.05).astype(np.float32)
    if kind == "duplicated":
        v = rng.normal(size=(n, d))
        return v[rng.integers(0, max(1, n // 2), n)].astype(np.float32)
    v = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
    v[np.all(v == 0, axis=1)] = 1.0
    return v


@pytest.mark.parametrize("n", [2, 13, 41])
def test_windows_matrix_is_bit_symmetric_and_the_matmul(rng, n):
    """With 4 rows a block (n = 13, 41: padded; n = 2: one block), U is exactly symmetric
    and within rounding of V V^T, and the windows' 1-NN (eager and XLA) is the first
    maximum of each row of U - 3 I, ties included."""
    xla = tf.function(lambda x: wl._nearest_neighbours_in_windows(x, 4), jit_compile=True)
    u_xla = tf.function(lambda x: wl._symmetric_similarity(x, 4), jit_compile=True)
    for kind in ("random", "clustered", "duplicated", "quantised"):
        unit = tf.math.l2_normalize(_embeddings(rng, kind, n, 3), axis=1)
        u = wl._symmetric_similarity(unit, 4).numpy()
        np.testing.assert_array_equal(u, u.T)
        np.testing.assert_allclose(u + 3 * np.eye(n), unit.numpy() @ unit.numpy().T,
                                   rtol=0, atol=1e-6)
        want = u.argmax(axis=1)  # NumPy's argmax takes the first maximum
        np.testing.assert_array_equal(wl._nearest_neighbours_in_windows(unit, 4), want)
        # The same products under XLA may round differently; the rule is the same.
        np.testing.assert_array_equal(xla(unit), u_xla(unit).numpy().argmax(axis=1))


@pytest.mark.parametrize("n", [2, 13, 600])
def test_nearest_neighbours_match_the_reference(rng, n, monkeypatch):
    """nearest_neighbours, eager and XLA, equals the float64 reference on random, clustered
    and exactly duplicated rows (copies: ties to the lowest index) in small blocks (4 rows:
    n = 13 padded, n = 2 one block) and in its own (n = 600: three blocks of 200)."""
    if n < 600:
        monkeypatch.setattr(wl, "_BLOCK_ROWS", 4)
    xla = tf.function(wl.nearest_neighbours, jit_compile=True)
    for kind in ("random", "clustered", "duplicated"):
        v = _embeddings(rng, kind, n, 8)
        nn = reference.nearest_neighbours(v)
        np.testing.assert_array_equal(wl.nearest_neighbours(v), nn)
        np.testing.assert_array_equal(xla(v), nn)
        labels = wl.components_of_functional_graph(nn).numpy()
        assert reference.same_partition(labels, reference.scipy_components(nn))


def test_weak_labels_in_windows_match_scipy(rng):
    """The public path in its own blocks: n = 257 is three blocks of 86 rows with one padded
    row."""
    for n in (257,):
        for kind in ("random", "clustered", "duplicated"):
            v = _embeddings(rng, kind, n, 8)
            nn = reference.nearest_neighbours(v)
            assert reference.same_partition(wl.weak_labels(v).numpy(),
                                            reference.scipy_components(nn))


def test_copies_point_at_their_lowest_copy():
    """Rows 1, 3 and 4 are copies, 0 and 2 another pair; 5 is nearest to the first pair."""
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    v = np.array([b, a, b, a, a, [0.9, 0.1, 0.0]], np.float32)
    np.testing.assert_array_equal(wl.nearest_neighbours(v), [2, 3, 0, 1, 1, 1])
    later_copy, mate = wl._duplicates(tf.math.l2_normalize(v, axis=1))
    np.testing.assert_array_equal(later_copy, [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(mate, [2, 3, 0, 1, 1, 6])
def test_diagonal_blocks_are_mirrored(rng):
    """A kernel need not return P[r, c] and P[c, r] bit for bit: the upper triangle is
    kept and read for both."""
    p = rng.normal(size=(5, 5)).astype(np.float32)
    m = wl._mirrored(tf.constant(p)).numpy()
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(np.triu(m), np.triu(p))


def test_padding_is_nobodys_neighbour():
    """Row 0's similarities are all negative, below a zero padding row's 0: five rows in
    blocks of 2 are three blocks, one padded row."""
    v = np.array([[1, 0], [-0.5, 1], [-1, 0.1], [-1, 0.2], [-1, -0.3]], np.float32)
    unit = tf.math.l2_normalize(v, axis=1)
    want = reference.nearest_neighbours(v)
    assert wl._layout(5, 2) == (3, 2) and want[0] == 1
    np.testing.assert_array_equal(wl._nearest_neighbours_in_windows(unit, 2), want)
    xla = tf.function(lambda x: wl._nearest_neighbours_in_windows(x, 2), jit_compile=True)
    np.testing.assert_array_equal(xla(unit), want)


def test_windows_layout():
    assert wl._layout(256, 256) == (1, 256)
    assert wl._layout(257, 256) == (3, 86)
    assert wl._layout(4096, 256) == (17, 241)  # 16 blocks would be even
    blocks, rows = wl._layout(16384, 256)
    assert blocks % 2 == 1 and 0 <= blocks * rows - 16384 < rows


def test_non_finite_rows_give_valid_indices(rng, monkeypatch):
    """A NaN or infinite embedding (and a copied row): every index stays valid, eager and
    XLA, in padded 4-row blocks, so that the step runs to its non-finite loss."""
    monkeypatch.setattr(wl, "_BLOCK_ROWS", 4)
    xla = tf.function(wl.nearest_neighbours, jit_compile=True)
    for bad in (np.nan, np.inf):
        v = rng.normal(size=(13, 3)).astype(np.float32)
        v[2] = v[5]
        v[7, 1] = bad
        for nn in (wl.nearest_neighbours(v).numpy(), xla(v).numpy()):
            assert np.all((nn >= 0) & (nn < 13))
