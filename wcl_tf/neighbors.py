"""Nearest neighbours, near-duplicates and a label check of a matrix of embeddings (faiss).

`Neighbors(embeddings)` indexes L2-normalised rows for inner-product (cosine) search with
faiss: exact search (`IndexFlatIP`) by default, or an approximate index for collections
too large for it, `index="hnsw"` (IndexHNSWFlat, no training) or `index="ivf"`
(IndexIVFFlat, k-means on the rows; `nprobe` lists searched per query). `recall_at(k)`
measures an approximate index against exact search on a sample of the rows.

    search(queries, k)          -> similarities (q, k), row ids (q, k) (-1 past the end)
    duplicates(threshold)       -> groups of row ids whose pairs above `threshold` connect
                                   (connected components, largest first)
    evaluate(labels, k)         -> leave-one-out kNN accuracy and mean precision at k

faiss computes in float32: float16 rows are converted once, when indexed.
"""

import numpy as np

INDEXES = ("exact", "hnsw", "ivf")
KNN_TEMPERATURE = 0.1  # the vote weight exp(sim / T) of wcl_tf.knn, the training monitor's


def _faiss():
    import faiss  # pylint: disable=import-outside-toplevel

    return faiss


def _float32(rows):
    return np.ascontiguousarray(np.asarray(rows, dtype=np.float32))


class Neighbors:
    """A faiss index over `embeddings` (N, C) (module doc).

    index: "exact", "hnsw" or "ivf"; hnsw_m: HNSW links per node; nlist / nprobe: IVF
    lists (default about 4 * sqrt(N)) and lists searched per query; files: optional
    per-row records (e.g. from wcl_tf.embedding.read_embeddings), kept for the caller."""

    def __init__(self, embeddings, index="exact", files=None, hnsw_m=32, nlist=None,
                 nprobe=16, seed=0):
        if index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, got {index!r}.")
        faiss = _faiss()
        rows = _float32(embeddings)
        if rows.ndim != 2 or not len(rows):
            raise ValueError(f"embeddings must be a non-empty (N, C) matrix, got shape "
                             f"{rows.shape}.")
        self.rows, self.files, self.kind = rows, files, index
        dim = rows.shape[1]
        if index == "exact":
            self.index = faiss.IndexFlatIP(dim)
        elif index == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = int(nlist or max(1, min(len(rows) // 39, round(4 * len(rows) ** 0.5))))
            self.quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist,
                                            faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = int(seed)
            self.index.train(rows)
            self.index.nprobe = min(int(nprobe), nlist)
        self.index.add(rows)
        self._exact = self.index if index == "exact" else None

    def __len__(self):
        return self.index.ntotal

    def search(self, queries, k=10):
        """(similarities float32 (q, k), ids int64 (q, k)) of the k nearest rows of each
        query row, most similar first."""
        k = min(int(k), len(self))
        return self.index.search(_float32(queries), k)

    def exact(self):
        """An exact index over the same rows (itself when exact)."""
        if self._exact is None:
            self._exact = _faiss().IndexFlatIP(self.rows.shape[1])
            self._exact.add(self.rows)
        return self._exact

    def recall_at(self, k=10, sample=1000, seed=0):
        """Mean fraction of the exact k nearest rows that this index also returns, over
        `sample` rows of the collection used as queries (1.0 for the exact index)."""
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(self), size=min(int(sample), len(self)), replace=False)
        queries = self.rows[np.sort(picks)]
        k = min(int(k), len(self))
        _, found = self.index.search(queries, k)
        _, truth = self.exact().search(queries, k)
        hits = [len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(found, truth)]
        return float(np.mean(hits) / k)

    def duplicates(self, threshold):
        """Groups (lists of row ids, most connected first within a group) of rows joined
        by pairs with similarity >= threshold, as connected components; largest group
        first (ties: smallest first id). Exact: a range search of the flat index."""
        # pylint: disable=import-outside-toplevel
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self)
        lims, _, ids = self.exact().range_search(self.rows, float(threshold))
        sources = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
        keep = sources != ids
        graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (sources[keep], ids[keep])),
                           shape=(n, n))
        count, component = connected_components(graph, directed=False)
        sizes = np.bincount(component, minlength=count)
        groups = [np.flatnonzero(component == c) for c in np.flatnonzero(sizes > 1)]
        groups.sort(key=lambda g: (-len(g), int(g[0])))
        return [g.tolist() for g in groups]

    def pairs(self, group, threshold):
        """(i, j, similarity) of the pairs of `group` with similarity >= threshold."""
        rows = self.rows[group]
        sims = rows @ rows.T
        return [(group[a], group[b], float(sims[a, b])) for a in range(len(group))
                for b in range(a + 1, len(group)) if sims[a, b] >= threshold]

    def evaluate(self, labels, k=10, temperature=KNN_TEMPERATURE):
        """Leave-one-out check of the neighbours against class labels (one per row; rows
        with label -1 or "" are not queried and never vote).

        Returns {"knn_accuracy": each labelled row classified by its k nearest other
        labelled rows voting with weight exp(sim / T) (the rule of wcl_tf.knn), "precision_at_k":
        the mean fraction of those k rows of the row's class, "k", "num_queries",
        "num_classes"}. The search is this index's (exact unless approximate)."""
        labels = np.asarray(labels)
        known = np.array([not (x == -1 or x == "") for x in labels.tolist()])
        if known.sum() < 2:
            raise ValueError("evaluate needs class labels (class subfolders) on at least two "
                             "rows.")
        names, codes = np.unique(labels[known], return_inverse=True)
        code = np.full(len(labels), -1)
        code[known] = codes
        sub = Neighbors(self.rows[known]) if not known.all() else self
        kk = min(int(k), int(known.sum()) - 1)
        sims, ids = sub.search(sub.rows, kk + 1)
        own = np.flatnonzero(known) if not known.all() else np.arange(len(labels))
        query_codes = code[own]
        votes_correct, precisions = 0, []
        member_codes = code[own]
        for row, (s, i) in enumerate(zip(sims, ids)):
            mask = (i != row) & (i >= 0)
            s, i = s[mask][:kk], i[mask][:kk]
            neighbour_codes = member_codes[i]
            weights = np.exp(s / temperature)
            scores = np.bincount(neighbour_codes, weights=weights, minlength=len(names))
            votes_correct += int(np.argmax(scores) == query_codes[row])
            precisions.append(float(np.mean(neighbour_codes == query_codes[row])))
        return {"knn_accuracy": votes_correct / len(own),
                "precision_at_k": float(np.mean(precisions)), "k": kk,
                "num_queries": int(len(own)), "num_classes": int(len(names)),
                "temperature": float(temperature)}
