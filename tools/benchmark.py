"""Launcher (source checkout) of the package wcl_tf/tools/benchmark/: python -m wcl_tf.tools.benchmark."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from wcl_tf.tools.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
