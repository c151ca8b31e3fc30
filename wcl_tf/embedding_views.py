"""Pictures of a collection of embeddings: contact sheets, a 2-D map, a projector log.

    contact_sheet(rows, path)         each row: a query (or a group's first image) then its
                                      neighbours, captioned with similarity and name (PNG)
    embedding_map(x, labels, path)    a t-SNE map (scikit-learn) of a sample, coloured by class
    write_projector(logdir, ...)      a TensorBoard Embedding Projector log: the embeddings
                                      as a checkpointed variable, metadata.tsv (path, class),
                                      a sprite of thumbnails and projector_config.pbtxt

Images are read from their files with Pillow (thumbnails only; no preprocessing).
"""

import os

import numpy as np

THUMB = 96
SPRITE_MAX_SIDE = 8192  # TensorBoard's projector reads sprites up to 8192 x 8192 px


def _thumbnail(path, side):
    """uint8 (side, side, 3): the image fitted into a side x side square on white."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    canvas = np.full((side, side, 3), 255, np.uint8)
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            pixels = np.asarray(image)
    except (OSError, ValueError):
        return canvas
    h, w = pixels.shape[:2]
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


def _short(name, limit=24):
    name = os.path.basename(name)
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def contact_sheet(rows, path, title=None, thumb=THUMB, colors=256):
    """Writes a PNG contact sheet. rows: lists of (image file, caption) cells, the first
    cell of each row being the query (or the group's first image). colors: palette size
    of the written PNG (0: full colour). Returns path."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    columns = max(len(r) for r in rows)
    cell = thumb / 100.0 * 1.0
    fig, axes = plt.subplots(len(rows), columns, squeeze=False,
                             figsize=(columns * cell, len(rows) * (cell + 0.3)
                                      + (0.3 if title else 0)))
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            file, caption = row[c]
            ax.imshow(_thumbnail(file, thumb))
            ax.set_title(caption, fontsize=5.5, color="black" if c else "darkred")
            for spine in ax.spines.values():
                spine.set_color("darkred" if c == 0 else "lightgray")
                spine.set_linewidth(2 if c == 0 else 0.5)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97) if title else None)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if colors:
        _quantize(path, colors)
    return path


def _quantize(path, colors):
    """Rewrites the PNG at `path` with a palette of `colors` colours (a few times smaller)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def embedding_map(embeddings, labels, path, sample=2000, seed=0, title=None):
    """Writes a 2-D t-SNE map (sklearn.manifold.TSNE, cosine metric) of at most `sample`
    rows, coloured by label. Returns the number of points drawn."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(embeddings), size=min(sample, len(embeddings)),
                               replace=False))
    x = np.asarray(embeddings[picks], np.float32)
    labels = np.asarray(labels)[picks]
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
              random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name in sorted(set(labels.tolist())):
        mask = labels == name
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, label=str(name) or "(no class)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=1.5, loc="best")
    ax.set_title(title or f"t-SNE of {len(x)} embeddings", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(x)


def write_projector(logdir, embeddings, names, classes, image_files=None, thumb=48):
    """A TensorBoard projector log in `logdir` (module doc); `tensorboard --logdir LOGDIR`
    shows it under PROJECTOR. image_files: one per row for the sprite (None: no sprite).
    Thumbnails shrink so that the sprite stays within 8192 px."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins import projector  # pylint: disable=import-outside-toplevel

    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "metadata.tsv"), "w", encoding="utf-8") as f:
        f.write("path\tclass\n")
        for name, label in zip(names, classes):
            f.write(f"{name.replace(chr(9), ' ')}\t{label or '-'}\n")
    variable = tf.Variable(np.asarray(embeddings, np.float32), name="embeddings")
    checkpoint = tf.train.Checkpoint(embedding=variable)
    checkpoint.save(os.path.join(logdir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    if image_files is not None:
        per_side = int(np.ceil(np.sqrt(len(image_files))))
        thumb = max(8, min(int(thumb), SPRITE_MAX_SIDE // per_side))
        sprite = np.full((per_side * thumb, per_side * thumb, 3), 255, np.uint8)
        for i, file in enumerate(image_files):
            r, c = divmod(i, per_side)
            sprite[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = _thumbnail(file,
                                                                                      thumb)
        Image.fromarray(sprite).save(os.path.join(logdir, "sprite.png"))
        entry.sprite.image_path = "sprite.png"
        entry.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(logdir, config)
    return logdir


def caption(similarity, name):
    """'0.912\\nname' (the file name without its folders, shortened from the left)."""
    head = "" if similarity is None else f"{similarity:.3f}\n"
    return head + _short(name)
