"""wcl_tf: Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021) in Keras 3.

The notebook API, in four names (imported lazily: `import wcl_tf` does not start
TensorFlow):

    import wcl_tf
    cfg = wcl_tf.Config(dataset="embedded_mnist", image_size=28, backbone="small_cnn",
                        epochs=5)
    model = wcl_tf.build_model(cfg)               # compiled: LARS + warm-up cosine
    dataset = wcl_tf.pretrain_dataset(cfg)        # endless, per replica (see below)
    model.fit(dataset, epochs=cfg.epochs)         # steps_per_epoch comes from the model

`wcl_tf.run(cfg)` does all of it with checkpoints, resume, TensorBoard and kNN.

Using a trained encoder: `wcl_tf.embed(images, model_dir=...)` returns the embeddings of
a folder of images and their file list, and `wcl_tf.Neighbors(embeddings)` searches them
(faiss); see wcl_tf.encoder, wcl_tf.embedding and wcl_tf.neighbors (the tools
wcl_tf.tools.embed and wcl_tf.tools.neighbors do the same from the command line, for large
collections).

Where the augmentation runs follows cfg.augment_on in both: "host" makes the views in
tf.data; "device" ("auto" with a GPU/TPU) makes only the crops there (uint8) and the
model augments them in its train step. Build both from the same cfg.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow's BFC pool for host tensors instead of malloc, unless the environment says
# otherwise. It has to be set before TensorFlow's first op (importing any part of wcl_tf
# does it; a notebook that ran TensorFlow ops before importing wcl_tf keeps malloc). With
# glibc's malloc a large tensor is mapped fresh and faulted in page by page at every
# allocation: 4,705 page faults for each (32, 224, 224, 3) float batch made. Measured on
# this project's 2-core CPU box (docs/performance.md, "Host tensors in TensorFlow's BFC
# pool"): the ResNet-50 WCL step 1.21-1.33x faster at the same peak memory, the host-only
# 224-px pipeline's page faults from 405 to 1 per image. Its limit is the machine's
# physical memory (TensorFlow's default, 64 GB, would refuse allocations that malloc
# grants on a larger host).
def _pool_host_tensors(environ):
    if "TF_CPU_ALLOCATOR_USE_BFC" in environ:
        return
    environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    try:
        physical_mb = (_os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES")) >> 20
    except (AttributeError, ValueError, OSError):  # Not a POSIX system: keep TF's default.
        return
    environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(physical_mb))


_pool_host_tensors(_os.environ)


def __getattr__(name):
    if name == "Config":
        from wcl_tf.config import Config
        return Config
    if name == "run":
        from wcl_tf.training import run
        return run
    if name == "Neighbors":
        from wcl_tf.neighbors import Neighbors
        return Neighbors
    raise AttributeError(f"module 'wcl_tf' has no attribute {name!r}")


def _strategy(strategy):
    import tensorflow as tf

    return strategy if strategy is not None else tf.distribute.get_strategy()


def build_model(cfg, strategy=None):
    """A compiled WCLModel for `cfg` (validated) inside `strategy` (default: the current
    one). Its optimizer's schedule and `model.steps_per_epoch` are cfg's epoch length, so
    `model.fit(pretrain_dataset(cfg), epochs=N)` needs no steps_per_epoch."""
    from wcl_tf import training

    cfg.validate()
    return training.build(cfg, _strategy(strategy), training.steps_per_epoch(cfg))


def pretrain_dataset(cfg, strategy=None, initial_step=0):
    """The endless distributed dataset of views for `cfg` (default strategy: the current
    one): augmented float views, or their uint8 crops when cfg.augment_on resolves to the
    device (the model from build_model(cfg) augments those). initial_step: the optimizer step to start from (a resumed model's
    `optimizer.iterations`), so that augmentation phase and data order continue."""
    from wcl_tf.data import pipeline

    dataset, _ = pipeline.distribute_pretrain_dataset(_strategy(strategy), cfg,
                                                      initial_step=initial_step)
    return dataset


def embed(images, model_dir=None, saved_model=None, checkpoint=None, features="backbone",
          normalize=True, dtype="float32", batch_size=64, random_init=False, seed=0,
          strategy=None):
    """(embeddings (N, C) NumPy array, files) of every image below the folder `images` (or
    of one image file), with the encoder of a run folder (`model_dir`, or `checkpoint`),
    of an export (`saved_model`), or randomly initialised (`random_init`, the run's
    architecture). files: one dict per row, {"path" (relative to `images`), "class" (the
    class folder or ""), "height", "width"}; files that do not decode are skipped.
    In memory: for large collections write shards with `python -m wcl_tf.tools.embed`."""
    from wcl_tf import embed_sources, embedding
    from wcl_tf.encoder import load_encoder

    encoder = load_encoder(model_dir=model_dir, checkpoint=checkpoint,
                           saved_model=saved_model, features=features,
                           random_init=random_init, seed=seed)
    array, files, _ = embedding.embed_array(encoder, embed_sources.ImageFolder(images),
                                            batch_size=batch_size, dtype=dtype,
                                            normalize=normalize, strategy=strategy)
    return array, files
