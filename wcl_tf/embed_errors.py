"""The error the encoder loading, the image sources and the embedding shards raise.

A module of its own so that wcl_tf.encoder and wcl_tf.embed_sources share it without
importing each other; wcl_tf.embedding, which uses both, raises it too.
"""

from wcl_tf.data.errors import DataError


class EmbedError(DataError):
    """The embedding cannot be made or read as asked; the message says what to do."""


def first_line(err):
    """The first line of `err`'s message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
