"""The train step: its time, images/s and peak memory by batch size (step), and where its
time goes by part of the model and by op family (profile)."""

import collections
import glob
import tempfile

from wcl_tf.tools.benchmark import timing


def step_setup(cfg, jit_compile=None):
    """(model, train_function, iterator): one train step of `cfg`, its model and optimizer
    built by training.build (on one device), on a fixed random batch of
    cfg.global_batch_size images (and cfg.num_local_crops local crops). jit_compile None:
    as training compiles it."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import tensorflow as tf

    from wcl_tf import training

    # One step per call into the device, so that one timed call is one step.
    cfg = cfg.replace(steps_per_execution=1).validate()
    model = training.build(cfg, tf.distribute.get_strategy(), steps_per_epoch=100)
    if jit_compile is not None:
        model.jit_compile = jit_compile
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


def time_step(cfg, jit_compile, warmup, repeats):
    """(model, iterator, Timing) of the train step of `cfg` (see step_setup)."""
    model, step, iterator = step_setup(cfg, jit_compile)
    return model, iterator, timing.timed(_one_step(step, iterator), warmup, repeats)


def _one_step(step, iterator):
    """A call of one train step that returns when the step has finished."""
    return lambda: float(step(iterator)["loss"])


def bench_step(cfg, batch_sizes, jit_compile, warmup, repeats):
    """(rows, markdown table): the step of `cfg` at each of batch_sizes."""
    rows = []
    for batch in batch_sizes:
        model, iterator, step_time = time_step(cfg.replace(global_batch_size=batch),
                                               jit_compile, warmup, repeats)
        median = step_time.median
        augment_s = None
        if getattr(model, "view_augmentation", None) is not None:
            # The device-side augmentation alone (what the step runs first), on the same
            # batch: its share of the step.
            import tensorflow as tf  # pylint: disable=import-outside-toplevel

            crops = next(iterator)
            augment = tf.function(model.augment_views)
            augment_s = timing.timed(lambda: [v.numpy() for v in augment(crops).values()],
                                     warmup, repeats).median
        rows.append({
            "backbone": cfg.backbone, "image_size": cfg.image_size, "batch": batch,
            "local_crops": cfg.num_local_crops, "kept_local_crops": cfg.knn_crops,
            "precision": cfg.precision, "jit_compile": bool(model.jit_compile),
            "step_s": round(median, 4), "pairs_per_s": round(batch / median, 2),
            "step_s_all": [round(t, 4) for t in step_time.seconds],
            "augment_on_device_s": None if augment_s is None else round(augment_s, 4),
            "augment_share": None if augment_s is None else round(augment_s / median, 4),
            "peak_memory_mb": round(timing.peak_memory_mb(), 1),
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


def bench_profile(cfg, batch, jit_compile, warmup, repeats):
    """Where a train step spends its time: TF profiler trace of `repeats` steps (after
    at least one untimed), op durations summed by part of the model and by op family (ops
    on the two executor threads overlap, so shares, not seconds, are the result)."""
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    one = _one_step(*step_setup(cfg.replace(global_batch_size=batch), jit_compile)[1:])
    for _ in range(max(1, warmup)):
        one()
    logdir = tempfile.mkdtemp(prefix="wcl_profile_")
    tf.profiler.experimental.start(logdir)
    wall = timing.timed(one, 0, repeats).mean
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
    lines = [f"Step {wall:.3f} s (mean of {repeats} traced steps; tracing adds "
             "overhead).", "", "| part of the step | share of op time |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in rows["by_part"].items()]
    lines += ["", "| op family | share of op time |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in list(rows["by_op"].items())[:15]]
    return [rows], "\n".join(lines)
