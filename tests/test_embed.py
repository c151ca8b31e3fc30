"""Embedding a folder (wcl_tf.encoder, embed_sources, embedding, tools/embed) and searching
it (wcl_tf.neighbors, tools/neighbors): against the SavedModel's serving signature, NumPy
brute force, an uninterrupted run, and the one-line errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import wcl_tf
from wcl_tf import embedding, export, run_folder
from wcl_tf.embed_errors import EmbedError
from wcl_tf.embed_sources import ImageFolder, TfdsSplit
from wcl_tf.encoder import Encoder, load_encoder
from wcl_tf.neighbors import Neighbors

# The tiny model with non-trivial BN statistics (a wrong BN mode shows), at S = 16 px.
from test_export import S, _tiny_model  # noqa: E402  pylint: disable=wrong-import-order
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
       "PYTHONPATH": REPO}


def _run_dir(path, seed):
    os.makedirs(path)
    run_folder.save_model(_tiny_model(seed), os.path.join(path, "final.keras"))
    run_folder.write_json(os.path.join(path, "config.json"),
                          {"image_size": S, "backbone": "small_cnn", "width": 4})
    return str(path)


def _images(root, per_class=6, classes=("cats", "dogs"), bad=True):
    """Small PNG/JPEG files of several sizes (square, landscape, portrait, smaller and
    larger than S) in class folders, and one file that is not an image."""
    rng = np.random.default_rng(1)
    shapes = [(12, 12), (16, 16), (20, 31), (33, 18), (24, 24), (40, 26)]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            h, w = shapes[i % len(shapes)]
            base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * (c + 1) / 2
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(os.path.join(root, name, f"{name}_{i}.{ext}"))
    if bad:
        with open(os.path.join(root, classes[0], "broken.jpg"), "w") as f:
            f.write("not a jpeg")
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("embed")
    return {"run": _run_dir(base / "run", 3), "other": _run_dir(base / "other", 4),
            "images": _images(base / "images"), "base": base}


def _tool(name, *args):
    return subprocess.run([sys.executable, "-m", f"wcl_tf.tools.{name}", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


def _serving(export_dir, files):
    """serving_default of the export on each decoded file, one image at a time, L2-normalised."""
    loaded = tf.saved_model.load(export_dir)
    out = []
    for path in files:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        out.append(loaded.signatures["serving_default"](images=image[None])["features"][0])
    return tf.math.l2_normalize(tf.stack(out), axis=1).numpy()


@pytest.mark.parametrize("preprocessing", [
    pytest.param("squash", marks=pytest.mark.slow), "resize_center_crop"])
def test_embeddings_equal_the_saved_models_serving_outputs(setup, tmp_path, preprocessing):
    export_dir = str(tmp_path / "export")
    export.export_encoder(export.load_checkpoint(os.path.join(setup["run"], "final.keras")),
                          export_dir, S, preprocessing=preprocessing)
    from_run = load_encoder(model_dir=setup["run"], preprocessing=preprocessing)
    from_export = load_encoder(saved_model=export_dir)
    assert from_run.fingerprint == from_export.fingerprint  # same weights, same record
    source = ImageFolder(setup["images"])
    paths = [p for p in source.paths if "broken" not in p]
    expected = _serving(export_dir, paths)
    for encoder in (from_run, from_export):
        out = str(tmp_path / f"out_{len(os.listdir(tmp_path))}")
        embedding.embed_to_folder(encoder, source, out, batch_size=5, dtype="float32",
                                  shard_size=4)
        got, files, manifest = embedding.read_embeddings(out)
        assert [os.path.join(setup["images"], f["path"]) for f in files] == paths
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert manifest["encoder"]["fingerprint"] == from_run.fingerprint
        assert manifest["num_bad"] == 1 and manifest["shards"][0]["bad"] == ["cats/broken.jpg"]
    first = files[0]
    assert first["class"] == "cats" and (int(first["height"]), int(first["width"])) == (12, 12)


def test_head_features_and_float16(setup, tmp_path):
    model = export.load_checkpoint(os.path.join(setup["run"], "final.keras"))
    encoder = load_encoder(model_dir=setup["run"], features="graph_head")
    source = ImageFolder(setup["images"])
    got, files, _ = embedding.embed_array(encoder, source, dtype="float16")
    x = np.stack([Encoder.preprocess(encoder, folder_image).numpy()
                  for folder_image in _decoded(setup["images"], files)])
    expected = tf.math.l2_normalize(model.graph_head(model.backbone(x, training=False),
                                                     training=False), axis=1).numpy()
    assert got.dtype == np.float16 and got.shape == (12, 8)
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-3)


def _decoded(root, files):
    for f in files:
        yield tf.io.decode_image(tf.io.read_file(os.path.join(root, f["path"])), channels=3,
                                 expand_animations=False)


def test_a_kill_between_shards_and_a_rerun_give_the_same_files(setup, tmp_path):
    encoder = load_encoder(model_dir=setup["run"])
    source = ImageFolder(setup["images"])
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    embedding.embed_to_folder(encoder, source, whole, batch_size=2, shard_size=3)

    class Killed(Exception):
        pass

    def kill_after_two_shards(done, total, seconds, shard):
        del done, total, seconds
        if shard is not None and shard["embeddings"].endswith("00001.npy"):
            raise Killed
    with pytest.raises(Killed):
        embedding.embed_to_folder(encoder, source, resumed, batch_size=2, shard_size=3,
                                  progress=kill_after_two_shards)
    assert not embedding.read_manifest(resumed)["complete"]
    # A kill while the next shard was being written leaves a partial file behind.
    with open(os.path.join(resumed, "embeddings-00002.npy.tmp"), "wb") as f:
        f.write(b"partial")
    with open(os.path.join(resumed, "embeddings-00002.npy"), "wb") as f:
        f.write(b"\x93NUMPY garbage")
    seen = []
    embedding.embed_to_folder(encoder, source, resumed, batch_size=2, shard_size=3,
                              progress=lambda done, *_: seen.append(done))
    assert min(seen) > 6  # resumed after the two complete shards (6 listing entries)
    names = sorted(n for n in os.listdir(whole))
    assert sorted(n for n in os.listdir(resumed) if not n.endswith(".tmp")) == names
    for name in names:
        with open(os.path.join(whole, name), "rb") as a, \
                open(os.path.join(resumed, name), "rb") as b:
            assert a.read() == b.read(), name


def test_exact_search_equals_numpy_brute_force(rng):
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(17, 24)).astype(np.float32)
    sims, ids = Neighbors(x.astype(np.float16)).search(q, k=10)
    x16 = x.astype(np.float16).astype(np.float32)
    brute = q @ x16.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, expected, 1), rtol=1e-5,
                               atol=1e-5)


def _components(sims, threshold):
    """Groups of rows joined by pairs >= threshold, by breadth-first search in NumPy."""
    n, seen, groups = len(sims), set(), []
    for start in range(n):
        if start in seen:
            continue
        group, frontier = {start}, [start]
        while frontier:
            row = frontier.pop()
            for j in np.flatnonzero(sims[row] >= threshold):
                if j not in group:
                    group.add(int(j))
                    frontier.append(int(j))
        seen |= group
        if len(group) > 1:
            groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_duplicate_groups_equal_brute_force_components(rng):
    base = rng.normal(size=(40, 16)).astype(np.float32)
    # Copies with small noise: chains and clusters of near-duplicates of a few rows.
    rows = np.concatenate([base, base[:6] + rng.normal(0, 0.05, (6, 16)),
                           base[:2] + rng.normal(0, 0.05, (2, 16)),
                           base[7:8] + rng.normal(0, 0.05, (1, 16))]).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    groups = Neighbors(rows).duplicates(0.97)
    assert groups == _components(rows @ rows.T, 0.97)
    assert len(groups) == 7 and len(groups[0]) == 3


def test_evaluate_equals_a_numpy_leave_one_out_vote(rng):
    labels = np.repeat(["a", "b", "c"], 30)
    centres = rng.normal(size=(3, 12))
    rows = (centres[np.repeat(np.arange(3), 30)] + rng.normal(0, 1.2, (90, 12)))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    result = Neighbors(rows).evaluate(labels, k=5)
    sims = rows @ rows.T
    np.fill_diagonal(sims, -np.inf)
    correct, precision = 0, []
    for i in range(90):
        nearest = np.argsort(-sims[i], kind="stable")[:5]
        weights = {}
        for j in nearest:
            weights[labels[j]] = weights.get(labels[j], 0.0) + np.exp(sims[i, j] / 0.1)
        correct += max(weights, key=weights.get) == labels[i]
        precision.append(np.mean(labels[nearest] == labels[i]))
    assert result["knn_accuracy"] == pytest.approx(correct / 90)
    assert result["precision_at_k"] == pytest.approx(np.mean(precision))
    assert 0.3 < result["knn_accuracy"] < 1.0  # neither trivial nor hopeless


def test_approximate_index_recall_is_measured(rng):
    rows = rng.normal(size=(2000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert Neighbors(rows).recall_at(10, sample=50) == 1.0
    hnsw = Neighbors(rows, index="hnsw").recall_at(10, sample=200)
    ivf_one = Neighbors(rows, index="ivf", nprobe=1).recall_at(10, sample=200)
    ivf_all = Neighbors(rows, index="ivf", nprobe=1000).recall_at(10, sample=200)
    assert 0.8 < hnsw <= 1.0 and ivf_one < 0.9 and ivf_all == 1.0


def test_python_api(setup):
    array, files = wcl_tf.embed(setup["images"], model_dir=setup["run"])
    assert array.shape == (12, 32) and len(files) == 12 and files[-1]["class"] == "dogs"
    sims, ids = wcl_tf.Neighbors(array).search(array[:3], k=2)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


@pytest.mark.slow
def test_tools_embed_query_duplicates_evaluate_and_sheet(setup, tmp_path):
    out = str(tmp_path / "emb")
    done = _tool("embed", f"--model_dir={setup['run']}", f"--images={setup['images']}",
                 f"--out={out}", "--shard_size=4")
    assert done.returncode == 0, done.stderr
    assert "skipped 1 file(s) that are not readable images: cats/broken.jpg" in done.stderr
    assert "wrote 12 embeddings (32 float16) in 4 shard(s)" in done.stdout
    query = os.path.join(setup["images"], "dogs", "dogs_3.png")
    sheet = str(tmp_path / "sheet.png")
    result = str(tmp_path / "result.json")
    done = _tool("neighbors", f"--embeddings={out}", f"--query={query}", "--k=3",
                 f"--sheet={sheet}", "--duplicates", "--threshold=0.999", "--evaluate",
                 f"--output={result}")
    assert done.returncode == 0, done.stderr
    assert "    1      1.0000  dogs/dogs_3.png" in done.stdout.replace("0.9999", "1.0000")
    assert "kNN accuracy (k=3, leave-one-out, 12 images, 2 classes)" in done.stdout
    with open(result) as f:
        payload = json.load(f)
    neighbours = payload["queries"][0]["neighbours"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3]
    assert Image.open(sheet).size[0] > 100
    with open(os.path.join(out, "files-00000.csv")) as f:
        assert next(csv.reader(f)) == ["path", "class", "height", "width"]
    done = _tool("neighbors", f"--embeddings={out}", f"--query={query}",
                 f"--model_dir={setup['other']}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the embeddings in") and "another model" in last


def test_bad_input_gives_one_line_errors(setup, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "config.json").write_text(json.dumps({"image_size": S}))
    out = str(tmp_path / "emb")
    encoder = load_encoder(model_dir=setup["run"])
    other = load_encoder(model_dir=setup["other"])
    source = ImageFolder(setup["images"])
    manifest = embedding.embed_to_folder(encoder, source, out)
    embedding.check_same_encoder(manifest, encoder, out)  # the same model: accepted

    def error(call, *args, **kwargs):
        with pytest.raises(EmbedError) as info:
            call(*args, **kwargs)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "no images in" in error(ImageFolder, str(empty))
    assert "does not exist" in error(ImageFolder, str(tmp_path / "nowhere"))
    assert "no model in" in error(load_encoder, model_dir=str(no_model))
    assert "not found" in error(load_encoder, model_dir=str(tmp_path / "nowhere"))
    assert "1 file(s) are not readable images" in error(
        embedding.embed_to_folder, encoder, source, str(tmp_path / "fail"),
        on_bad_image="fail")
    assert "made by another model" in error(embedding.check_same_encoder, manifest, other,
                                             out)
    assert "(encoder differ)" in error(embedding.embed_to_folder, other, source, out)
    assert "holds no embeddings" in error(embedding.read_embeddings, str(empty))
    embedding.embed_to_folder(other, source, out, overwrite=True)
    assert embedding.read_manifest(out)["encoder"]["fingerprint"] == other.fingerprint


def test_projector_log_map_and_sheet(setup, tmp_path, rng):
    from tensorboard.plugins import projector  # noqa: F401  (the config proto's module)
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    from wcl_tf import embedding_views

    source = ImageFolder(setup["images"])
    paths = [p for p in source.paths if "broken" not in p]
    rows = rng.normal(size=(len(paths), 6)).astype(np.float32)
    names = [os.path.relpath(p, setup["images"]) for p in paths]
    classes = [n.split(os.sep)[0] for n in names]
    logdir = str(tmp_path / "projector")
    embedding_views.write_projector(logdir, rows, names, classes, paths, thumb=20)
    with open(os.path.join(logdir, "projector_config.pbtxt")) as f:
        config = text_format.Parse(f.read(), ProjectorConfig())
    entry = config.embeddings[0]
    stored = tf.train.load_checkpoint(tf.train.latest_checkpoint(logdir))
    np.testing.assert_array_equal(stored.get_tensor(entry.tensor_name), rows)
    with open(os.path.join(logdir, entry.metadata_path)) as f:
        assert f.read().splitlines() == ["path\tclass"] + [
            f"{n}\t{c}" for n, c in zip(names, classes)]
    side = 4 * 20  # 12 thumbnails of 20 px in a 4 x 4 grid
    assert Image.open(os.path.join(logdir, entry.sprite.image_path)).size == (side, side)
    assert list(entry.sprite.single_image_dim) == [20, 20]
    sheet = embedding_views.contact_sheet(
        [[(paths[0], "query"), (paths[1], "0.9\nb")], [(paths[2], "query")]],
        str(tmp_path / "sheet.png"), thumb=32)
    assert Image.open(sheet).mode == "P"  # palette PNG


@pytest.mark.slow
def test_embedding_map(tmp_path, rng):
    from wcl_tf import embedding_views

    rows = rng.normal(size=(30, 6)).astype(np.float32)
    classes = ["a"] * 15 + ["b"] * 15
    path = str(tmp_path / "map.png")
    assert embedding_views.embedding_map(rows, classes, path, sample=20) == 20
    assert Image.open(path).size[0] > 100


def test_two_replicas_give_the_rows_of_one_device(setup, two_replica_strategy):
    encoder = load_encoder(model_dir=setup["run"])
    source = ImageFolder(setup["images"])
    one, files_one, _ = embedding.embed_array(encoder, source, batch_size=5)
    two, files_two, _ = embedding.embed_array(encoder, source, batch_size=5,
                                              strategy=two_replica_strategy)
    assert files_two == files_one
    np.testing.assert_allclose(two, one, atol=1e-6)


def test_a_tfds_split_is_embedded_with_its_labels(setup, tmp_path):
    encoder = load_encoder(model_dir=setup["run"])
    source = TfdsSplit("embedded_mnist", "test", max_examples=60)
    labels = [int(label) for _, label in source.ds.take(5).as_numpy_iterator()]
    out = str(tmp_path / "mnist")
    embedding.embed_to_folder(encoder, source, out, batch_size=16, shard_size=25)
    rows, files, manifest = embedding.read_embeddings(out)
    assert rows.shape == (60, 32) and manifest["source"] == {
        "dataset": "embedded_mnist", "split": "test", "num_examples": 60}
    assert [f["path"] for f in files[:3]] == ["test/0", "test/1", "test/2"]
    assert files[-1]["path"] == "test/59" and len(manifest["shards"]) == 3
    assert [int(f["class"]) for f in files[:5]] == labels
    assert {(f["height"], f["width"]) for f in files} == {("28", "28")}


@pytest.mark.slow
def test_sigkill_during_embedding_then_rerun_gives_the_same_files(setup, tmp_path):
    import signal
    import time

    images = _images(tmp_path / "many", per_class=60, bad=False)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    args = [f"--model_dir={setup['run']}", f"--images={images}", "--shard_size=10",
            "--batch_size=5"]
    assert _tool("embed", *args, f"--out={whole}").returncode == 0
    child = subprocess.Popen([sys.executable, "-m", "wcl_tf.tools.embed", *args,
                              f"--out={killed}"], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    manifest = os.path.join(killed, "manifest.json")
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        if os.path.isfile(manifest):
            with open(manifest) as f:
                try:
                    if len(json.load(f)["shards"]) >= 2:
                        break
                except ValueError:
                    pass
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not embedding.read_manifest(killed)["complete"]
    done = _tool("embed", *args, f"--out={killed}")
    assert done.returncode == 0 and "resuming after" in done.stdout, done.stderr
    names = sorted(os.listdir(whole))
    assert sorted(n for n in os.listdir(killed) if not n.endswith(".tmp")) == names
    for name in names:
        with open(os.path.join(whole, name), "rb") as a, \
                open(os.path.join(killed, name), "rb") as b:
            assert a.read() == b.read(), name
