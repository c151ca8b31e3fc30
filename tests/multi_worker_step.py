"""One worker of the two-worker MultiWorkerMirroredStrategy test (tests/test_multi_worker.py).

    python tests/multi_worker_step.py PORT0,PORT1 INDEX INIT.npz OUT.npz

Sets TF_CONFIG for a cluster of workers on 127.0.0.1:PORT0, 127.0.0.1:PORT1, ..., builds
the strategy with `build_strategy("multi_worker")`, checks the replica order of all_gather,
then for each optimizer in OPTIMIZERS: builds the WCL model in the strategy's scope, loads
the weights in INIT.npz, compiles and fits the optimizer's steps (1 or 2) on this worker's
rows of the global batches. Writes to OUT.npz:

    {opt}/w{k}         weight k after the optimizer's steps
    {opt}/log/{name}   each fit metric after the last step
    replica_id         this worker's replica_id_in_sync_group
    gathered_ids       all_gather of every replica's replica_id (replica order)
    gathered_view_1    all_gather of every replica's first view_1 batch (replica order)

The test imports the same helpers (global_data, train, ...) for the one-device reference.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_SIZE = 16
STEPS = 2


def _sgd():
    return keras.optimizers.SGD(0.5)


def _lars():
    from wcl_tf.optimizers import LARS

    # A large trust coefficient so that the LARS update moves the weights well beyond
    # the comparison tolerance; momentum carries step 1 into step 2.
    return LARS(0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.1)


# name: (optimizer factory, fit steps). Plain SGD(0.5) moves these tiny weights so far
# that after a second step float32 reduction-order noise (which already separates the
# in-process 2-replica MirroredStrategy from one device) grows past the tolerance, so it
# takes one step; LARS takes STEPS, so that momentum and the second batch are covered.
OPTIMIZERS = {"sgd": (_sgd, 1), "lars": (_lars, STEPS)}


def global_data():
    """STEPS global batches, concatenated: {"view_1", "view_2"} each (STEPS * N, S, S, 3)."""
    rng = np.random.default_rng(0)
    shape = (STEPS * GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
    return {k: rng.uniform(size=shape).astype(np.float32) for k in ("view_1", "view_2")}


def worker_rows(data, index, num_workers):
    """Worker `index`'s share: rows [index * b, (index + 1) * b) of every global batch."""
    b = GLOBAL_BATCH // num_workers
    rows = [step * GLOBAL_BATCH + index * b + j for step in range(STEPS) for j in range(b)]
    return {k: v[rows] for k, v in data.items()}


def build_model():
    keras.utils.set_random_seed(1)
    from wcl_tf.models.wcl_model import build_wcl_model

    # gather_grad="full": the option under which two workers equal one device.
    return build_wcl_model("small_cnn", head_hidden_dim=16, head_output_dim=8, width=4,
                           sync_bn=True, image_size=IMAGE_SIZE, gather_grad="full")


def load_weights(path):
    with np.load(path) as f:
        return [f[f"w{k}"] for k in range(len(f.files))]


def train(strategy, dataset, weights, optimizer):
    """Fits OPTIMIZERS[optimizer]'s steps from `weights` (each fit starts at the first
    batch); returns (weights after, {metric: value of the last step})."""
    with strategy.scope():
        model = build_model()
        model.set_weights(weights)
        make_optimizer, steps = OPTIMIZERS[optimizer]
        model.compile(optimizer=make_optimizer())
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    return model.get_weights(), logs


def reference_dataset():
    """The one-device run's input: the global batches in order."""
    return tf.data.Dataset.from_tensor_slices(global_data()).batch(GLOBAL_BATCH)


def main(argv):
    ports, index, init_path, out_path = argv
    index = int(index)
    workers = [f"127.0.0.1:{int(p)}" for p in ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})

    import time

    start = time.monotonic()
    from wcl_tf.strategy import build_strategy

    strategy = build_strategy("multi_worker")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    assert strategy.num_replicas_in_sync == len(workers), strategy.num_replicas_in_sync

    data = global_data()

    def dataset_fn(ctx):
        # One input pipeline per worker; no auto-sharding with a dataset function.
        rows = worker_rows(data, ctx.input_pipeline_id, ctx.num_input_pipelines)
        return tf.data.Dataset.from_tensor_slices(rows).batch(
            ctx.get_per_replica_batch_size(GLOBAL_BATCH))

    dataset = strategy.distribute_datasets_from_function(dataset_fn)

    # Replica order of all_gather = worker order, and each worker holds its own rows.
    def gather_step(batch):
        ctx = tf.distribute.get_replica_context()
        # Pin the inputs to this worker's device: all_gather's destination is the input's
        # device, and a bare graph tensor here has none ("destinations can not be empty").
        with tf.device(strategy.extended.worker_devices[0]):
            rid = tf.fill([1], tf.cast(ctx.replica_id_in_sync_group, tf.float32))
            view_1 = tf.identity(batch["view_1"])
        return rid, ctx.all_gather(rid, axis=0), ctx.all_gather(view_1, axis=0)

    @tf.function
    def run_gather(batch):
        return strategy.run(gather_step, args=(batch,))

    first = next(iter(dataset))
    rid, ids, view_1 = (strategy.experimental_local_results(t)[0].numpy()
                        for t in run_gather(first))
    out = dict(replica_id=rid[0], gathered_ids=ids, gathered_view_1=view_1)
    print(f"worker {index}: cluster up, gather checked at {time.monotonic() - start:.1f} s",
          flush=True)

    init = load_weights(init_path)
    for name in OPTIMIZERS:
        weights, logs = train(strategy, dataset, init, name)
        out.update({f"{name}/w{k}": w for k, w in enumerate(weights)})
        out.update({f"{name}/log/{k}": np.float64(v) for k, v in logs.items()})
        print(f"worker {index}: {name} done at {time.monotonic() - start:.1f} s", flush=True)

    np.savez(out_path, **out)
    print(f"worker {index}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
