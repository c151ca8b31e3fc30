"""Command-line tools of wcl_tf, each runnable as a module or a console script.

    python -m wcl_tf.tools.knn_eval --model_dir=runs/demo          # wcl-knn-eval
    python -m wcl_tf.tools.linear_eval --model_dir=runs/demo       # wcl-linear-eval
    python -m wcl_tf.tools.finetune --model_dir=runs/demo          # wcl-finetune
    python -m wcl_tf.tools.export --model_dir=runs/demo            # wcl-export
    python -m wcl_tf.tools.benchmark step                          # wcl-benchmark
    python -m wcl_tf.tools.show_views --out=views.png              # wcl-show-views
    python -m wcl_tf.tools.raw_pixel_knn --data_dir=DIR            # wcl-raw-pixel-knn
    python -m wcl_tf.tools.reproduce_cifar --data_dir=DIR          # wcl-reproduce-cifar
    python -m wcl_tf.tools.import_torch --checkpoint=wcl-200.pth --model_dir=runs/wcl200  # wcl-import-torch

In a source checkout, `python tools/NAME.py` runs the same code. Each tool defines its
flags when its module is imported: import one tool per process.
"""
