"""NumPy references of the WCL objective (docs/method.md section 2), written for clarity."""

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nearest_neighbours(v):
    v = l2n(np.asarray(v, np.float64))
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)  # numpy's argmax takes the first maximum


def scipy_components(nn):
    n = len(nn)
    graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def same_partition(a, b):
    """True when label vectors a and b split the rows into the same groups."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])))


def _log_softmax_row(logits, keep):
    m = logits[keep].max()
    return logits - (m + np.log(np.exp(logits[keep] - m).sum()))


def instance_loss(z1, z2, tau):
    n = len(z1)
    z = np.concatenate([z1, z2]).astype(np.float64)
    sim = z @ z.T / tau
    losses = []
    for i in range(2 * n):
        keep = np.ones(2 * n, bool)
        keep[i] = False
        pos = (i + n) % (2 * n)
        losses.append(-_log_softmax_row(sim[i], keep)[pos])
    return float(np.mean(losses))


def supcon(v, labels, tau):
    n = len(v)
    v = v.astype(np.float64)
    sim = v @ v.T / tau
    out = []
    for i in range(n):
        keep = np.arange(n) != i
        logp = _log_softmax_row(sim[i], keep)
        pos = keep & (labels == labels[i])
        out.append(-logp[pos].mean())
    return float(np.mean(out))


def wcl_objective(z1, z2, v1, v2, tau=0.1):
    labels1 = scipy_components(nearest_neighbours(v1))
    labels2 = scipy_components(nearest_neighbours(v2))
    graph = 0.5 * (supcon(v1, labels2, tau) + supcon(v2, labels1, tau))
    return instance_loss(z1, z2, tau), graph


def multicrop_local_losses(z1, z2, v1, v2, z_local, v_local, k, tau):
    """(local instance loss, local graph loss, kept indices) of docs/method.md section 6.

    z_local, v_local: (n, M, d) local-crop embeddings; keeps the k crops per image most
    cosine-similar (graph head) to the normalised mean of the image's v1 and v2.
    """
    n = len(z1)
    labels1 = scipy_components(nearest_neighbours(v1))
    labels2 = scipy_components(nearest_neighbours(v2))
    centre = l2n(v1.astype(np.float64) + v2)
    sim = np.einsum("nmd,nd->nm", v_local.astype(np.float64), centre)
    kept = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    keys = np.concatenate([z1, z2]).astype(np.float64)
    inst, graph = [], []
    for i in range(n):
        for j in kept[i]:
            logits = keys @ z_local[i, j] / tau
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            inst.append(lse - 0.5 * (logits[i] + logits[n + i]))
            terms = []
            for v_all, labels in ((v1, labels2), (v2, labels1)):
                lg = v_all.astype(np.float64) @ v_local[i, j] / tau
                logp = lg - (np.log(np.exp(lg - lg.max()).sum()) + lg.max())
                terms.append(-logp[labels == labels[i]].mean())
            graph.append(np.mean(terms))
    return float(np.mean(inst)), float(np.mean(graph)), kept


def supcon_anchor_grad(v, keys, labels, tau):
    """Analytic d(supcon mean)/d(anchors) with CONSTANT keys (the authors' graph loss).

    v: (n, d) unit anchors; keys: (n, d) the same rows' values, held constant. For anchor
    i with softmax p_ij over j != i and positives P(i):
        d l_i / d v_i = (1/tau) * (sum_{j != i} p_ij k_j - mean_{p in P(i)} k_p)
    and the mean over the n anchors divides by n.
    """
    v, keys = np.asarray(v, np.float64), np.asarray(keys, np.float64)
    n = len(v)
    grad = np.zeros_like(v)
    for i in range(n):
        keep = np.arange(n) != i
        logits = keys @ v[i] / tau
        p = np.exp(_log_softmax_row(logits, keep)) * keep
        pos = keep & (labels == labels[i])
        grad[i] = (p @ keys - keys[pos].mean(axis=0)) / tau / n
    return grad


def through_l2n(raw, grad_unit):
    """Chain rule through v = raw / ||raw||: (I - v v^T) g / ||raw||, row by row."""
    raw = np.asarray(raw, np.float64)
    norm = np.linalg.norm(raw, axis=1, keepdims=True)
    v = raw / norm
    return (grad_unit - v * np.sum(v * grad_unit, axis=1, keepdims=True)) / norm


def graph_loss_raw_grad_constant_keys(r1, r2, tau):
    """Gradient of the authors' graph loss 0.5 (supcon(v1 | M2) + supcon(v2 | M1)) w.r.t.
    the raw head outputs r1, r2, keys constant (network/wcl.py lines 68-69, 89-90)."""
    v1, v2 = l2n(np.asarray(r1, np.float64)), l2n(np.asarray(r2, np.float64))
    labels1 = scipy_components(nearest_neighbours(v1))
    labels2 = scipy_components(nearest_neighbours(v2))
    g1 = 0.5 * supcon_anchor_grad(v1, v1, labels2, tau)
    g2 = 0.5 * supcon_anchor_grad(v2, v2, labels1, tau)
    return through_l2n(r1, g1), through_l2n(r2, g2)


def numerical_grad(fn, x, eps=1e-6):
    """Central float64 finite differences of scalar fn at x."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


def graph_loss_fixed_labels(r1, r2, labels1, labels2, tau):
    """Graph loss of raw outputs with the weak labels held fixed; keys carry gradient
    through fn's arguments (finite differences see both sides)."""
    v1, v2 = l2n(np.asarray(r1, np.float64)), l2n(np.asarray(r2, np.float64))
    return 0.5 * (supcon(v1, labels2, tau) + supcon(v2, labels1, tau))
