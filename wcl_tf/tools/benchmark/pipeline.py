"""The input side: training's input pipeline (pipeline), each augmentation op against the
keras-cv / Keras layer (ops), and the recipe after the crop in its two forms
(photometric). The one module of the benchmark that uses wcl_tf.data's augmentation
modules."""

from wcl_tf.tools.benchmark import timing


def limit_threads(threads):
    """`threads` TensorFlow intra- and inter-op threads (0: all); before any op runs."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def pipeline_batches(cfg, batch):
    """Batches timed per repeat: about 2,048 images at 32-64 px, 256 at larger sizes."""
    return max(2, 2048 // batch // (1 if cfg.image_size <= 64 else 8))


def images_per_s(iterator, batch, batches, warmup, repeats):
    """(images/s, images per CPU second): medians over `repeats` of drawing `batches`
    batches of `batch` images from `iterator`, after `warmup` untimed batches. The CPU
    rate counts this process's CPU time (all its threads): a per-core rate that a busy
    machine's other processes do not dilute."""
    for _ in range(warmup):
        next(iterator)

    def draw():
        for _ in range(batches):
            next(iterator)

    drawn = timing.timed(draw, 0, repeats)
    return drawn.rate(batches * batch), drawn.cpu_rate(batches * batch)


def _keras_cv_two_views(image_size, blur=False):
    """An all-keras-cv SimCLR-like view (for the comparison row only)."""
    # pylint: disable=import-outside-toplevel
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
                photometric.blur_kernel_size(), (0.1, 2.0)), rate=0.5)] if blur else []),
            keras.layers.RandomFlip("horizontal"),
        ])

    first, second = make(), make()

    def views(images):
        x = tf.cast(images, tf.float32) / 255.0
        return {"view_1": first(x), "view_2": second(x)}

    return views


def bench_ops(cfg, batch, warmup, repeats):
    """Each augmentation op, wcl_tf's plain-TF version against the keras-cv / Keras layer,
    on one batch of `batch` images of cfg.image_size px (graph mode, images/s)."""
    # pylint: disable=import-outside-toplevel
    import keras
    import keras_cv
    import numpy as np
    import tensorflow as tf

    from wcl_tf.data import cropping, photometric, recipe

    size = cfg.image_size
    images = tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)),
                         tf.float32)
    seed = tf.constant([1, 2], tf.int64)
    # keras-cv's sampled Gaussian with as many taps as wcl_tf's (Pillow's) kernel.
    kernel = photometric.blur_kernel_size()
    sigma = tf.random.stateless_uniform([batch], [3, 4], 0.1, 2.0)
    spec = recipe.STRONG
    ours = {
        "random resized crop": lambda x: cropping.random_resized_crop(
            x, size, spec.crop_scale, spec.crop_ratio, seed),
        "colour jitter (all images)": lambda x: photometric.color_jitter(
            x, spec.brightness, spec.contrast, spec.saturation, spec.hue, seed),
        "grayscale": lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3]),
        "Gaussian blur (all images)": lambda x: photometric.gaussian_blur(x, sigma),
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
            median = timing.timed(lambda op=op: op(images).numpy(), warmup, repeats).median
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


def bench_photometric(cfg, batch, threads, warmup, repeats):
    """The recipe after the crop and flip (jitter p=0.8, grayscale, [blur]: what the device
    runs with --augment_on=device), ms per view: the host form (each op on the images drawn
    for it) and the static-shape form (XLA, TPUs), on one batch of uint8 crops, with
    `threads` intra-op threads (1: per core; 0: all)."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import tensorflow as tf

    from wcl_tf.data import recipe, view_assembly

    limit_threads(threads)
    size = cfg.image_size
    crops = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)),
                        tf.uint8)
    seed = tf.constant([1, 2], tf.int64)
    augmenter = view_assembly.view_augmenter(size, cfg.blur)
    rows = []
    for form, static in (("host (drawn images only)", False), ("static shapes", True)):
        fn = tf.function(lambda x, s=static: augmenter(x, recipe.STRONG, seed, crop=False,
                                                       static_shapes=s))
        median = timing.timed(lambda fn=fn: fn(crops).numpy(), warmup, repeats).median
        rows.append({"form": form, "image_size": size, "batch": batch, "blur": cfg.blur,
                     "threads": threads, "ms_per_view": round(1000 * median / batch, 2)})
        print(f"  {rows[-1]}", flush=True)
    header = (f"| after the crop ({size} px, batch {batch}, blur {'on' if cfg.blur else 'off'}, "
              f"{threads or 'all'} thread(s)) | ms per view |\n|---|---|")
    return rows, "\n".join([header] + [f"| {r['form']} | {r['ms_per_view']:.2f} |"
                                         for r in rows])


def bench_pipeline(cfg, batch, augment, threads, warmup, repeats):
    """Training's input pipeline of `cfg` at `batch` images, strong augmentation from the
    first batch: images/s, per core and per CPU second. augment: 'project' (wcl_tf.data)
    or 'keras_cv' (an all-keras-cv two-view recipe, for comparison); threads: TensorFlow's
    and tf.data's threads (0: all)."""
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf

    from wcl_tf import training
    from wcl_tf.data import pipeline, sources

    limit_threads(threads)
    # Strong augmentation (the costlier recipe) from the first batch.
    cfg = cfg.replace(global_batch_size=batch, weak_aug_epochs=0)
    if augment == "project":
        ds = pipeline.make_pretrain_dataset(cfg, batch)
    else:
        raw, _, _ = sources.load_split(cfg.dataset, cfg.train_split, cfg.data_dir)
        ds = (raw.map(lambda x, y: sources.resize_uint8(x, cfg.image_size)).cache().repeat()
              .batch(batch, drop_remainder=True)
              .map(_keras_cv_two_views(cfg.image_size, cfg.blur),
                   num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    iterator = iter(ds)
    for _ in range(3 + warmup):
        next(iterator)
    faults = timing.minor_faults()
    rate, cpu_rate = images_per_s(iterator, batch, 10, 0, repeats)
    # Page faults per image of the timed repeats (wcl_tf/__init__.py: the BFC pool).
    faults = (timing.minor_faults() - faults) / (batch * 10 * repeats)
    cores = min(threads, timing.cores()) if threads else timing.cores()
    row = {"augment": augment, "dataset": cfg.dataset, "image_size": cfg.image_size,
           "blur": cfg.blur, "local_crops": cfg.num_local_crops,
           "local_crop_size": cfg.local_crop_size, "batch": batch,
           "images_per_s": round(rate, 1), "images_per_s_per_core": round(rate / cores, 1),
           "threads": threads or None, "cores": cores,
           "images_per_cpu_s": round(cpu_rate, 1),
           "page_faults_per_image": round(faults),
           "augment_on": training.augment_side(cfg)}
    # What the host does: everything (host), or decode and crops for the device's recipe.
    side = ("host: all of it" if row["augment_on"] == "host" or augment != "project"
            else "device (host side: decode + crops)")
    print(f"  {row}", flush=True)
    header = ("| augmentation | on | px | blur | local crops | images/s (each with all its "
              "views) | threads / cores | per core | per CPU second | page faults per "
              "image |\n|---|---|---|---|---|---|---|---|---|---|")
    line = (f"| {row['augment']} | {side} | {row['image_size']} | "
            f"{'yes' if row['blur'] else 'no'} | "
            f"{row['local_crops']}"
            f"{'x' + str(row['local_crop_size']) if row['local_crops'] else ''} | "
            f"{row['images_per_s']:.0f} | {row['threads'] or 'all'} / {cores} | "
            f"{row['images_per_s_per_core']:.0f} | {row['images_per_cpu_s']:.0f} | "
            f"{row['page_faults_per_image']} |")
    return [row], header + "\n" + line
