import numpy as np
import pytest
import tensorflow as tf

import reference
from wcl_tf import losses
from wcl_tf import weak_labels as wl


def _unit(rng, n, d):
    return reference.l2n(rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("n,d,tau", [(4, 3, 0.1), (32, 16, 0.1), (64, 8, 0.5), (200, 32, 0.2)])
def test_objective_matches_numpy(rng, n, d, tau):
    z1, z2, v1, v2 = (_unit(rng, n, d) for _ in range(4))
    got = [float(x) for x in losses.wcl_objective(z1, z2, v1, v2, tau)]
    want = reference.wcl_objective(z1, z2, v1, v2, tau)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_hand_computed_tiny_case():
    # n = 2: each anchor's only candidates are the positive and 2 negatives.
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    z2 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    tau = 1.0
    # anchor z1[0]: candidates z1[1] (sim 0), z2[0] (sim 1, positive), z2[1] (sim 0).
    expected_instance = -np.log(np.e / (np.e + 2.0))
    # With n = 2 both images form one component, so each graph anchor's only
    # candidate is its positive: loss 0.
    instance, graph = losses.wcl_objective(z1, z2, z1, z2, tau)
    np.testing.assert_allclose(float(instance), expected_instance, rtol=1e-6)
    np.testing.assert_allclose(float(graph), 0.0, atol=1e-6)


def test_graph_loss_uses_the_other_views_labels(rng):
    n, d, tau = 16, 4, 0.1
    v1, v2 = _unit(rng, n, d), _unit(rng, n, d)
    l1 = wl.weak_labels(v1).numpy()
    l2 = wl.weak_labels(v2).numpy()
    assert not reference.same_partition(l1, l2)  # else the test cannot tell
    got = losses.graph_loss_per_anchor(v1, v2, v1, v2, l1, l2, 0, tau).numpy()
    np.testing.assert_allclose(got[:n].mean(), reference.supcon(v1, l2, tau), rtol=1e-5)
    np.testing.assert_allclose(got[n:].mean(), reference.supcon(v2, l1, tau), rtol=1e-5)


def test_local_rows_against_gathered_keys_equal_the_global_batch(rng):
    # What each replica computes: its rows as anchors, the global batch as keys.
    n, d, tau, b = 12, 8, 0.1, 4
    z1, z2, v1, v2 = (_unit(rng, n, d) for _ in range(4))
    l1, l2 = wl.weak_labels(v1), wl.weak_labels(v2)
    inst_parts, graph_parts = [], []
    for offset in range(0, n, b):
        s = slice(offset, offset + b)
        inst, _ = losses.instance_loss_per_anchor(z1[s], z2[s], z1, z2, offset, tau)
        inst_parts.append(inst.numpy().sum())
        graph = losses.graph_loss_per_anchor(v1[s], v2[s], v1, v2, l1, l2, offset, tau)
        graph_parts.append(graph.numpy().sum())
    want_inst, want_graph = losses.wcl_objective(z1, z2, v1, v2, tau)
    np.testing.assert_allclose(sum(inst_parts) / (2 * n), float(want_inst), rtol=1e-5)
    np.testing.assert_allclose(sum(graph_parts) / (2 * n), float(want_graph), rtol=1e-5)


def test_instance_accuracy_counts_the_positive(rng):
    z = _unit(rng, 8, 16)
    _, correct = losses.instance_loss_per_anchor(z, z, z, z, 0, 0.1)
    np.testing.assert_array_equal(correct.numpy(), np.ones(16))
    _, correct = losses.instance_loss_per_anchor(z, -z, z, -z, 0, 0.1)
    np.testing.assert_array_equal(correct.numpy(), np.zeros(16))


def test_objective_compiles_with_xla(rng):
    z1, z2, v1, v2 = (_unit(rng, 64, 8) for _ in range(4))
    fn = tf.function(losses.wcl_objective, jit_compile=True)
    got = [float(x) for x in fn(z1, z2, v1, v2, 0.1)]
    want = reference.wcl_objective(z1, z2, v1, v2, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradient_flows_to_embeddings_not_labels(rng):
    z1, z2, v1, v2 = (tf.Variable(_unit(rng, 16, 4)) for _ in range(4))
    with tf.GradientTape() as tape:
        inst, graph = losses.wcl_objective(z1, z2, v1, v2, 0.1)
        total = inst + graph
    grads = tape.gradient(total, [z1, z2, v1, v2])
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert all(np.abs(g.numpy()).sum() > 0 for g in grads)
