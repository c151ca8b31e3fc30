"""The accelerator check of one short run: can the host feed the train step?"""

from wcl_tf.tools.benchmark import pipeline, step, timing


def bench_gpu(cfg, batch, jit_compile, warmup, repeats):
    """The train step's images/s at `batch` images with device-side augmentation (uint8
    crops in, jitter/grayscale/blur in the step), the host pipeline's images/s
    (decode + crops only) with all the machine's cores, and their ratio; the host-only
    recipe's images/s too, for the comparison. Meant for one GPU (see
    docs/performance.md for the command); on a CPU it runs the same way and says so."""
    # pylint: disable=import-outside-toplevel
    import keras
    import tensorflow as tf

    from wcl_tf.data import pipeline as data_pipeline

    accelerator = bool(tf.config.list_physical_devices("GPU")
                       or tf.config.list_logical_devices("TPU"))
    if not accelerator:
        print("benchmark gpu: no GPU or TPU visible; the figures below are this CPU's.",
              flush=True)
    step_cfg = cfg.replace(global_batch_size=batch, augment_on="device")
    median = step.time_step(step_cfg, jit_compile, warmup, repeats)[2].median
    step_rate = batch / median
    keras.backend.clear_session()
    rates = {}
    batches = pipeline.pipeline_batches(cfg, batch)
    for where in ("device", "host"):  # Host side of the device recipe; host-only recipe.
        data_cfg = cfg.replace(global_batch_size=batch, weak_aug_epochs=0, augment_on=where)
        rates[where], _ = pipeline.images_per_s(
            iter(data_pipeline.make_pretrain_dataset(data_cfg, batch)), batch, batches, 3,
            repeats)
    cores = timing.cores()
    row = {"accelerator": accelerator, "backbone": cfg.backbone, "image_size": cfg.image_size,
           "batch": batch, "precision": cfg.precision, "dataset": cfg.dataset,
           "step_s": round(median, 4), "step_images_per_s": round(step_rate, 1),
           "host_cores": cores,
           "host_device_recipe_images_per_s": round(rates["device"], 1),
           "host_only_recipe_images_per_s": round(rates["host"], 1),
           "ratio_device_recipe": round(rates["device"] / step_rate, 2),
           "ratio_host_recipe": round(rates["host"] / step_rate, 2)}
    print(f"  {row}", flush=True)
    header = ("| step (augment on device) images/s | host pipeline, device recipe (images/s) | "
              "host pipeline, host-only recipe | host / step (device recipe) | host / step "
              "(host-only) |\n|---|---|---|---|---|")
    line = (f"| {row['step_images_per_s']:.1f} | {row['host_device_recipe_images_per_s']:.0f} "
            f"({cores} cores) | {row['host_only_recipe_images_per_s']:.0f} | "
            f"**{row['ratio_device_recipe']:.2f}x** | {row['ratio_host_recipe']:.2f}x |")
    return [row], header + "\n" + line
