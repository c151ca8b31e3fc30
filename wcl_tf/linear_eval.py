"""Linear evaluation of a frozen encoder (docs/method.md section 5.3).

The classifier is one Dense layer (kernel ~ N(0, 0.01), zero bias) trained with SGD, Nesterov
momentum 0.9, no weight decay, learning rate 0.2 * batch / 256 decayed per step by a cosine to
0, on the cross-entropy of its logits. Test top-1 / top-5 are measured after every epoch.

Two variants:

- `linear_eval_features`: the fast one. Features are computed once (`encoder_features`) and
  the classifier trains on them without augmentation. Features are used as they come: no
  L2 normalisation and no standardisation (neither is in the protocol).
- `linear_eval_full`: the protocol itself. The backbone stays frozen in inference mode
  (BatchNorm uses its moving statistics and none of its variables change); every training
  batch is a fresh random resized crop (scale 0.08-1) + horizontal flip made in tf.data;
  test images are used as given (already resized). As the backbone is frozen and the test
  images fixed, the test features are computed once.

- `linear_eval_stream`: the same protocol on tf.data batches (wcl_tf.data.eval_input):
  training crops are cut from the ORIGINAL images while they are read, test images are
  resized (shorter side round(S * 256 / 224)) and centre-cropped; only the test features
  (M x C) are held, so memory does not grow with the training set. `linear_eval_full` is
  the in-memory form of it for small square datasets (CIFAR, MNIST), where the two are the
  same protocol.

All return {top1_best, top1_last, top5_best, top5_last, history, lr}: accuracies as
fractions in [0, 1]; "best" is the maximum over epochs (top-1 and top-5 each on its own),
"last" the value after the final epoch; history has one dict per epoch (epoch, loss, lr,
top1, top5). With fewer than 5 classes "top-5" is top-num_classes (always 1).

The training loop, the optimizer and the augmentation here are shared with
`wcl_tf.finetune`.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from wcl_tf.data import cropping

MOMENTUM = 0.9
KERNEL_STDDEV = 0.01
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def default_lr(batch_size, base=0.2):
    """Peak learning rate of the linear rule base * batch / 256 (linear eval: base 0.2)."""
    return base * batch_size / 256


def topk_accuracy(logits, labels, k):
    """Fraction of rows whose label is among the k largest logits (ties: lower index first).

    k is capped at the number of classes.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return float("nan")
    k = min(int(k), logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (N, k)
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def encoder_features(encoder, images, batch_size=256):
    """encoder(images, training=False) as float32 NumPy (N, C), in batches; not normalised."""
    images = np.asarray(images)

    @tf.function(input_signature=[tf.TensorSpec([None, *images.shape[1:]], tf.float32)])
    def call(x):
        return tf.cast(encoder(x, training=False), tf.float32)

    out = [call(tf.convert_to_tensor(images[start:start + batch_size], tf.float32)).numpy()
           for start in range(0, len(images), batch_size)]
    return np.concatenate(out, axis=0)


def build_classifier(feature_dim, num_classes, seed=0, name="linear_classifier"):
    """The Dense layer of the protocol: kernel N(0, 0.01), zero bias, built for feature_dim."""
    layer = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.RandomNormal(
            mean=0.0, stddev=KERNEL_STDDEV, seed=seed),
        bias_initializer="zeros", dtype="float32", name=name)
    layer.build((None, int(feature_dim)))
    return layer


def build_sgd(lr, total_steps, weight_decay=None):
    """SGD with Nesterov momentum 0.9 and a per-step cosine decay from lr to 0 over
    total_steps (Keras counts steps from 0, so the last step still has a small lr)."""
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=float(lr), decay_steps=max(int(total_steps), 1), alpha=0.0)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=MOMENTUM, nesterov=True,
                                weight_decay=weight_decay or None)


def current_lr(optimizer):
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def train_augment(images, image_size, seed, crop_scale=CROP_SCALE):
    """Random resized crop (torchvision semantics) to image_size + horizontal flip (p=0.5).

    images: (b, H, H, 3) float32 in [0, 1] or uint8; seed: (2,) int tensor (stateless draws).
    Returns float32 (b, image_size, image_size, 3) in [0, 1].
    """
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    images = tf.cast(images, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    crops = cropping.random_resized_crop(images, image_size, crop_scale, CROP_RATIO, seeds[0])
    flip = tf.random.stateless_uniform([tf.shape(crops)[0]], seeds[1]) < 0.5
    crops = tf.where(flip[:, None, None, None], tf.reverse(crops, axis=[2]), crops)
    crops = tf.clip_by_value(crops, 0.0, 1.0)
    crops.set_shape([None, image_size, image_size, images.shape[-1]])
    return crops


def make_augmented_dataset(images, labels, batch_size, epochs, image_size, seed,
                           crop_scale=CROP_SCALE):
    """tf.data: every epoch reshuffled, batched (last batch kept), then augmented with
    stateless seeds (seed, global batch index). Yields (images float32, labels int64)."""
    n = len(labels)
    ds = tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int64)))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    ds = ds.repeat(epochs)
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))

    def aug(batch, index):
        x, y = batch
        step_seed = tf.stack([tf.constant(seed, tf.int64), index])
        return train_augment(x, image_size, step_seed, crop_scale), y

    return ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def check_inputs(train_labels, test_labels, num_classes, epochs, batch_size):
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        labels = np.asarray(labels)
        if labels.size == 0:
            raise ValueError(f"no {name} examples.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got "
                             f"[{labels.min()}, {labels.max()}].")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")


def run_epochs(train_step, batches, steps_per_epoch, epochs, evaluate, optimizer, log=None,
               name="linear"):
    """The loop shared by linear evaluation and fine-tuning.

    train_step(x, y) -> scalar loss; batches: an iterator over epochs * steps_per_epoch
    batches; evaluate() -> (top1, top5) after every epoch. Returns the result dict.
    """
    history = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for _ in range(steps_per_epoch):
            x, y = next(batches)
            total += float(train_step(x, y))
            count += 1
        top1, top5 = evaluate()
        entry = {"epoch": epoch, "loss": total / max(count, 1), "lr": current_lr(optimizer),
                 "top1": top1, "top5": top5}
        history.append(entry)
        if log is not None:
            log(f"{name} epoch {epoch}/{epochs}: loss {entry['loss']:.4f}, "
                f"lr {entry['lr']:.4g}, test top-1 {100 * top1:.2f}%, "
                f"top-5 {100 * top5:.2f}%")
    return {
        "top1_best": max(h["top1"] for h in history),
        "top1_last": history[-1]["top1"],
        "top5_best": max(h["top5"] for h in history),
        "top5_last": history[-1]["top5"],
        "history": history,
    }


def _logits(classifier, features, batch_size=4096):
    return np.concatenate([
        classifier(tf.convert_to_tensor(features[s:s + batch_size])).numpy()
        for s in range(0, len(features), batch_size)], axis=0)


def _classifier_step(classifier, optimizer, features_fn):
    """Compiled step: logits = classifier(features_fn(x)); only the classifier trains."""
    variables = classifier.trainable_variables
    optimizer.build(variables)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        features = tf.stop_gradient(features_fn(x))
        with tf.GradientTape() as tape:
            logits = classifier(features)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def _feature_batches(features, labels, batch_size, epochs, seed):
    """Per epoch a fresh permutation (NumPy, seeded); last partial batch kept."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield tf.convert_to_tensor(features[idx]), tf.convert_to_tensor(labels[idx])


def linear_eval_features(train_feats, train_labels, test_feats, test_labels, num_classes,
                         epochs=100, batch_size=256, lr=None, seed=0, log=None):
    """Fast linear evaluation on cached features (no augmentation, no standardisation).

    Args:
      train_feats, test_feats: (N, C) features (any float dtype; used as float32).
      train_labels, test_labels: (N,) ints in [0, num_classes).
      epochs, batch_size: training length; the last partial batch of an epoch is kept.
      lr: peak learning rate; None: 0.2 * batch_size / 256.
      seed: classifier initialisation and batch order.
      log: optional callable taking one line per epoch.
    Returns:
      {top1_best, top1_last, top5_best, top5_last, history, lr} (see the module doc).
    """
    check_inputs(train_labels, test_labels, num_classes, epochs, batch_size)
    train_feats = np.asarray(train_feats, np.float32).reshape(len(train_labels), -1)
    test_feats = np.asarray(test_feats, np.float32).reshape(len(test_labels), -1)
    train_labels = np.asarray(train_labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    lr = default_lr(batch_size) if lr is None else float(lr)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)

    classifier = build_classifier(train_feats.shape[1], num_classes, seed)
    optimizer = build_sgd(lr, steps_per_epoch * epochs)
    step = _classifier_step(classifier, optimizer, lambda x: x)

    def evaluate():
        logits = _logits(classifier, test_feats)
        return topk_accuracy(logits, test_labels, 1), topk_accuracy(logits, test_labels, 5)

    batches = _feature_batches(train_feats, train_labels, batch_size, epochs, seed)
    result = run_epochs(step, batches, steps_per_epoch, epochs, evaluate, optimizer, log,
                        name="linear (fast)")
    result["lr"] = lr
    return result


def linear_eval_full(backbone, train_images, train_labels, test_images, test_labels,
                     num_classes, image_size, epochs, batch_size, lr=None, seed=0,
                     crop_scale=CROP_SCALE, feature_batch_size=256, log=None):
    """Linear evaluation with the docs/method.md section 5.3 protocol.

    Args:
      backbone: keras.Model, float32 images in [0, 1] (b, S, S, 3) -> features (b, C). It is
        called with training=False and none of its variables change.
      train_images: (N, H, H, 3) float32 in [0, 1] or uint8, square; each batch is
        augmented in tf.data (random resized crop to image_size, scale crop_scale, and a
        horizontal flip). The arrays are held by tf.data in memory.
      test_images: (M, image_size, image_size, 3) float32 in [0, 1], used as given.
      train_labels, test_labels, num_classes, epochs, batch_size, lr, seed, log: as in
        `linear_eval_features`.
    Returns:
      {top1_best, top1_last, top5_best, top5_last, history, lr}.
    """
    check_inputs(train_labels, test_labels, num_classes, epochs, batch_size)
    image_size = int(image_size)
    if tuple(np.shape(test_images)[1:3]) != (image_size, image_size):
        raise ValueError(f"test_images must be already resized to {image_size}x{image_size}, "
                         f"got shape {np.shape(test_images)}.")
    train_labels = np.asarray(train_labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    lr = default_lr(batch_size) if lr is None else float(lr)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)

    test_feats = encoder_features(backbone, test_images, feature_batch_size)
    classifier = build_classifier(test_feats.shape[1], num_classes, seed)
    optimizer = build_sgd(lr, steps_per_epoch * epochs)
    step = _classifier_step(
        classifier, optimizer,
        lambda x: tf.cast(backbone(x, training=False), tf.float32))

    def evaluate():
        logits = _logits(classifier, test_feats)
        return topk_accuracy(logits, test_labels, 1), topk_accuracy(logits, test_labels, 5)

    dataset = make_augmented_dataset(train_images, train_labels, batch_size, epochs,
                                     image_size, seed, crop_scale)
    result = run_epochs(step, iter(dataset), steps_per_epoch, epochs, evaluate, optimizer,
                        log, name="linear (full)")
    result["lr"] = lr
    return result


def linear_eval_stream(backbone, train_batches, steps_per_epoch, test_batches, num_classes,
                       epochs, batch_size, lr=None, seed=0, log=None):
    """Linear evaluation with the docs/method.md section 5.3 protocol, streamed.

    Args:
      backbone: keras.Model, float32 images in [0, 1] -> features (b, C); called with
        training=False, none of its variables change.
      train_batches: tf.data of (images float32 (b, S, S, 3), labels int64) yielding
        epochs * steps_per_epoch batches, already augmented
        (`eval_input.train_batches`).
      test_batches: tf.data of (images, labels), one pass over the test split, already
        preprocessed (`eval_input.eval_batches`); its features are computed once.
      num_classes, epochs, batch_size (for the default lr), lr, seed, log: as in
        `linear_eval_features`.
    Returns:
      {top1_best, top1_last, top5_best, top5_last, history, lr, num_test}.
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if int(epochs) < 1 or int(steps_per_epoch) < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs}, "
                         f"{steps_per_epoch}.")
    lr = default_lr(batch_size) if lr is None else float(lr)

    @tf.function(reduce_retracing=True)
    def features(x):
        return tf.cast(backbone(x, training=False), tf.float32)

    test_feats, test_labels = [], []
    for images, labels in test_batches:
        test_feats.append(features(images).numpy())
        test_labels.append(np.asarray(labels, np.int64))
    if not test_feats:
        raise ValueError("no test examples.")
    test_feats = np.concatenate(test_feats, axis=0)
    test_labels = np.concatenate(test_labels, axis=0)
    check_inputs(test_labels[:1], test_labels, num_classes, epochs, batch_size)

    classifier = build_classifier(test_feats.shape[1], num_classes, seed)
    optimizer = build_sgd(lr, int(steps_per_epoch) * int(epochs))
    step = _classifier_step(classifier, optimizer,
                            lambda x: tf.cast(backbone(x, training=False), tf.float32))

    def evaluate():
        logits = _logits(classifier, test_feats)
        return topk_accuracy(logits, test_labels, 1), topk_accuracy(logits, test_labels, 5)

    result = run_epochs(step, iter(train_batches), int(steps_per_epoch), int(epochs),
                        evaluate, optimizer, log, name="linear (full)")
    result["lr"] = lr
    result["num_test"] = int(len(test_labels))
    return result
