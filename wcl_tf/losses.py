"""The WCL objective as pure functions (docs/method.md sections 2 and 3).

Every function returns per-anchor vectors for the anchors it is given, so the same
code serves one device (anchors = the whole batch) and a distributed step (anchors =
this replica's rows, keys = the gathered global batch). `offset` is the index of the
first local row inside the gathered rows. Logits, exp and log-sum-exp run in float32
whatever the compute dtype. Masks are additive or multiplicative, never boolean
selections, so shapes stay static (XLA / TPU).

Which side carries gradient (docs/method.md section 3). Instance loss: anchors and keys
(the local keys carry gradient in the authors' code too; other replicas' rows follow
`gather_grad`, see wcl_tf/distributed.py). Graph loss: by default ONLY the anchors. The
authors' keys `all_feat1`, `all_feat2` come from `concat_all_gather`, which runs under
`@torch.no_grad()` (mingkai-zheng/WCL, network/wcl.py lines 68-69 and 112-125; used as
keys at lines 89-90), so no key row carries gradient, the local slice included.
`key_grad=True` gives the keys gradient too (about twice the graph-loss gradient on one
device, in another direction): kept as an option, not the authors' objective.

Shapes: b = anchors on this replica, n = global batch, d = embedding size.
"""

import tensorflow as tf

from wcl_tf import weak_labels as weak_labels_lib

# Added to the logit of an excluded candidate (the anchor itself).
_MASKED = -1e9


def _local_identity(b, n, offset):
    """(b, n) float32 with a 1 at [i, offset + i]."""
    return tf.one_hot(offset + tf.range(b), n, dtype=tf.float32)


def instance_loss_per_anchor(z1, z2, z1_all, z2_all, offset, temperature):
    """NT-Xent per anchor over the 2n global views.

    Each anchor's positive is the other view of its image; every other view of the
    global batch (both views) is a negative; the anchor itself is excluded.

    Args:
      z1, z2: (b, d) L2-normalised instance embeddings of the local rows.
      z1_all, z2_all: (n, d) the same for the global batch.
      offset: int, row of z1[0] inside z1_all.
      temperature: float > 0.
    Returns:
      loss: (2b,) float32, view-1 anchors first.
      correct: (2b,) float32, 1 where the positive has the largest logit.
    """
    z1, z2, z1_all, z2_all = (tf.cast(t, tf.float32) for t in (z1, z2, z1_all, z2_all))
    b, n = tf.shape(z1)[0], tf.shape(z1_all)[0]
    keys = tf.concat([z1_all, z2_all], axis=0)  # (2n, d)
    anchors = tf.concat([z1, z2], axis=0)  # (2b, d)
    logits = tf.matmul(anchors, keys, transpose_b=True) / temperature  # (2b, 2n)
    eye = _local_identity(b, n, offset)  # (b, n)
    zero = tf.zeros_like(eye)
    self_mask = tf.concat([tf.concat([eye, zero], 1), tf.concat([zero, eye], 1)], 0)
    pos_mask = tf.concat([tf.concat([zero, eye], 1), tf.concat([eye, zero], 1)], 0)
    masked = logits + _MASKED * self_mask
    positive = tf.reduce_sum(logits * pos_mask, axis=1)
    loss = tf.reduce_logsumexp(masked, axis=1) - positive
    correct = tf.cast(
        tf.equal(tf.argmax(masked, axis=1), tf.argmax(pos_mask, axis=1)), tf.float32)
    return loss, correct


def _keys(keys, key_grad):
    """The contrast keys as float32, constants unless key_grad."""
    keys = tf.cast(keys, tf.float32)
    return keys if key_grad else tf.stop_gradient(keys)


def supcon_per_anchor(v, v_all, labels, labels_all, offset, temperature, key_grad=False):
    """Supervised contrastive loss per anchor, candidates from one view.

    Anchor i (global row offset + i) contrasts against every other row of v_all;
    its positives are the rows j != i with labels_all[j] == labels[i]. Gradient flows
    into the anchors `v` only, unless key_grad (then into v_all too).

    Args:
      v: (b, d) L2-normalised graph-head embeddings of the local rows.
      v_all: (n, d) the same view for the global batch.
      labels: (b,) int labels of the local rows (from the OTHER view's graph).
      labels_all: (n,) the same labels for the global batch.
      offset: int, row of v[0] inside v_all.
      temperature: float > 0.
      key_grad: False (the authors' code): the keys v_all are constants.
    Returns:
      (b,) float32 losses. An anchor with no positive gets 0.
    """
    v, v_all = tf.cast(v, tf.float32), _keys(v_all, key_grad)
    b, n = tf.shape(v)[0], tf.shape(v_all)[0]
    logits = tf.matmul(v, v_all, transpose_b=True) / temperature  # (b, n)
    self_mask = _local_identity(b, n, offset)
    log_prob = logits - tf.reduce_logsumexp(logits + _MASKED * self_mask, axis=1, keepdims=True)
    same = tf.cast(tf.equal(labels[:, tf.newaxis], labels_all[tf.newaxis, :]), tf.float32)
    positives = same * (1.0 - self_mask)  # (b, n)
    count = tf.reduce_sum(positives, axis=1)
    return -tf.reduce_sum(positives * log_prob, axis=1) / tf.maximum(count, 1.0)


def graph_loss_per_anchor(v1, v2, v1_all, v2_all, labels1_all, labels2_all, offset, temperature,
                          key_grad=False):
    """WCL graph loss per anchor, with the labels swapped across views.

    View-1 anchors are supervised by view 2's components and vice versa. key_grad=False
    (default, the authors' code): the keys v1_all, v2_all carry no gradient.

    Returns:
      (2b,) float32, view-1 anchors first.
    """
    b = tf.shape(v1)[0]
    rows = offset + tf.range(b)
    local = lambda labels_all: tf.gather(labels_all, rows)  # noqa: E731
    loss1 = supcon_per_anchor(v1, v1_all, local(labels2_all), labels2_all, offset, temperature,
                              key_grad)
    loss2 = supcon_per_anchor(v2, v2_all, local(labels1_all), labels1_all, offset, temperature,
                              key_grad)
    return tf.concat([loss1, loss2], axis=0)


def wcl_objective(z1, z2, v1, v2, temperature=0.1, graph_key_grad=False):
    """(instance_loss, graph_loss) scalars for a single-device global batch.

    z1, z2: (n, d) instance-head outputs; v1, v2: (n, d) graph-head outputs; all
    L2-normalised. Weak labels are built here from v1 and v2 (no gradient).
    graph_key_grad=False (default, the authors' code): the graph loss's gradient flows
    through its anchors only; True: through its keys as well.
    """
    instance, _ = instance_loss_per_anchor(z1, z2, z1, z2, 0, temperature)
    labels1 = weak_labels_lib.weak_labels(v1)
    labels2 = weak_labels_lib.weak_labels(v2)
    graph = graph_loss_per_anchor(v1, v2, v1, v2, labels1, labels2, 0, temperature,
                                  key_grad=graph_key_grad)
    return tf.reduce_mean(instance), tf.reduce_mean(graph)


def local_instance_loss_per_anchor(z_local, z1_all, z2_all, rows, temperature):
    """Instance loss of kept multi-crop local crops (docs/method.md section 6).

    Candidates are the 2n global instance embeddings; the positives are the two global
    views of the crop's own image (mean of the two log-probabilities).

    Args:
      z_local: (a, d) L2-normalised instance embeddings of the kept crops.
      z1_all, z2_all: (n, d) global views of the global batch.
      rows: (a,) int, global row of each crop's source image.
    Returns:
      (a,) float32.
    """
    z_local = tf.cast(z_local, tf.float32)
    keys = tf.cast(tf.concat([z1_all, z2_all], axis=0), tf.float32)  # (2n, d)
    n = tf.shape(z1_all)[0]
    logits = tf.matmul(z_local, keys, transpose_b=True) / temperature  # (a, 2n)
    own = tf.one_hot(rows, n, dtype=tf.float32)  # (a, n)
    positives = 0.5 * tf.reduce_sum(logits * tf.concat([own, own], axis=1), axis=1)
    return tf.reduce_logsumexp(logits, axis=1) - positives


def local_graph_loss_per_anchor(v_local, v1_all, v2_all, labels1_all, labels2_all, rows,
                                temperature, key_grad=False):
    """Graph loss of kept local crops, keeping the swap (docs/method.md section 6).

    Against view-1 globals the positives are the members of the crop's image's component
    in view 2's graph (the image itself included), against view-2 globals those of view
    1's graph; the two terms are averaged. As in the two-view graph loss, the global
    keys carry no gradient unless key_grad.

    Args:
      v_local: (a, d) L2-normalised graph embeddings of the kept crops.
      v1_all, v2_all: (n, d) global views; labels1_all, labels2_all: (n,) their graphs.
      rows: (a,) int, global row of each crop's source image.
    Returns:
      (a,) float32.
    """
    v_local = tf.cast(v_local, tf.float32)

    def term(v_all, labels_all):
        logits = tf.matmul(v_local, _keys(v_all, key_grad), transpose_b=True) / temperature
        log_prob = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)  # (a, n)
        own = tf.gather(labels_all, rows)
        positives = tf.cast(tf.equal(own[:, tf.newaxis], labels_all[tf.newaxis, :]),
                            tf.float32)
        return -tf.reduce_sum(positives * log_prob, axis=1) / tf.reduce_sum(positives, axis=1)

    return 0.5 * (term(v1_all, labels2_all) + term(v2_all, labels1_all))


def select_local_crops(v_local, v1, v2, k):
    """Indices of the k local crops per image most similar to its global embedding.

    Args:
      v_local: (b, M, d) L2-normalised graph embeddings of the local crops.
      v1, v2: (b, d) graph embeddings of the two global views.
      k: static int, 1 <= k <= M.
    Returns:
      (similarity (b, M), kept indices (b, k) int32), no gradient.
    """
    centre = tf.math.l2_normalize(tf.stop_gradient(tf.cast(v1, tf.float32) + tf.cast(v2, tf.float32)),
                                  axis=1)
    sim = tf.einsum("bmd,bd->bm", tf.stop_gradient(tf.cast(v_local, tf.float32)), centre)
    _, kept = tf.math.top_k(sim, k=k)
    return sim, kept
