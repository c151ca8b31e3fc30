"""Search embeddings written by `python -m wcl_tf.tools.embed`: nearest neighbours,
near-duplicates, a label check, a 2-D map and a TensorBoard projector log.

    python -m wcl_tf.tools.neighbors --embeddings=emb/photos --query=q.jpg --k=10 \
        --sheet=neighbours.png
    python -m wcl_tf.tools.neighbors --embeddings=emb/photos --duplicates --threshold=0.95
    python -m wcl_tf.tools.neighbors --embeddings=emb/photos --evaluate --map=map.png
    python -m wcl_tf.tools.neighbors --embeddings=emb/photos --projector=logs/projector
    tensorboard --logdir logs/projector          # then the PROJECTOR tab

--query (an image or a folder) is embedded with the encoder that made the embeddings
(recorded in their manifest.json); --model_dir / --saved_model / --checkpoint may name it
again, and are refused when their weights differ from the recorded ones. Search is faiss's:
exact inner product (cosine on the normalised rows) by default; --index=hnsw or ivf builds
an approximate index and prints its recall@10 against exact search.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import flags  # noqa: E402

from wcl_tf.tools import _cli, _encoder, run_dir  # noqa: E402

FLAGS = flags.FLAGS
_encoder.define_encoder_flags()
flags.DEFINE_string("embeddings", None, "Folder written by wcl_tf.tools.embed --out.")
flags.DEFINE_string("query", None, "An image, or a folder of images: print (and draw with "
                    "--sheet) the --k nearest embedded images of each.")
flags.DEFINE_integer("k", 10, "Neighbours per query (and for --evaluate).", lower_bound=1)
flags.DEFINE_string("sheet", None, "PNG contact sheet of the queries and their neighbours "
                    "(with --duplicates: of the largest groups; NAME-duplicates.png when "
                    "--query too).")
flags.DEFINE_integer("max_rows", 12, "Queries or groups drawn on a sheet.", lower_bound=1)
flags.DEFINE_bool("duplicates", False, "Print groups of near-duplicates: pairs with "
                  "similarity >= --threshold, joined into connected components.")
flags.DEFINE_float("threshold", 0.95, "Similarity of a near-duplicate pair.")
flags.DEFINE_bool("evaluate", False, "kNN accuracy and mean precision at --k of each "
                  "embedded image's neighbours against its class folder (leave-one-out).")
flags.DEFINE_string("map", None, "PNG: a 2-D t-SNE map of the embeddings coloured by class.")
flags.DEFINE_integer("map_sample", 2000, "Images on the map (a seeded sample).",
                     lower_bound=10)
flags.DEFINE_string("projector", None, "Write a TensorBoard Embedding Projector log to this "
                    "folder (embeddings, metadata.tsv, sprite.png).")
flags.DEFINE_integer("projector_sample", 10000, "Images in the projector log (a seeded "
                     "sample beyond that).", lower_bound=1)
flags.DEFINE_enum("index", "exact", ["exact", "hnsw", "ivf"], "faiss index: exact inner "
                  "product, or an approximate one for collections too large for exact search.")
flags.DEFINE_integer("nprobe", 16, "IVF lists searched per query (--index=ivf).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Query images per batch.", lower_bound=1)
flags.DEFINE_string("output", None, "Write the results as JSON here.")


def _image_file(manifest, row):
    root = manifest["source"].get("images")
    return os.path.join(root, row["path"]) if root else None


def _query_encoder(manifest):
    """The recorded encoder; a --model_dir/--saved_model given must hold the same weights."""
    from wcl_tf import embed_errors, embedding  # pylint: disable=import-outside-toplevel

    recorded = manifest["encoder"]
    if _encoder.encoder_given():
        given = _encoder.load_from_flags()
        embedding.check_same_encoder(manifest, given, FLAGS.embeddings)
        return given
    try:
        return _encoder.load_recorded(recorded)
    except embed_errors.EmbedError as err:
        raise run_dir.UserError(f"cannot load the encoder recorded in {FLAGS.embeddings!r} "
                                f"({err}); pass --model_dir or --saved_model.") from None


def _search(index, files, manifest, results):
    from wcl_tf import (  # pylint: disable=import-outside-toplevel
        embed_sources, embedding, embedding_views)

    encoder = _query_encoder(manifest)
    queries = embed_sources.ImageFolder(FLAGS.query)
    q, q_files, bad = embedding.embed_array(
        encoder, queries, batch_size=FLAGS.batch_size, normalize=manifest["normalize"])
    if bad:
        raise run_dir.UserError(f"query file(s) are not readable images: {', '.join(bad[:5])}")
    sims, ids = index.search(q, FLAGS.k)
    results["queries"] = []
    sheet_rows = []
    for row, (s, i) in enumerate(zip(sims, ids)):
        name = q_files[row]["path"]
        run_dir.log(f"\nquery {name}:\n rank  similarity  path")
        found = []
        for rank, (sim, j) in enumerate(zip(s, i), start=1):
            if j < 0:
                continue
            run_dir.log(f" {rank:4d}  {sim:10.4f}  {files[j]['path']}")
            found.append({"rank": rank, "similarity": float(sim), "path": files[j]["path"]})
        results["queries"].append({"query": name, "neighbours": found})
        if FLAGS.sheet and len(sheet_rows) < FLAGS.max_rows:
            cells = [(queries.paths[row], embedding_views.caption(None, name))]
            cells += [(_image_file(manifest, files[j]),
                       embedding_views.caption(float(sim), files[j]["path"]))
                      for sim, j in zip(s, i) if j >= 0]
            sheet_rows.append(cells)
    if FLAGS.sheet:
        embedding_views.contact_sheet(sheet_rows, FLAGS.sheet,
                                      title=f"{FLAGS.k} nearest of each query")
        run_dir.log(f"sheet -> {FLAGS.sheet}")


def _duplicates(index, files, manifest, results):
    from wcl_tf import embedding_views  # pylint: disable=import-outside-toplevel

    groups = index.duplicates(FLAGS.threshold)
    run_dir.log(f"\n{len(groups)} group(s) of near-duplicates (similarity >= "
                f"{FLAGS.threshold}), {sum(len(g) for g in groups)} images:")
    results["duplicate_groups"] = [[files[i]["path"] for i in g] for g in groups]
    for number, group in enumerate(groups[:50], start=1):
        run_dir.log(f" group {number} ({len(group)} images): "
                    + ", ".join(files[i]["path"] for i in group[:8])
                    + (" ..." if len(group) > 8 else ""))
    if FLAGS.sheet and groups:
        rows = []
        for group in groups[:FLAGS.max_rows]:
            first = group[0]
            sims = index.rows[group] @ index.rows[first]
            rows.append([(_image_file(manifest, files[first]),
                          embedding_views.caption(None, files[first]["path"]))]
                        + [(_image_file(manifest, files[j]),
                            embedding_views.caption(float(s), files[j]["path"]))
                           for j, s in zip(group[1:FLAGS.k + 1], sims[1:FLAGS.k + 1])])
        path = FLAGS.sheet
        if FLAGS.query:  # the queries' sheet has that name
            path = os.path.splitext(path)[0] + "-duplicates.png"
        embedding_views.contact_sheet(rows, path,
                                      title=f"near-duplicate groups (>= {FLAGS.threshold})")
        run_dir.log(f"sheet -> {path}")


def _evaluate(index, files, results):
    classes = [f["class"] for f in files]
    if not any(classes):
        raise run_dir.UserError(f"--evaluate needs class subfolders: the images of "
                                f"{FLAGS.embeddings!r} have no class.")
    result = index.evaluate(classes, k=FLAGS.k)
    results["evaluate"] = result
    run_dir.log(f"\nkNN accuracy (k={result['k']}, leave-one-out, {result['num_queries']} "
                f"images, {result['num_classes']} classes): {100 * result['knn_accuracy']:.2f}%"
                f"; mean precision@{result['k']}: {100 * result['precision_at_k']:.2f}%")


def neighbors_main():
    if not FLAGS.embeddings:
        raise run_dir.UserError("pass --embeddings=FOLDER (written by wcl_tf.tools.embed).")
    if not (FLAGS.query or FLAGS.duplicates or FLAGS.evaluate or FLAGS.map
            or FLAGS.projector):
        raise run_dir.UserError("nothing to do: pass --query=IMAGE_OR_FOLDER, --duplicates, "
                                "--evaluate, --map=FILE.png or --projector=LOGDIR.")
    from wcl_tf import embedding, embedding_views  # pylint: disable=import-outside-toplevel
    from wcl_tf.neighbors import Neighbors  # pylint: disable=import-outside-toplevel

    embeddings, files, manifest = embedding.read_embeddings(FLAGS.embeddings)
    if not manifest.get("complete"):
        run_dir.log(f"note: {FLAGS.embeddings!r} is incomplete (embedding was interrupted); "
                    f"searching its {len(files)} embedded images")
    index = Neighbors(embeddings, index=FLAGS.index, nprobe=FLAGS.nprobe)
    results = {"embeddings": FLAGS.embeddings, "num_embeddings": len(files),
               "index": FLAGS.index}
    run_dir.log(f"{len(files)} embeddings ({embeddings.shape[1]} {embeddings.dtype}), "
                f"faiss {FLAGS.index} index")
    if FLAGS.index != "exact":
        recall = index.recall_at(10)
        results["recall_at_10"] = recall
        run_dir.log(f"recall@10 of the {FLAGS.index} index against exact search: "
                    f"{recall:.4f}")
    if FLAGS.query:
        _search(index, files, manifest, results)
    if FLAGS.duplicates:
        _duplicates(index, files, manifest, results)
    if FLAGS.evaluate:
        _evaluate(index, files, results)
    if FLAGS.map:
        drawn = embedding_views.embedding_map(
            embeddings, [f["class"] for f in files], FLAGS.map, sample=FLAGS.map_sample)
        run_dir.log(f"map of {drawn} embeddings -> {FLAGS.map}")
    if FLAGS.projector:
        _projector(embeddings, files, manifest)
    if FLAGS.output:
        run_dir.write_json(FLAGS.output, results)
    return 0


def _projector(embeddings, files, manifest):
    import numpy as np  # pylint: disable=import-outside-toplevel

    from wcl_tf import embedding_views  # pylint: disable=import-outside-toplevel

    picks = np.arange(len(files))
    if len(files) > FLAGS.projector_sample:
        picks = np.sort(np.random.default_rng(0).choice(len(files), FLAGS.projector_sample,
                                                        replace=False))
    chosen = [files[i] for i in picks]
    images = None
    if manifest["source"].get("images"):
        images = [_image_file(manifest, f) for f in chosen]
    embedding_views.write_projector(FLAGS.projector, embeddings[picks],
                                    [f["path"] for f in chosen], [f["class"] for f in chosen],
                                    images)
    run_dir.log(f"projector log of {len(picks)} embeddings -> {FLAGS.projector} "
                f"(tensorboard --logdir {FLAGS.projector}, PROJECTOR tab)")


def main():
    """Entry point of the module, of tools/neighbors.py and of the console script."""
    _cli.run(run_dir.main_wrapper(neighbors_main), __name__)


if __name__ == "__main__":
    main()
