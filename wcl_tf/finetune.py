"""Semi-supervised evaluation: fine-tune the whole encoder on a fraction of the labels.

docs/method.md section 5.4: the backbone and a new Dense head (kernel N(0, 0.01), zero bias) are
trained together, BatchNorm in training mode, with SGD (Nesterov momentum 0.9, cosine decay
per step to 0), on random resized crops (scale 0.08-1) + horizontal flips. Test images are
used as given, through the backbone in inference mode. ImageNet uses the standard subsets
TFDS ships as `imagenet2012_subset/1pct` and `/10pct` (see tools/finetune.py); every other
dataset a class-balanced subset from `label_subset` with a fixed seed.
"""

import math

import numpy as np
import tensorflow as tf

from wcl_tf import linear_eval

# SimCLR's fine-tuning rule: lr = 0.05 * batch / 256 (Nesterov, no warm-up).
FINETUNE_LR_BASE = 0.05


def label_subset(labels, fraction, seed=0):
    """Indices of a class-balanced subset of `labels`, sorted ascending.

    Every class present in `labels` gets the same count, floor(fraction * N / num_classes)
    and at least 1, with N = len(labels) and num_classes the number of distinct labels;
    the examples of each class are drawn without replacement by NumPy's default_rng(seed),
    so a seed always gives the same subset.

    Raises:
      ValueError: fraction outside (0, 1], or a class with fewer examples than the count.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if labels.size == 0:
        raise ValueError("labels is empty.")
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, int(math.floor(fraction * labels.size / len(classes))))
    short = classes[counts < per_class]
    if short.size:
        raise ValueError(
            f"a class-balanced {fraction:g} subset needs {per_class} examples of every class; "
            f"class {short[0]} has only {counts[classes == short[0]][0]}.")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
              for c in classes]
    return np.sort(np.concatenate(chosen))


def class_counts(labels, num_classes):
    """[count of class 0, ..., count of class num_classes - 1] as Python ints."""
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes).tolist()


def finetune(backbone, images, labels, test_images, test_labels, num_classes, epochs,
             batch_size, lr=None, seed=0, weight_decay=0.0,
             crop_scale=linear_eval.CROP_SCALE, eval_batch_size=256, log=None):
    """Fine-tunes `backbone` (in place) with a new Dense head on (images, labels).

    Args:
      backbone: keras.Model, float32 images in [0, 1] (b, S, S, 3) -> features (b, C). Made
        trainable; its variables (BatchNorm moving statistics too) are updated in place.
      images: (N, H, H, 3) float32 in [0, 1] or uint8, square: the labelled subset.
      test_images: (M, S, S, 3) float32 in [0, 1], S = the training image size.
      epochs, batch_size: the last partial batch of an epoch is kept.
      lr: peak learning rate; None: 0.05 * batch_size / 256 (SimCLR's fine-tuning rule).
      seed: head initialisation, batch order and augmentation draws.
      weight_decay: Keras SGD weight decay on every variable (0: none).
      log: optional callable taking one line per epoch.
    Returns:
      {top1_best, top1_last, top5_best, top5_last, history, lr}: accuracies in [0, 1] on
      the test images after every epoch (backbone in inference mode), as in
      `wcl_tf.linear_eval`.
    """
    linear_eval.check_inputs(labels, test_labels, num_classes, epochs, batch_size)
    image_size = int(np.shape(test_images)[1])
    labels = np.asarray(labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    lr = linear_eval.default_lr(batch_size, FINETUNE_LR_BASE) if lr is None else float(lr)
    steps_per_epoch = math.ceil(len(labels) / batch_size)

    backbone.trainable = True
    feature_dim = int(backbone(tf.zeros([1, image_size, image_size, 3]), training=False)
                      .shape[-1])
    head = linear_eval.build_classifier(feature_dim, num_classes, seed, name="finetune_head")
    optimizer = linear_eval.build_sgd(lr, steps_per_epoch * epochs, weight_decay)
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer.build(variables)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            features = tf.cast(backbone(x, training=True), tf.float32)
            logits = head(features)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            scaled = optimizer.scale_loss(loss)
        optimizer.apply(tape.gradient(scaled, variables), variables)
        return loss

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3],
                                                tf.float32)])
    def predict(x):
        return head(tf.cast(backbone(x, training=False), tf.float32))

    test_images = np.asarray(test_images, np.float32)

    def evaluate():
        logits = np.concatenate([
            predict(tf.convert_to_tensor(test_images[s:s + eval_batch_size])).numpy()
            for s in range(0, len(test_images), eval_batch_size)], axis=0)
        return (linear_eval.topk_accuracy(logits, test_labels, 1),
                linear_eval.topk_accuracy(logits, test_labels, 5))

    dataset = linear_eval.make_augmented_dataset(images, labels, batch_size, epochs,
                                                 image_size, seed, crop_scale)
    result = linear_eval.run_epochs(step, iter(dataset), steps_per_epoch, epochs, evaluate,
                                    optimizer, log, name="finetune")
    result["lr"] = lr
    return result
