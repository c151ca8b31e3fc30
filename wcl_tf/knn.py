"""Weighted kNN evaluation of an encoder (InstDisc / solo-learn protocol).

Features are L2-normalised backbone outputs computed in inference mode. A query's
k nearest memory features (cosine) vote for their class with weight exp(sim / T).

Two entry points: `evaluate_encoder` on image arrays (small splits, the training-time
monitor), and `evaluate_encoder_stream` on tf.data batches (wcl_tf.data.eval_input): the
memory bank is built batch by batch (only the features are kept, float16 on request) and the
queries are classified batch by batch, so memory is N * C features, not N images.
"""

import numpy as np
import tensorflow as tf


def extract_features(encoder, images, batch_size=256):
    """L2-normalised encoder(images, training=False) as a float32 NumPy array (N, C)."""
    @tf.function(input_signature=[tf.TensorSpec([None, *images.shape[1:]], tf.float32)])
    def call(x):
        return tf.math.l2_normalize(encoder(x, training=False), axis=1)

    out = []
    for start in range(0, len(images), batch_size):
        out.append(call(tf.convert_to_tensor(images[start:start + batch_size])).numpy())
    return np.concatenate(out, axis=0)


def extract_features_from_dataset(encoder, batches, dtype=np.float32):
    """(features (N, C) of `dtype`, labels int64 (N,)) of a tf.data of (images, labels)
    batches: L2-normalised encoder(images, training=False), computed in float32 and stored
    as `dtype` (np.float16 halves the bank). Only the features are kept."""
    @tf.function(reduce_retracing=True)
    def call(x):
        return tf.math.l2_normalize(
            tf.cast(encoder(x, training=False), tf.float32), axis=1)

    feats, labels = [], []
    for images, label_batch in batches:
        feats.append(call(images).numpy().astype(dtype, copy=False))
        labels.append(np.asarray(label_batch, np.int64))
    if not feats:
        return np.zeros((0, 0), dtype), np.zeros((0,), np.int64)
    return np.concatenate(feats, axis=0), np.concatenate(labels, axis=0)


def knn_predict(memory, memory_labels, queries, num_classes, k=200, temperature=0.1,
                chunk=1024):
    """Predicted class per query row (N_q,), from L2-normalised features (the similarities
    are accumulated in the bank's dtype, float16 or float32, then used as float32).

    memory may be a tf.Tensor already (converted once by the caller)."""
    if not tf.is_tensor(memory):
        memory = np.asarray(memory)
        memory = tf.convert_to_tensor(
            memory, tf.float16 if memory.dtype == np.float16 else tf.float32)
    labels = tf.convert_to_tensor(np.asarray(memory_labels, np.int64))
    k = min(int(k), int(memory.shape[0]))
    preds = []
    for start in range(0, len(queries), chunk):
        q = tf.convert_to_tensor(queries[start:start + chunk], memory.dtype)
        sim = tf.cast(tf.matmul(q, memory, transpose_b=True), tf.float32)  # (q, M)
        top_sim, top_idx = tf.math.top_k(sim, k=k)  # (q, k)
        votes = tf.one_hot(tf.gather(labels, top_idx), num_classes)  # (q, k, C)
        scores = tf.reduce_sum(votes * tf.exp(top_sim / temperature)[..., None], axis=1)
        preds.append(tf.argmax(scores, axis=1).numpy())
    return np.concatenate(preds)


def knn_top1(memory, memory_labels, queries, query_labels, num_classes, k=200,
             temperature=0.1):
    """Top-1 accuracy (0..1) of the weighted kNN classifier."""
    pred = knn_predict(memory, memory_labels, queries, num_classes, k, temperature)
    return float(np.mean(pred == np.asarray(query_labels)))


def evaluate_encoder(encoder, train_images, train_labels, test_images, test_labels,
                     num_classes, k=200, temperature=0.1, batch_size=256):
    """kNN top-1 of `encoder` with the train split as memory and the test split as queries."""
    memory = extract_features(encoder, train_images, batch_size)
    queries = extract_features(encoder, test_images, batch_size)
    return knn_top1(memory, train_labels, queries, test_labels, num_classes, k, temperature)


def evaluate_encoder_stream(encoder, memory_batches, query_batches, num_classes, k=200,
                            temperature=0.1, feature_dtype=np.float32):
    """kNN top-1 of `encoder` from tf.data batches of (images, labels): the memory bank is
    built batch by batch (features only, `feature_dtype`), then the queries are embedded
    and classified batch by batch. Returns (top1, num_memory, num_queries)."""
    memory, memory_labels = extract_features_from_dataset(encoder, memory_batches,
                                                          feature_dtype)
    if len(memory_labels) == 0:
        raise ValueError("the kNN memory split has no examples.")
    memory = tf.convert_to_tensor(memory)  # once, in its dtype

    @tf.function(reduce_retracing=True)
    def call(x):
        return tf.math.l2_normalize(
            tf.cast(encoder(x, training=False), tf.float32), axis=1)

    correct = total = 0
    for images, labels in query_batches:
        pred = knn_predict(memory, memory_labels, call(images).numpy(), num_classes, k,
                           temperature)
        correct += int(np.sum(pred == np.asarray(labels)))
        total += len(pred)
    if total == 0:
        raise ValueError("the kNN query split has no examples.")
    return correct / total, len(memory_labels), total
