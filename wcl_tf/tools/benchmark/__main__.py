"""python -m wcl_tf.tools.benchmark MODE [--flags]."""

from wcl_tf.tools.benchmark import main

main()
