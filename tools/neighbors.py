"""Launcher (source checkout) of wcl_tf/tools/neighbors.py: python -m wcl_tf.tools.neighbors."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from wcl_tf.tools.neighbors import main  # noqa: E402

if __name__ == "__main__":
    main()
