"""The input pipeline's images/s against the images/s the train step consumes, per
training config."""

from wcl_tf.tools.benchmark import pipeline, step, timing


def bench_ratio(configs, stand_in_dataset, max_step_batch, jit_compile, warmup, repeats):
    """(rows, markdown table): for each (name, Config) of configs, input-pipeline images/s
    against the images/s its train step consumes on this machine, and their ratio (goal:
    >= 2), both at min(global batch, max_step_batch) images. A config whose dataset
    cannot be loaded is timed on stand_in_dataset at its image size."""
    # pylint: disable=import-outside-toplevel
    import keras

    from wcl_tf.data import DataError, sources
    from wcl_tf.data import pipeline as data_pipeline

    rows = []
    for source, cfg in configs:
        batch = min(cfg.global_batch_size, max_step_batch)
        dataset, stand_in = cfg.dataset, ""
        try:
            sources.load_split(dataset, cfg.train_split, cfg.data_dir)
        except DataError:
            dataset = stand_in_dataset
            stand_in = f"{dataset} at {cfg.image_size} px (stand-in)"
        # Strong augmentation (the costlier recipe) from the first batch.
        data_cfg = cfg.replace(dataset=dataset, global_batch_size=batch, weak_aug_epochs=0,
                               max_train_examples=0)
        iterator = iter(data_pipeline.make_pretrain_dataset(data_cfg, batch))
        pipeline_rate, _ = pipeline.images_per_s(
            iterator, batch, pipeline.pipeline_batches(cfg, batch), 3, repeats)
        del iterator
        median = step.time_step(cfg.replace(global_batch_size=batch), jit_compile, warmup,
                                repeats)[2].median
        step_rate = batch / median
        rows.append({"config": source, "dataset": stand_in or cfg.dataset, "batch": batch,
                     "image_size": cfg.image_size, "blur": cfg.blur,
                     "local_crops": cfg.num_local_crops,
                     "pipeline_images_per_s": round(pipeline_rate, 1),
                     "pipeline_images_per_s_per_core": round(pipeline_rate / timing.cores(), 1),
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
