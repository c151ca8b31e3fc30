"""Speed and memory of wcl_tf: train step, weak-label step, input pipeline.

    python tools/benchmark.py step --backbone=resnet18_cifar --batch_sizes=32,128 --image_size=32
    python tools/benchmark.py weak_labels --sizes=256,1024,4096,16384
    python tools/benchmark.py pipeline --image_size=32 --batch_size=256
    python tools/benchmark.py pipeline --image_size=32 --num_local_crops=4 --local_crop_size=16

Each prints a markdown table and, with --out=FILE.json, writes the numbers. Timings are
the median of --repeats timed steps after --warmup untimed ones, on whatever machine runs
it (the header says which). Peak memory is the process's peak resident set size on CPU
(it includes TensorFlow itself) and the allocator's peak on a GPU.
"""

import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("backbone", "small_cnn", "step: backbone.")
flags.DEFINE_integer("width", 32, "step: small_cnn width.")
flags.DEFINE_list("batch_sizes", ["32"], "step: global batch sizes.")
flags.DEFINE_integer("image_size", 32, "step / pipeline: image side in pixels.")
flags.DEFINE_integer("head_hidden_dim", 2048, "step: head hidden width.")
flags.DEFINE_integer("head_output_dim", 128, "step: head output size.")
flags.DEFINE_integer("num_local_crops", 0, "step / pipeline: M local crops.")
flags.DEFINE_integer("local_crop_size", 16, "step / pipeline: local crop side.")
flags.DEFINE_integer("knn_crops", 0, "step: K kept crops (defaults to M when M > 0).")
flags.DEFINE_string("precision", "float32", "step: float32, mixed_bfloat16, mixed_float16.")
flags.DEFINE_list("sizes", ["256", "1024", "4096", "16384"], "weak_labels: batch sizes n.")
flags.DEFINE_integer("dim", 128, "weak_labels: embedding size.")
flags.DEFINE_string("dataset", "cifar10", "pipeline: dataset.")
flags.DEFINE_string("data_dir", "../shared/tfds", "pipeline: TFDS folder.")
flags.DEFINE_integer("batch_size", 256, "pipeline: batch size.")
flags.DEFINE_string("augment", "project", "pipeline: 'project' (wcl_tf.data) or "
                    "'keras_cv' (an all-keras-cv two-view recipe, for comparison).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_integer("repeats", 5, "Timed steps.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def _machine():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
              if gpus else f"CPU only, {os.cpu_count()} cores")
    return f"{platform.processor() or platform.machine()}, {device}, TensorFlow {tf.__version__}"


def _peak_memory_mb():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_step():
    import keras
    import numpy as np
    import tensorflow as tf

    from wcl_tf import optimizers
    from wcl_tf.config import Config
    from wcl_tf.models.wcl_model import build_wcl_model

    if FLAGS.precision != "float32":
        keras.mixed_precision.set_global_policy(FLAGS.precision)
    rows = []
    k = FLAGS.knn_crops or FLAGS.num_local_crops
    for batch in map(int, FLAGS.batch_sizes):
        keras.utils.set_random_seed(0)
        model = build_wcl_model(FLAGS.backbone, FLAGS.head_hidden_dim, FLAGS.head_output_dim,
                                width=FLAGS.width, image_size=FLAGS.image_size, knn_crops=k)
        cfg = Config(global_batch_size=batch, epochs=10, warmup_epochs=1)
        opt = optimizers.build_optimizer(cfg, 100)
        if FLAGS.precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        model.compile(optimizer=opt)
        rng = np.random.default_rng(0)
        s = FLAGS.image_size
        data = {v: tf.constant(rng.uniform(size=(batch, s, s, 3)), tf.float32)
                for v in ("view_1", "view_2")}
        if FLAGS.num_local_crops:
            m, ls = FLAGS.num_local_crops, FLAGS.local_crop_size
            data["local"] = tf.constant(rng.uniform(size=(batch, m, ls, ls, 3)), tf.float32)
        model.make_train_function()
        step = model.train_function
        iterator = iter(tf.data.Dataset.from_tensors(data).repeat())

        def one():
            logs = step(iterator)
            float(logs["loss"])  # wait for the step to finish

        median, times = _timed(one, FLAGS.warmup, FLAGS.repeats)
        rows.append({
            "backbone": FLAGS.backbone, "image_size": s, "batch": batch,
            "local_crops": FLAGS.num_local_crops, "precision": FLAGS.precision,
            "step_s": round(median, 4), "pairs_per_s": round(batch / median, 2),
            "step_s_all": [round(t, 4) for t in times],
            "peak_memory_mb": round(_peak_memory_mb(), 1),
        })
        print(f"  {rows[-1]}", flush=True)
    header = ("| backbone | px | batch | local crops | precision | step (s) | image pairs/s "
              "| peak memory (MB) |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['backbone']} | {r['image_size']} | {r['batch']} | {r['local_crops']} | "
             f"{r['precision']} | {r['step_s']:.3f} | {r['pairs_per_s']:.2f} | "
             f"{r['peak_memory_mb']:.0f} |" for r in rows]
    return rows, "\n".join([header] + lines)


def bench_weak_labels():
    import numpy as np
    import tensorflow as tf
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from wcl_tf import weak_labels

    rows = []
    for n in map(int, FLAGS.sizes):
        rng = np.random.default_rng(0)
        v = tf.math.l2_normalize(tf.constant(rng.normal(size=(n, FLAGS.dim)), tf.float32), 1)
        in_graph = tf.function(weak_labels.weak_labels)
        nn_only = tf.function(weak_labels.nearest_neighbours)

        def tf_path():
            in_graph(v).numpy()

        def host_components():
            nn = nn_only(v).numpy()  # 1-NN on the device, then copy and scipy
            graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
            connected_components(graph, directed=False)

        def host_all():
            x = v.numpy()  # device-to-host copy of the embeddings
            sim = x @ x.T
            np.fill_diagonal(sim, -np.inf)
            nn = sim.argmax(1)
            graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
            connected_components(graph, directed=False)

        repeats = max(3, FLAGS.repeats if n <= 4096 else 3)
        t_tf, _ = _timed(tf_path, 1, repeats)
        t_nn, _ = _timed(lambda: nn_only(v).numpy(), 1, repeats)
        t_hc, _ = _timed(host_components, 1, repeats)
        t_ha, _ = _timed(host_all, 1, repeats)
        rows.append({"n": n, "tf_weak_labels_ms": round(1e3 * t_tf, 2),
                     "tf_1nn_only_ms": round(1e3 * t_nn, 2),
                     "components_share_of_tf_path": round(1 - t_nn / t_tf, 3),
                     "tf_1nn_then_scipy_ms": round(1e3 * t_hc, 2),
                     "numpy_scipy_host_ms": round(1e3 * t_ha, 2)})
        print(f"  {rows[-1]}", flush=True)
    header = ("| n | wcl_tf weak_labels, in graph (ms) | of which 1-NN (ms) | TF 1-NN + copy + "
              "scipy components (ms) | copy + NumPy 1-NN + scipy (ms) |\n|---|---|---|---|---|")
    lines = [f"| {r['n']} | {r['tf_weak_labels_ms']:.2f} | {r['tf_1nn_only_ms']:.2f} | "
             f"{r['tf_1nn_then_scipy_ms']:.2f} | {r['numpy_scipy_host_ms']:.2f} |" for r in rows]
    return rows, "\n".join([header] + lines)


def _keras_cv_two_views(image_size):
    """An all-keras-cv SimCLR-like view (for the comparison row only)."""
    import keras
    import keras_cv
    import tensorflow as tf

    def make():
        return keras.Sequential([
            keras_cv.layers.RandomCropAndResize((image_size, image_size), (0.08, 1.0),
                                                (3 / 4, 4 / 3)),
            keras_cv.layers.RandomApply(keras_cv.layers.RandomColorJitter(
                (0, 1), 0.8, 0.8, (0.1, 0.9), 0.2), rate=0.8),
            keras_cv.layers.RandomApply(keras_cv.layers.Grayscale(output_channels=3), rate=0.2),
            keras.layers.RandomFlip("horizontal"),
        ])

    first, second = make(), make()

    def views(images):
        x = tf.cast(images, tf.float32) / 255.0
        return {"view_1": first(x), "view_2": second(x)}

    return views


def bench_pipeline():
    import tensorflow as tf

    from wcl_tf.config import Config
    from wcl_tf.data import pipeline, sources

    cfg = Config(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
                 global_batch_size=FLAGS.batch_size, num_local_crops=FLAGS.num_local_crops,
                 local_crop_size=FLAGS.local_crop_size, weak_aug_epochs=0)
    if FLAGS.augment == "project":
        ds = pipeline.make_pretrain_dataset(cfg, FLAGS.batch_size)
    else:
        raw, _, _ = sources.load_split(cfg.dataset, cfg.train_split, cfg.data_dir)
        ds = (raw.map(lambda x, y: pipeline._resize_uint8(x, cfg.image_size)).cache().repeat()
              .batch(FLAGS.batch_size, drop_remainder=True)
              .map(_keras_cv_two_views(cfg.image_size), num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    iterator = iter(ds)
    batches = 10
    for _ in range(3 + FLAGS.warmup):
        next(iterator)
    rates = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * FLAGS.batch_size / (time.perf_counter() - start))
    rate = statistics.median(rates)
    row = {"augment": FLAGS.augment, "image_size": FLAGS.image_size,
           "local_crops": FLAGS.num_local_crops, "local_crop_size": FLAGS.local_crop_size,
           "batch": FLAGS.batch_size, "images_per_s": round(rate, 1),
           "images_per_s_per_core": round(rate / os.cpu_count(), 1)}
    print(f"  {row}", flush=True)
    header = ("| augmentation | px | local crops | images/s (each with all its views) | "
              "per core |\n|---|---|---|---|---|")
    line = (f"| {row['augment']} | {row['image_size']} | {row['local_crops']}"
            f"{'x' + str(row['local_crop_size']) if row['local_crops'] else ''} | "
            f"{row['images_per_s']:.0f} | {row['images_per_s_per_core']:.0f} |")
    return [row], header + "\n" + line


def main(argv):
    if len(argv) != 2 or argv[1] not in ("step", "weak_labels", "pipeline"):
        raise app.UsageError("usage: benchmark.py step|weak_labels|pipeline [--flags]")
    logging.set_verbosity(logging.WARNING)
    rows, table = {"step": bench_step, "weak_labels": bench_weak_labels,
                   "pipeline": bench_pipeline}[argv[1]]()
    print(f"\nMachine: {_machine()}\nCommand: python tools/benchmark.py "
          f"{' '.join(sys.argv[1:])}\n\n{table}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"machine": _machine(), "argv": sys.argv[1:], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
