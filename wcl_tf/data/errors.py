"""The error every data source raises when data cannot be loaded as asked.

A module of its own so that the sources (wcl_tf.data.sources, wcl_tf.data.folder) share it
without importing each other; `wcl_tf.data.DataError` and `sources.DataError` are this class.
"""


class DataError(ValueError):
    """The data cannot be loaded as asked; the message says what to do instead."""
