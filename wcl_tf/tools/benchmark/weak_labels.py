"""The weak-label step (1-NN graph and its connected components) in the graph against its
parts and the host paths."""

from wcl_tf.tools.benchmark import timing


def bench_weak_labels(sizes, dim, repeats):
    """(rows, markdown table): weak_labels in the graph against its parts and the host
    paths, timed in turns in one process, for n in sizes embeddings of `dim` values: the
    similarity matmul alone (the former floor), the whole-matrix symmetrisation, the previous
    in-graph path (the bound on the whole matmul, now the path for unknown row counts), the
    in-graph path, and the authors' host path."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import tensorflow as tf
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from wcl_tf import weak_labels

    def similarity(v):
        return tf.matmul(v, v, transpose_b=True)

    def bounded(v):
        return weak_labels.components_of_functional_graph(weak_labels.nearest_neighbours_bounded(v))

    def symmetrised(v):
        return weak_labels.components_of_functional_graph(
            weak_labels.nearest_neighbours_symmetrised(similarity(v)))

    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        v = tf.math.l2_normalize(tf.constant(rng.normal(size=(n, dim)), tf.float32), 1)
        in_graph = tf.function(weak_labels.weak_labels)  # XLA-compiled inside
        # XLA too, so that the other paths get the fastest kernels there are.
        matmul_only = tf.function(similarity, jit_compile=True)
        symmetrised_path = tf.function(symmetrised, jit_compile=True)
        before = tf.function(bounded, jit_compile=True)
        nn_only = tf.function(weak_labels.nearest_neighbours, jit_compile=True)

        def host_components():
            nn = nn_only(v).numpy()  # 1-NN on the device, then copy and scipy
            graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
            connected_components(graph, directed=False)

        def host_all():
            x = v.numpy()  # device-to-host copy of the embeddings
            sim = x @ x.T
            np.fill_diagonal(sim, -np.inf)
            nn = sim.argmax(1)
            graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
            connected_components(graph, directed=False)

        turns = timing.timed_in_turns(
            {"matmul": lambda: matmul_only(v).numpy(),
             "symmetrised": lambda: symmetrised_path(v).numpy(),
             "before": lambda: before(v).numpy(),
             "in_graph": lambda: in_graph(v).numpy(),
             "host_components": host_components, "host_all": host_all},
            1, max(3, repeats if n <= 4096 else 3))
        t = {name: timed.median for name, timed in turns.items()}
        rows.append({"n": n, "matmul_ms": round(1e3 * t["matmul"], 2),
                     "tf_weak_labels_ms": round(1e3 * t["in_graph"], 2),
                     "tf_weak_labels_over_matmul": round(t["in_graph"] / t["matmul"], 2),
                     "before_bound_path_ms": round(1e3 * t["before"], 2),
                     "before_bound_path_over_matmul": round(t["before"] / t["matmul"], 2),
                     "in_graph_cpu_ms": round(1e3 * turns["in_graph"].cpu_median, 2),
                     "before_bound_path_cpu_ms": round(1e3 * turns["before"].cpu_median, 2),
                     "whole_matrix_symmetrised_ms": round(1e3 * t["symmetrised"], 2),
                     "whole_matrix_symmetrised_over_matmul":
                         round(t["symmetrised"] / t["matmul"], 2),
                     "tf_1nn_then_scipy_ms": round(1e3 * t["host_components"], 2),
                     "numpy_scipy_host_ms": round(1e3 * t["host_all"], 2)})
        print(f"  {rows[-1]}", flush=True)
    header = ("| n | similarity matmul alone (ms) | wcl_tf weak_labels, in graph (ms) | before: "
              "bound on the whole matmul (ms) | the same with the whole matrix symmetrised (ms) "
              "| TF 1-NN + copy + scipy components (ms) | copy + NumPy 1-NN + scipy (ms) |"
              "\n|---|---|---|---|---|---|---|")
    lines = [f"| {r['n']} | {r['matmul_ms']:.2f} | {r['tf_weak_labels_ms']:.2f} "
             f"({r['tf_weak_labels_over_matmul']:.2f}x; CPU {r['in_graph_cpu_ms']:.2f}) | "
             f"{r['before_bound_path_ms']:.2f} ({r['before_bound_path_over_matmul']:.2f}x; "
             f"CPU {r['before_bound_path_cpu_ms']:.2f}) | "
             f"{r['whole_matrix_symmetrised_ms']:.2f} "
             f"({r['whole_matrix_symmetrised_over_matmul']:.2f}x) | "
             f"{r['tf_1nn_then_scipy_ms']:.2f} | {r['numpy_scipy_host_ms']:.2f} |" for r in rows]
    return rows, "\n".join([header] + lines)
