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
    """The weak labels are built inside wcl_objective from v1, v2 but add no gradient:
    the objective's gradient equals that of the same losses with the labels handed in as
    constants (and every embedding gets a finite, non-zero gradient)."""
    z1, z2, v1, v2 = (tf.Variable(_unit(rng, 16, 4)) for _ in range(4))
    with tf.GradientTape() as tape:
        inst, graph = losses.wcl_objective(z1, z2, v1, v2, 0.1)
        total = inst + graph
    grads = tape.gradient(total, [z1, z2, v1, v2])
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert all(np.abs(g.numpy()).sum() > 0 for g in grads)
    labels1 = tf.constant(wl.weak_labels(v1).numpy())
    labels2 = tf.constant(wl.weak_labels(v2).numpy())
    with tf.GradientTape() as tape:
        inst_c, _ = losses.instance_loss_per_anchor(z1, z2, z1, z2, 0, 0.1)
        graph_c = losses.graph_loss_per_anchor(v1, v2, v1, v2, labels1, labels2, 0, 0.1)
        total_c = tf.reduce_mean(inst_c) + tf.reduce_mean(graph_c)
    for got, want in zip(grads, tape.gradient(total_c, [z1, z2, v1, v2])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)


# --- Which side carries gradient (docs/method.md section 3.1) ------------------------

def _raw_inputs(rng, kind, n, d):
    """Raw (unnormalised) head outputs: random, or clustered around a few centres."""
    if kind == "random":
        return [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0) for _ in range(4)]
    centres = rng.normal(size=(4, d)) * 3.0
    return [centres[rng.integers(0, 4, size=n)] + 0.3 * rng.normal(size=(n, d))
            for _ in range(4)]


def _tf_grads(raw, graph_key_grad, which="graph"):
    """Gradients of wcl_objective's instance or graph loss w.r.t. the raw outputs."""
    variables = [tf.Variable(x.astype(np.float32)) for x in raw]
    with tf.GradientTape() as tape:
        z1, z2, v1, v2 = (tf.math.l2_normalize(x, axis=1) for x in variables)
        instance, graph = losses.wcl_objective(z1, z2, v1, v2, 0.1,
                                               graph_key_grad=graph_key_grad)
    grads = tape.gradient(graph if which == "graph" else instance, variables)
    return [None if g is None else g.numpy().astype(np.float64) for g in grads]


def _relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("n,d", [(8, 4), (24, 6)])
def test_graph_gradient_is_the_authors_constant_key_gradient(rng, kind, n, d):
    raw = _raw_inputs(rng, kind, n, d)
    got = _tf_grads(raw, graph_key_grad=False)
    assert got[0] is None and got[1] is None  # the instance head gets nothing from it
    want1, want2 = reference.graph_loss_raw_grad_constant_keys(raw[2], raw[3], 0.1)
    assert _relative_error(got[2], want1) < 1e-4
    assert _relative_error(got[3], want2) < 1e-4


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_graph_key_grad_gives_the_full_gradient(rng, kind):
    n, d, tau = 10, 4, 0.1
    raw = _raw_inputs(rng, kind, n, d)
    r1, r2 = raw[2], raw[3]
    labels1 = reference.scipy_components(reference.nearest_neighbours(r1))
    labels2 = reference.scipy_components(reference.nearest_neighbours(r2))
    want1 = reference.numerical_grad(
        lambda x: reference.graph_loss_fixed_labels(x, r2, labels1, labels2, tau), r1)
    want2 = reference.numerical_grad(
        lambda x: reference.graph_loss_fixed_labels(r1, x, labels1, labels2, tau), r2)
    got = _tf_grads(raw, graph_key_grad=True)
    assert _relative_error(got[2], want1) < 1e-4
    assert _relative_error(got[3], want2) < 1e-4
    # And the default is not this full gradient: it is roughly half of it, elsewhere.
    anchors_only = _tf_grads(raw, graph_key_grad=False)
    ratio = np.linalg.norm(want1) / np.linalg.norm(anchors_only[2])
    assert 1.3 < ratio < 3.0, ratio
    assert _relative_error(anchors_only[2], want1) > 0.2


def test_instance_gradient_flows_through_anchors_and_keys(rng):
    # The authors' instance loss concatenates the local keys outside no_grad
    # (network/wcl.py line 58): one device, full gradient, checked by finite differences.
    n, d, tau = 6, 3, 0.1
    raw = _raw_inputs(rng, "random", n, d)
    r1, r2 = raw[0], raw[1]

    def instance(a, b):
        return reference.instance_loss(reference.l2n(a), reference.l2n(b), tau)

    want1 = reference.numerical_grad(lambda x: instance(x, r2), r1)
    got = _tf_grads(raw, graph_key_grad=False, which="instance")
    assert got[2] is None and got[3] is None
    assert _relative_error(got[0], want1) < 1e-4


@pytest.mark.parametrize("key_grad", [False, True])
def test_local_graph_keys_follow_key_grad(rng, key_grad):
    n, d, a = 8, 4, 5
    v1, v2, v_loc = (tf.Variable(_unit(rng, m, d)) for m in (n, n, a))
    labels1, labels2 = wl.weak_labels(v1), wl.weak_labels(v2)
    rows = tf.constant(rng.integers(0, n, size=a), tf.int32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.local_graph_loss_per_anchor(
            v_loc, v1, v2, labels1, labels2, rows, 0.1, key_grad=key_grad))
    g_loc, g1, g2 = tape.gradient(loss, [v_loc, v1, v2])
    assert np.abs(g_loc.numpy()).sum() > 0
    assert (g1 is not None and np.abs(g1.numpy()).sum() > 0) == key_grad
    assert (g2 is not None and np.abs(g2.numpy()).sum() > 0) == key_grad
