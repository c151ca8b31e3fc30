"""Cross-replica helpers for the train step (WCL_SPEC section 2).

All functions run in a replica context (inside `strategy.run`, which is where Keras
calls `train_step`). With one replica they are identities.
"""

import tensorflow as tf

from wcl_tf.config import GATHER_GRAD


def replica_info():
    """(replica context, number of replicas, this replica's id) of the caller."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context: behave as a single replica
        return None, 1, 0
    return ctx, ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def gather(x, gather_grad="full"):
    """Concatenate x (b, ...) from every replica into (n, ...) plus this replica's offset.

    gather_grad="full": gathered rows carry gradient back to the replica that owns
    them (ReplicaContext.all_gather's gradient), so an R-replica step equals the
    1-replica step on the same global batch.
    gather_grad="local": rows of other replicas are constants; only this replica's
    rows carry gradient (the authors' PyTorch behaviour for the INSTANCE loss's keys:
    `concat_other_gather` under no_grad plus the local rows, mingkai-zheng/WCL
    network/wcl.py lines 55-58 and 97-108). Their graph loss's keys carry no gradient at
    all, local rows included; that is handled in wcl_tf.losses, not here.

    Returns:
      (x_all (n, ...), offset) where x_all[offset:offset + b] is x.
    """
    ctx, replicas, replica_id = replica_info()
    if replicas == 1:
        return x, 0
    b = tf.shape(x)[0]
    offset = replica_id * b
    x_all = ctx.all_gather(x, axis=0)  # (n, ...)
    if gather_grad == "local":
        n = tf.shape(x_all)[0]
        # Value of x_all, gradient only into the local rows: x - stop_gradient(x) is
        # zero in value and identity in gradient; scatter it into the local rows.
        select = tf.one_hot(offset + tf.range(b), n, dtype=x.dtype)  # (b, n)
        flat = tf.reshape(x - tf.stop_gradient(x), [b, -1])
        delta = tf.reshape(tf.matmul(select, flat, transpose_a=True), tf.shape(x_all))
        x_all = tf.stop_gradient(x_all) + delta
    elif gather_grad not in GATHER_GRAD:
        raise ValueError(f"gather_grad must be one of {GATHER_GRAD}, got {gather_grad!r}")
    return x_all, offset


def global_sum(x):
    """Sum of a per-replica value over all replicas (no gradient needed)."""
    ctx, replicas, _ = replica_info()
    if replicas == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)
