"""Launcher (source checkout) of wcl_tf/tools/import_torch.py: python -m wcl_tf.tools.import_torch."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from wcl_tf.tools.import_torch import main  # noqa: E402

if __name__ == "__main__":
    main()
