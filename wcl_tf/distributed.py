"""Cross-replica helpers for the train step (docs/method.md section 3.2), and WorkerAgreement for
host-side decisions every worker must share (multi-worker).

The functions run in a replica context (inside `strategy.run`, which is where Keras
calls `train_step`); with one replica they are identities. WorkerAgreement is called
from the host, between steps.
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


class WorkerAgreement:
    """Host-side values that every worker of a multi-worker run must agree on.

    Under MultiWorkerMirroredStrategy each worker is its own Python process with its own
    view of the world: one may have received SIGTERM, or see a different newest checkpoint
    than the chief. Acting on such a local view makes the workers take different numbers
    of steps, and the next all-reduce waits forever. These methods make the decision
    common with one small all-reduce; every worker must call them at the same points, the
    same number of times. With any other strategy (one process) they return the local
    value and communicate nothing.
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._sum = tf.function(self._sum_fn) if self.multi_worker else None

    def _sum_fn(self, chief_values, flag):
        def replica_fn(chief_values, flag):
            ctx = tf.distribute.get_replica_context()
            # A host value has no device inside the function; the all-reduce needs one
            # ("destinations can not be empty").
            with tf.device(self.strategy.extended.worker_devices[0]):
                # Replica 0 (the chief's first) contributes chief_values, every replica
                # its flag: one all-reduce serves both.
                first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float64)
                mine = tf.concat([chief_values * first, flag[None]], axis=0)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine)

        return self.strategy.run(replica_fn, args=(chief_values, flag))

    def any_worker(self, flag):
        """True on every worker if `flag` is true on any of them."""
        return self.chief_values((), flag)[1]

    def chief_values(self, values, flag=False):
        """(the chief's `values`, True if `flag` is true on any worker), the same on every
        worker; values: integers below 2**53 (float64 carries them exactly)."""
        if not self.multi_worker:
            return [int(v) for v in values], bool(flag)
        total = self.strategy.experimental_local_results(self._sum(
            tf.constant(values, tf.float64, shape=[len(values)]),
            tf.constant(1.0 if flag else 0.0, tf.float64)))[0].numpy()
        return [int(round(v)) for v in total[:-1]], bool(total[-1] > 0)
