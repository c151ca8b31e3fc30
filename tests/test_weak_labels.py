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
