"""Speed and memory of wcl_tf: train step, weak-label step, input pipeline.

    python -m wcl_tf.tools.benchmark step --backbone=resnet18_cifar --batch_sizes=32,128
    python -m wcl_tf.tools.benchmark step --config=cifar10_r18 --batch_sizes=32
    python -m wcl_tf.tools.benchmark weak_labels --sizes=256,1024,4096,16384
    python -m wcl_tf.tools.benchmark pipeline --dataset=cifar10 --image_size=32 --batch_size=256
    python -m wcl_tf.tools.benchmark pipeline --config=cifar10_r18_multicrop --batch_size=256
    python -m wcl_tf.tools.benchmark profile --backbone=resnet50 --batch_sizes=32 --image_size=224
    python -m wcl_tf.tools.benchmark ratio --configs=demo,cifar10_r18   # or flagfile paths
    python -m wcl_tf.tools.benchmark ops --image_size=224 --batch_size=32
    python -m wcl_tf.tools.benchmark photometric --image_size=224 --batch_size=32 --threads=1
    python -m wcl_tf.tools.benchmark gpu --config=r50 --global_batch_size=256 \
        --precision=mixed_bfloat16 --dataset=folder:/data/imagenet --train_split=train

The run being timed is described by wcl_tf.train's own flags (every Config field:
--backbone, --image_size, --num_local_crops, --knn_crops, --precision, --sync_bn, --blur,
...; `python -m wcl_tf.train --helpfull` lists them), parsed by absl into a Config exactly
as wcl_tf.train parses them: --config=NAME and --flagfile=PATH mean what they mean to
training, later flags override them. step and profile build the model and optimizer as
training builds them (on one device, whatever --strategy says); pipeline builds training's
input pipeline with the strong augmentation from the first batch. ratio reads each of
--configs as `python -m wcl_tf.train --config=NAME` (or --flagfile=PATH) followed by the
training flags of this command line (e.g. --data_dir).

Each prints a markdown table and, with --out=FILE.json, writes the numbers. Timings are
the median of --repeats timed steps after --warmup untimed ones, on whatever machine runs
it (the header says which). Peak memory is the process's peak resident set size on CPU
(it includes TensorFlow itself) and the allocator's peak on a GPU.
"""

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from wcl_tf import config as config_lib  # noqa: E402
from wcl_tf import flagfiles  # noqa: E402
# Defines every Config field as a flag (and --config), as the training command line has
# them: the benchmark times what those flags mean to training.
from wcl_tf import train  # noqa: E402
from wcl_tf.tools import _cli  # noqa: E402

flags.DEFINE_list("batch_sizes", [], "step / profile: global batch sizes timed (default: "
                  "--global_batch_size; profile times the first).")
flags.DEFINE_bool("jit_compile", None, "step / profile: compile the train step with XLA "
                  "(default: as training compiles it, Keras' 'auto': XLA on a GPU or TPU, "
                  "not on a CPU).")
flags.DEFINE_list("sizes", ["256", "1024", "4096", "16384"], "weak_labels: batch sizes n.")
flags.DEFINE_integer("dim", 128, "weak_labels: embedding size.")
flags.DEFINE_integer("batch_size", None, "pipeline / ops: images per batch (default: "
                     "--global_batch_size).", lower_bound=1)
flags.DEFINE_string("augment", "project", "pipeline: 'project' (wcl_tf.data) or "
                    "'keras_cv' (an all-keras-cv two-view recipe, for comparison).")
flags.DEFINE_list("configs", ["demo", "cifar10_r18", "cifar10_r18_multicrop", "r50",
                              "r50_multicrop"],
                  "ratio: train configs, by name (the shipped ones, as --config=NAME) or as "
                  "flagfile paths.")
flags.DEFINE_string("stand_in_dataset", "cifar10", "ratio: dataset timed (at the config's "
                    "image size, from the config's data_dir) when a config's own dataset "
                    "cannot be loaded.")
flags.DEFINE_integer("max_step_batch", 128, "ratio: time the step and pipeline at "
                     "min(global batch, this) images.")
flags.DEFINE_integer("threads", 0, "photometric, pipeline: TensorFlow threads (0: all); "
                     "pipeline: also tf.data's private thread pool, and its per-core rate is "
                     "divided by this instead of the cores the process may use. For one "
                     "core strictly, pin the process too: taskset -c 1 python -m ...",
                     lower_bound=0)
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_integer("repeats", 5, "Timed steps.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def train_config(source=None):
    """The Config wcl_tf.train builds from the same flags.

    source None: this command line (absl has parsed it; --config and --flagfile were
    expanded in place by _cli, as wcl_tf.train expands them). Otherwise a shipped config's
    name or a flagfile's path: the Config of `python -m wcl_tf.train --config=NAME` (or
    `--flagfile=PATH`) followed by the training flags given on this command line. The
    training flags are parsed for it and then put back as they were.
    """
    if source is None:
        return train.config_from_flags()
    names = [field.name for field in dataclasses.fields(config_lib.Config)]
    overrides = [FLAGS[name].serialize() for name in names if FLAGS[name].present]
    is_name = source in flagfiles.available_configs() and not source.endswith(".flags")
    args = flagfiles.expand_args(
        [f"--config={source}" if is_name else f"--flagfile={source}", *overrides])
    saved = {name: (FLAGS[name].value, FLAGS[name].present, FLAGS[name].using_default_value)
             for name in names}
    try:
        for name in names:
            FLAGS[name].unparse()
        extra = FLAGS([sys.argv[0], *args])[1:]
        if extra:
            raise flagfiles.FlagfileError(f"{source}: unexpected arguments {extra}: flags "
                                          "look like --name=value.")
        return train.config_from_flags()
    finally:
        for name, (value, present, using_default) in saved.items():
            flag = FLAGS[name]
            flag.value, flag.present, flag.using_default_value = value, present, using_default


def _batch_sizes(cfg):
    return [int(b) for b in FLAGS.batch_sizes] or [cfg.global_batch_size]


def _batch_size(cfg):
    return FLAGS.batch_size or cfg.global_batch_size


def _machine():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
              if gpus else f"CPU only, {_cores()} cores")
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


def _step_setup(cfg):
    """(model, train_function, iterator): one train step of `cfg`, its model and optimizer
    built by training.build (on one device), on a fixed random batch of
    cfg.global_batch_size images (and cfg.num_local_crops local crops)."""
    import numpy as np
    import tensorflow as tf

    from wcl_tf import training

    # One step per call into the device, so that one timed call is one step.
    cfg = cfg.replace(steps_per_execution=1).validate()
    model = training.build(cfg, tf.distribute.get_strategy(), steps_per_epoch=100)
    if FLAGS.jit_compile is not None:
        model.jit_compile = FLAGS.jit_compile
    batch, s = cfg.global_batch_size, cfg.image_size
    m, ls = cfg.num_local_crops, cfg.local_crop_size
    # A model that augments on the device (augment_on) takes the views' uint8 crops, as
    # its input pipeline yields them; otherwise augmented float views in [0, 1].
    on_device = getattr(model, "view_augmentation", None) is not None
    rng = np.random.default_rng(0)

    def images(shape):
        pixels = tf.constant(rng.integers(0, 256, size=shape), tf.uint8)
        return pixels if on_device else tf.cast(pixels, tf.float32) / 255.0

    data = {v: images((batch, s, s, 3)) for v in ("view_1", "view_2")}
    if m:
        data["local"] = images((batch, m, ls, ls, 3))
    model.make_train_function()
    return model, model.train_function, iter(tf.data.Dataset.from_tensors(data).repeat())


def bench_step():
    cfg = train_config().validate()
    rows = []
    for batch in _batch_sizes(cfg):
        model, step, iterator = _step_setup(cfg.replace(global_batch_size=batch))

        def one():
            logs = step(iterator)
            float(logs["loss"])  # wait for the step to finish

        median, times = _timed(one, FLAGS.warmup, FLAGS.repeats)
        augment_s = None
        if getattr(model, "view_augmentation", None) is not None:
            # The device-side augmentation alone (what the step runs first), on the same
            # batch: its share of the step.
            import tensorflow as tf  # pylint: disable=import-outside-toplevel

            crops = next(iterator)
            augment = tf.function(model.augment_views)
            augment_s, _ = _timed(lambda: [v.numpy() for v in augment(crops).values()],
                                  FLAGS.warmup, FLAGS.repeats)
        rows.append({
            "backbone": cfg.backbone, "image_size": cfg.image_size, "batch": batch,
            "local_crops": cfg.num_local_crops, "kept_local_crops": cfg.knn_crops,
            "precision": cfg.precision, "jit_compile": bool(model.jit_compile),
            "step_s": round(median, 4), "pairs_per_s": round(batch / median, 2),
            "step_s_all": [round(t, 4) for t in times],
            "augment_on_device_s": None if augment_s is None else round(augment_s, 4),
            "augment_share": None if augment_s is None else round(augment_s / median, 4),
            "peak_memory_mb": round(_peak_memory_mb(), 1),
        })
        print(f"  {rows[-1]}", flush=True)
    header = ("| backbone | px | batch | local crops (kept) | precision | XLA | step (s) | "
              "image pairs/s | augmentation in the step | peak memory (MB) |\n"
              "|---|---|---|---|---|---|---|---|---|---|")

    def share(r):
        if r["augment_on_device_s"] is None:
            return "none (host)"
        return f"{r['augment_on_device_s']:.3f} s ({100 * r['augment_share']:.1f}%)"

    lines = [f"| {r['backbone']} | {r['image_size']} | {r['batch']} | {r['local_crops']} "
             f"({r['kept_local_crops']}) | {r['precision']} | "
             f"{'yes' if r['jit_compile'] else 'no'} | {r['step_s']:.3f} | "
             f"{r['pairs_per_s']:.2f} | {share(r)} | {r['peak_memory_mb']:.0f} |"
             for r in rows]
    return rows, "\n".join([header] + lines)


def _op_part(name):
    """Which part of the step a TF op (its full name) belongs to."""
    lowered = name.lower()
    if "lars" in lowered or "optimizer" in lowered or "assignvariableop" in lowered:
        return "optimizer"
    direction = "backward" if "gradient_tape" in lowered else "forward"
    for part in ("backbone", "instance_head", "graph_head"):
        if part in lowered:
            return f"{part} {direction}"
    if "weak_label" in lowered or "while" in lowered:
        return "weak labels"
    return f"losses and the rest {direction}"


def _op_kind(op_type, name):
    """Coarse op family: convolutions, batch norm, matmul, elementwise/other."""
    if "Conv2D" in op_type:  # oneDNN kernels are named _MklNativeConv2D...
        return op_type.replace("_MklNative", "").replace("_Mkl", "")
    if "_bn" in name or "batch_norm" in name.lower() or "FusedBatchNorm" in op_type:
        return "BatchNorm (" + ("backward" if "gradient_tape" in name else "forward") + ")"
    if op_type in ("MatMul", "BatchMatMulV2", "_MklMatMul", "_FusedMatMul"):
        return "MatMul"
    return "other: " + op_type.replace("_MklNative", "").replace("_Mkl", "")


def bench_profile():
    """Where a train step spends its time: TF profiler trace of --repeats steps, op
    durations summed by part of the model and by op family (ops on the two executor
    threads overlap, so shares, not seconds, are the result)."""
    import collections
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    cfg = train_config().validate()
    batch = _batch_sizes(cfg)[0]
    _, step, iterator = _step_setup(cfg.replace(global_batch_size=batch))
    for _ in range(max(1, FLAGS.warmup)):
        float(step(iterator)["loss"])
    logdir = tempfile.mkdtemp(prefix="wcl_profile_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(FLAGS.repeats):
        float(step(iterator)["loss"])
    wall = (time.perf_counter() - start) / FLAGS.repeats
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    by_part, by_kind = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if ":" not in meta.name or "::" in meta.name:  # executor bookkeeping
                    continue
                name, op_type = meta.name.rsplit(":", 1)
                by_part[_op_part(name)] += event.duration_ps
                by_kind[_op_kind(op_type, name)] += event.duration_ps
    total = sum(by_part.values())
    rows = {"backbone": cfg.backbone, "batch": batch, "image_size": cfg.image_size,
            "step_s": round(wall, 3),
            "by_part": {k: round(v / total, 4) for k, v in by_part.most_common()},
            "by_op": {k: round(v / total, 4) for k, v in by_kind.most_common()}}
    lines = [f"Step {wall:.3f} s (mean of {FLAGS.repeats} traced steps; tracing adds "
             "overhead).", "", "| part of the step | share of op time |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in rows["by_part"].items()]
    lines += ["", "| op family | share of op time |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in list(rows["by_op"].items())[:15]]
    return [rows], "\n".join(lines)


def _interleaved(fns, warmup, repeats):
    """{name: median seconds} of each of fns (name -> callable), timed in turns (one call
    of each per round, --repeats rounds after `warmup` untimed ones) so that a load change
    on a shared machine hits them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_weak_labels():
    """weak_labels in the graph against its parts and the host paths, timed in turns in one
    process: the similarity matmul alone (the floor), the whole-matrix symmetrisation the
    in-graph path avoids (its fallback), the in-graph path, and the authors' host path."""
    import numpy as np
    import tensorflow as tf
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from wcl_tf import weak_labels

    def similarity(v):
        return tf.matmul(v, v, transpose_b=True)

    def symmetrised(v):
        return weak_labels.components_of_functional_graph(
            weak_labels.nearest_neighbours_symmetrised(similarity(v)))

    rows = []
    for n in map(int, FLAGS.sizes):
        rng = np.random.default_rng(0)
        v = tf.math.l2_normalize(tf.constant(rng.normal(size=(n, FLAGS.dim)), tf.float32), 1)
        in_graph = tf.function(weak_labels.weak_labels)  # XLA-compiled inside
        # XLA too, so that the other paths get the fastest kernels there are.
        matmul_only = tf.function(similarity, jit_compile=True)
        symmetrised_path = tf.function(symmetrised, jit_compile=True)
        nn_only = tf.function(weak_labels.nearest_neighbours, jit_compile=True)

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

        t = _interleaved({"matmul": lambda: matmul_only(v).numpy(),
                          "symmetrised": lambda: symmetrised_path(v).numpy(),
                          "in_graph": lambda: in_graph(v).numpy(),
                          "host_components": host_components, "host_all": host_all},
                         1, max(3, FLAGS.repeats if n <= 4096 else 3))
        rows.append({"n": n, "matmul_ms": round(1e3 * t["matmul"], 2),
                     "tf_weak_labels_ms": round(1e3 * t["in_graph"], 2),
                     "tf_weak_labels_over_matmul": round(t["in_graph"] / t["matmul"], 2),
                     "whole_matrix_symmetrised_ms": round(1e3 * t["symmetrised"], 2),
                     "whole_matrix_symmetrised_over_matmul":
                         round(t["symmetrised"] / t["matmul"], 2),
                     "tf_1nn_then_scipy_ms": round(1e3 * t["host_components"], 2),
                     "numpy_scipy_host_ms": round(1e3 * t["host_all"], 2)})
        print(f"  {rows[-1]}", flush=True)
    header = ("| n | similarity matmul alone (ms) | wcl_tf weak_labels, in graph (ms) | the same "
              "with the whole matrix symmetrised (ms) | TF 1-NN + copy + scipy components (ms) "
              "| copy + NumPy 1-NN + scipy (ms) |\n|---|---|---|---|---|---|")
    lines = [f"| {r['n']} | {r['matmul_ms']:.2f} | {r['tf_weak_labels_ms']:.2f} "
             f"({r['tf_weak_labels_over_matmul']:.2f}x) | "
             f"{r['whole_matrix_symmetrised_ms']:.2f} "
             f"({r['whole_matrix_symmetrised_over_matmul']:.2f}x) | "
             f"{r['tf_1nn_then_scipy_ms']:.2f} | {r['numpy_scipy_host_ms']:.2f} |" for r in rows]
    return rows, "\n".join([header] + lines)


def _keras_cv_two_views(image_size, blur=False):
    """An all-keras-cv SimCLR-like view (for the comparison row only)."""
    import keras
    import keras_cv
    import tensorflow as tf

    from wcl_tf.data import photometric

    def make():
        return keras.Sequential([
            keras_cv.layers.RandomCropAndResize((image_size, image_size), (0.08, 1.0),
                                                (3 / 4, 4 / 3)),
            keras_cv.layers.RandomApply(keras_cv.layers.RandomColorJitter(
                (0, 1), 0.8, 0.8, (0.1, 0.9), 0.2), rate=0.8),
            keras_cv.layers.RandomApply(keras_cv.layers.Grayscale(output_channels=3), rate=0.2),
            *([keras_cv.layers.RandomApply(keras_cv.layers.RandomGaussianBlur(
                photometric.blur_kernel_size(image_size), (0.1, 2.0)), rate=0.5)] if blur else []),
            keras.layers.RandomFlip("horizontal"),
        ])

    first, second = make(), make()

    def views(images):
        x = tf.cast(images, tf.float32) / 255.0
        return {"view_1": first(x), "view_2": second(x)}

    return views


def bench_ops():
    """Each augmentation op, wcl_tf's plain-TF version against the keras-cv / Keras layer,
    on one batch of --batch_size images of --image_size px (graph mode, images/s)."""
    import keras
    import keras_cv
    import numpy as np
    import tensorflow as tf

    from wcl_tf.data import cropping, photometric, recipe

    cfg = train_config()
    size, batch = cfg.image_size, _batch_size(cfg)
    images = tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)),
                         tf.float32)
    seed = tf.constant([1, 2], tf.int64)
    kernel = photometric.blur_kernel_size(size)
    sigma = tf.random.stateless_uniform([batch], [3, 4], 0.1, 2.0)
    spec = recipe.STRONG
    ours = {
        "random resized crop": lambda x: cropping.random_resized_crop(
            x, size, spec.crop_scale, spec.crop_ratio, seed),
        "colour jitter (all images)": lambda x: photometric.color_jitter(
            x, spec.brightness, spec.contrast, spec.saturation, spec.hue, seed),
        "grayscale": lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3]),
        "Gaussian blur (all images)": lambda x: photometric.gaussian_blur(x, kernel, sigma),
        "horizontal flip": lambda x: photometric.flip_left_right(
            x, tf.random.stateless_uniform([batch], seed) < 0.5),
    }
    layers = {
        "random resized crop": keras_cv.layers.RandomCropAndResize(
            (size, size), spec.crop_scale, spec.crop_ratio),
        "colour jitter (all images)": keras_cv.layers.RandomColorJitter(
            (0, 1), 0.8, 0.8, (0.1, 0.9), 0.2),
        "grayscale": keras_cv.layers.Grayscale(output_channels=3),
        "Gaussian blur (all images)": keras_cv.layers.RandomGaussianBlur(kernel, (0.1, 2.0)),
        "horizontal flip": keras.layers.RandomFlip("horizontal"),
    }
    rows = []
    for name, fn in ours.items():
        layer = layers[name]
        rates = {}
        for who, op in (("wcl_tf", tf.function(fn)),
                        ("keras-cv / Keras", tf.function(lambda x, l=layer: l(x, training=True)))):
            median, _ = _timed(lambda op=op: op(images).numpy(), FLAGS.warmup, FLAGS.repeats)
            rates[who] = batch / median
        rows.append({"op": name, "image_size": size, "batch": batch,
                     "wcl_tf_images_per_s": round(rates["wcl_tf"], 1),
                     "keras_cv_images_per_s": round(rates["keras-cv / Keras"], 1),
                     "layer": type(layer).__module__.split(".")[0] + "." + type(layer).__name__})
        print(f"  {rows[-1]}", flush=True)
    header = (f"| op ({size} px, batch {batch}) | wcl_tf, plain TF (images/s) | layer | layer "
              "(images/s) |\n|---|---|---|---|")
    lines = [f"| {r['op']} | {r['wcl_tf_images_per_s']:.0f} | {r['layer']} | "
             f"{r['keras_cv_images_per_s']:.0f} |" for r in rows]
    return rows, "\n".join([header] + lines)


def bench_photometric():
    """The recipe after the crop (jitter p=0.8, grayscale, [blur,] flip: what the device
    runs with --augment_on=device), ms per view: the host form (each op on the images drawn
    for it) and the static-shape form (XLA, TPUs), on one batch of uint8 crops, with
    --threads intra-op threads (1: per core)."""
    import numpy as np
    import tensorflow as tf

    from wcl_tf.data import recipe, view_assembly

    _limit_threads()
    cfg = train_config()
    size, batch = cfg.image_size, _batch_size(cfg)
    crops = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)),
                        tf.uint8)
    seed = tf.constant([1, 2], tf.int64)
    augmenter = view_assembly.view_augmenter(size, cfg.blur)
    rows = []
    for form, static in (("host (drawn images only)", False), ("static shapes", True)):
        fn = tf.function(lambda x, s=static: augmenter(x, recipe.STRONG, seed, crop=False,
                                                       static_shapes=s))
        median, _ = _timed(lambda fn=fn: fn(crops).numpy(), FLAGS.warmup, FLAGS.repeats)
        rows.append({"form": form, "image_size": size, "batch": batch, "blur": cfg.blur,
                     "threads": FLAGS.threads, "ms_per_view": round(1000 * median / batch, 2)})
        print(f"  {rows[-1]}", flush=True)
    header = (f"| after the crop ({size} px, batch {batch}, blur {'on' if cfg.blur else 'off'}, "
              f"{FLAGS.threads or 'all'} thread(s)) | ms per view |\n|---|---|")
    return rows, "\n".join([header] + [f"| {r['form']} | {r['ms_per_view']:.2f} |"
                                         for r in rows])


def _limit_threads():
    """--threads TensorFlow intra- and inter-op threads (before any op runs)."""
    import tensorflow as tf

    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)


def _cores():
    """CPU cores this process may run on (taskset / cgroup affinity), for per-core rates."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count()


def _pipeline_batches(cfg, batch):
    """Batches timed per repeat: about 2,048 images at 32-64 px, 256 at larger sizes."""
    return max(2, 2048 // batch // (1 if cfg.image_size <= 64 else 8))


def _images_per_s(iterator, batch, batches, warmup, cpu_rates=None):
    """Median over --repeats of the images/s of `batches` batches of `batch` images drawn
    from `iterator`, after `warmup` untimed batches. cpu_rates, a list: gets the images per
    second of this process's CPU time (all its threads) of each repeat, a per-core rate
    that a busy machine's other processes do not dilute."""
    for _ in range(warmup):
        next(iterator)
    rates = []
    for _ in range(FLAGS.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * batch / (time.perf_counter() - start))
        if cpu_rates is not None:
            cpu_rates.append(batches * batch / (time.process_time() - cpu_start))
    return statistics.median(rates)


def bench_pipeline():
    import tensorflow as tf

    from wcl_tf import training
    from wcl_tf.data import pipeline, sources

    _limit_threads()
    cfg = train_config().validate()
    batch = _batch_size(cfg)
    # Strong augmentation (the costlier recipe) from the first batch.
    cfg = cfg.replace(global_batch_size=batch, weak_aug_epochs=0)
    if FLAGS.augment == "project":
        ds = pipeline.make_pretrain_dataset(cfg, batch)
    else:
        raw, _, _ = sources.load_split(cfg.dataset, cfg.train_split, cfg.data_dir)
        ds = (raw.map(lambda x, y: sources.resize_uint8(x, cfg.image_size)).cache().repeat()
              .batch(batch, drop_remainder=True)
              .map(_keras_cv_two_views(cfg.image_size, cfg.blur),
                   num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    if FLAGS.threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = FLAGS.threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    cpu_rates = []
    rate = _images_per_s(iter(ds), batch, 10, 3 + FLAGS.warmup, cpu_rates)
    cores = min(FLAGS.threads, _cores()) if FLAGS.threads else _cores()
    row = {"augment": FLAGS.augment, "dataset": cfg.dataset, "image_size": cfg.image_size,
           "blur": cfg.blur, "local_crops": cfg.num_local_crops,
           "local_crop_size": cfg.local_crop_size, "batch": batch,
           "images_per_s": round(rate, 1), "images_per_s_per_core": round(rate / cores, 1),
           "threads": FLAGS.threads or None, "cores": cores,
           "images_per_cpu_s": round(statistics.median(cpu_rates), 1),
           "augment_on": training.augment_side(cfg)}
    # What the host does: everything (host), or decode and crops for the device's recipe.
    side = ("host: all of it" if row["augment_on"] == "host" or FLAGS.augment != "project"
            else "device (host side: decode + crops)")
    print(f"  {row}", flush=True)
    header = ("| augmentation | on | px | blur | local crops | images/s (each with all its "
              "views) | threads / cores | per core | per CPU second |\n"
              "|---|---|---|---|---|---|---|---|---|")
    line = (f"| {row['augment']} | {side} | {row['image_size']} | "
            f"{'yes' if row['blur'] else 'no'} | "
            f"{row['local_crops']}"
            f"{'x' + str(row['local_crop_size']) if row['local_crops'] else ''} | "
            f"{row['images_per_s']:.0f} | {row['threads'] or 'all'} / {cores} | "
            f"{row['images_per_s_per_core']:.0f} | {row['images_per_cpu_s']:.0f} |")
    return [row], header + "\n" + line


def bench_ratio():
    """For each of --configs: input-pipeline images/s against the images/s its train step
    consumes on this machine, and their ratio (goal: >= 2)."""
    import keras

    from wcl_tf.data import DataError, pipeline, sources

    rows = []
    for source in FLAGS.configs:
        cfg = train_config(source).validate()
        batch = min(cfg.global_batch_size, FLAGS.max_step_batch)
        dataset, stand_in = cfg.dataset, ""
        try:
            sources.load_split(dataset, cfg.train_split, cfg.data_dir)
        except DataError:
            dataset = FLAGS.stand_in_dataset
            stand_in = f"{dataset} at {cfg.image_size} px (stand-in)"
        # Strong augmentation (the costlier recipe) from the first batch.
        data_cfg = cfg.replace(dataset=dataset, global_batch_size=batch, weak_aug_epochs=0,
                               max_train_examples=0)
        iterator = iter(pipeline.make_pretrain_dataset(data_cfg, batch))
        pipeline_rate = _images_per_s(
            iterator, batch, _pipeline_batches(cfg, batch), 3)
        del iterator
        _, step, step_iterator = _step_setup(cfg.replace(global_batch_size=batch))
        median, _ = _timed(lambda: float(step(step_iterator)["loss"]), FLAGS.warmup,
                           FLAGS.repeats)
        step_rate = batch / median
        rows.append({"config": source, "dataset": stand_in or cfg.dataset, "batch": batch,
                     "image_size": cfg.image_size, "blur": cfg.blur,
                     "local_crops": cfg.num_local_crops,
                     "pipeline_images_per_s": round(pipeline_rate, 1),
                     "pipeline_images_per_s_per_core": round(pipeline_rate / _cores(), 1),
                     "step_s": round(median, 4), "step_images_per_s": round(step_rate, 2),
                     "ratio": round(pipeline_rate / step_rate, 1)})
        print(f"  {rows[-1]}", flush=True)
        keras.backend.clear_session()
    header = ("| config | data | batch timed | pipeline images/s (per core) | step images/s | "
              "pipeline / step |\n|---|---|---|---|---|---|")
    lines = [f"| {r['config']} | {r['dataset']} | {r['batch']} | "
             f"{r['pipeline_images_per_s']:.0f} ({r['pipeline_images_per_s_per_core']:.0f}) | "
             f"{r['step_images_per_s']:.1f} | **{r['ratio']:.1f}x** |" for r in rows]
    return rows, "\n".join([header] + lines)


def bench_gpu():
    """The accelerator check of one short run: the train step's images/s at the run's
    global batch with device-side augmentation (uint8 crops in, jitter/grayscale/blur/flip
    in the step), the host pipeline's images/s (decode + crops only) with all the
    machine's cores, and their ratio; the host-only recipe's images/s too, for the
    comparison. Meant for one GPU (see docs/performance.md for the command); on a CPU it
    runs the same way and says so."""
    import keras
    import tensorflow as tf

    from wcl_tf.data import pipeline

    cfg = train_config().validate()
    batch = _batch_sizes(cfg)[0]
    accelerator = bool(tf.config.list_physical_devices("GPU")
                       or tf.config.list_logical_devices("TPU"))
    if not accelerator:
        print("benchmark gpu: no GPU or TPU visible; the figures below are this CPU's.",
              flush=True)
    step_cfg = cfg.replace(global_batch_size=batch, augment_on="device")
    _, step, iterator = _step_setup(step_cfg)
    median, _ = _timed(lambda: float(step(iterator)["loss"]), FLAGS.warmup, FLAGS.repeats)
    step_rate = batch / median
    keras.backend.clear_session()
    rates = {}
    batches = _pipeline_batches(cfg, batch)
    for where in ("device", "host"):  # Host side of the device recipe; host-only recipe.
        data_cfg = cfg.replace(global_batch_size=batch, weak_aug_epochs=0, augment_on=where)
        rates[where] = _images_per_s(iter(pipeline.make_pretrain_dataset(data_cfg, batch)),
                                     batch, batches, 3)
    row = {"accelerator": accelerator, "backbone": cfg.backbone, "image_size": cfg.image_size,
           "batch": batch, "precision": cfg.precision, "dataset": cfg.dataset,
           "step_s": round(median, 4), "step_images_per_s": round(step_rate, 1),
           "host_cores": _cores(),
           "host_device_recipe_images_per_s": round(rates["device"], 1),
           "host_only_recipe_images_per_s": round(rates["host"], 1),
           "ratio_device_recipe": round(rates["device"] / step_rate, 2),
           "ratio_host_recipe": round(rates["host"] / step_rate, 2)}
    print(f"  {row}", flush=True)
    header = ("| step (augment on device) images/s | host pipeline, device recipe (images/s) | "
              "host pipeline, host-only recipe | host / step (device recipe) | host / step "
              "(host-only) |\n|---|---|---|---|---|")
    line = (f"| {row['step_images_per_s']:.1f} | {row['host_device_recipe_images_per_s']:.0f} "
            f"({_cores()} cores) | {row['host_only_recipe_images_per_s']:.0f} | "
            f"**{row['ratio_device_recipe']:.2f}x** | {row['ratio_host_recipe']:.2f}x |")
    return [row], header + "\n" + line


def _main(argv):
    modes = {"step": bench_step, "weak_labels": bench_weak_labels,
             "pipeline": bench_pipeline, "profile": bench_profile, "ratio": bench_ratio,
             "ops": bench_ops, "gpu": bench_gpu, "photometric": bench_photometric}
    if len(argv) != 2 or argv[1] not in modes:
        raise app.UsageError(f"usage: benchmark.py {'|'.join(modes)} [--flags]")
    logging.set_verbosity(logging.WARNING)
    from wcl_tf.data import DataError  # pylint: disable=import-outside-toplevel

    try:
        rows, table = modes[argv[1]]()
    except (config_lib.ConfigError, DataError, flagfiles.FlagfileError, flags.Error) as err:
        # What wcl_tf.train reports in one line for the same flags.
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    print(f"\nMachine: {_machine()}\nCommand: python -m wcl_tf.tools.benchmark "
          f"{' '.join(sys.argv[1:])}\n\n{table}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"machine": _machine(), "argv": sys.argv[1:], "rows": rows}, f, indent=2)
    return 0


def main():
    """Entry point of the module, of tools/benchmark.py and of the console script."""
    # --help lists the training flags too: they describe the run being timed.
    for flag in FLAGS.get_key_flags_for_module(train.__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
