import numpy as np

import reference
from wcl_tf import knn


def _numpy_knn(memory, labels, queries, num_classes, k, t):
    sim = queries @ memory.T
    preds = []
    for row in sim:
        idx = np.argsort(-row, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in idx:
            scores[labels[j]] += np.exp(row[j] / t)
        preds.append(np.argmax(scores))
    return np.array(preds)


def test_matches_numpy_reference(rng):
    memory = reference.l2n(rng.normal(size=(300, 16))).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    queries = reference.l2n(rng.normal(size=(50, 16))).astype(np.float32)
    for k, t in [(1, 0.1), (10, 0.5), (200, 0.1)]:
        got = knn.knn_predict(memory, labels, queries, 5, k=k, temperature=t, chunk=16)
        np.testing.assert_array_equal(got, _numpy_knn(memory, labels, queries, 5, k, t))


def test_separable_features_give_100_percent(rng):
    centres = np.eye(4, 8)
    labels = rng.integers(0, 4, 200)
    feats = reference.l2n(centres[labels] + 0.05 * rng.normal(size=(200, 8))).astype(np.float32)
    acc = knn.knn_top1(feats[:150], labels[:150], feats[150:], labels[150:], 4, k=20)
    assert acc == 1.0
    # Memory labels shifted by one class: every vote goes to the wrong class.
    acc = knn.knn_top1(feats[:150], (labels[:150] + 1) % 4, feats[150:], labels[150:], 4, k=20)
    assert acc == 0.0


def test_extract_features_normalises_in_batches(rng):
    x = rng.normal(size=(10, 3)).astype(np.float32)
    feats = knn.extract_features(lambda images, training: images * 2.0, x, batch_size=3)
    np.testing.assert_allclose(feats, reference.l2n(x), rtol=1e-6)
