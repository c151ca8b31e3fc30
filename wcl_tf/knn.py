"""Weighted kNN evaluation of an encoder (InstDisc / solo-learn protocol).

Features are L2-normalised backbone outputs computed in inference mode. A query's
k nearest memory features (cosine) vote for their class with weight exp(sim / T).
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


def knn_predict(memory, memory_labels, queries, num_classes, k=200, temperature=0.1,
                chunk=1024):
    """Predicted class per query row (N_q,), from L2-normalised features."""
    memory = tf.convert_to_tensor(memory, tf.float32)
    labels = tf.convert_to_tensor(np.asarray(memory_labels, np.int64))
    k = min(int(k), int(memory.shape[0]))
    preds = []
    for start in range(0, len(queries), chunk):
        q = tf.convert_to_tensor(queries[start:start + chunk], tf.float32)
        sim = tf.matmul(q, memory, transpose_b=True)  # (q, M)
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
