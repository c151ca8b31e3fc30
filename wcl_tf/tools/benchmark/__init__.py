"""Speed and memory of wcl_tf: train step, weak-label step, input pipeline.

    python -m wcl_tf.tools.benchmark step --backbone=resnet18_cifar --batch_sizes=32,128
    python -m wcl_tf.tools.benchmark step --config=cifar10_r18 --batch_sizes=32
    python -m wcl_tf.tools.benchmark weak_labels --sizes=256,1024,4096,16384
    python -m wcl_tf.tools.benchmark pipeline --dataset=cifar10 --image_size=32 --batch_size=256
    python -m wcl_tf.tools.benchmark pipeline --config=cifar10_r18_multicrop --batch_size=256
    python -m wcl_tf.tools.benchmark profile --backbone=resnet50 --batch_sizes=32 --image_size=224
    python -m wcl_tf.tools.benchmark ratio --configs=demo,cifar10_r18   # or flagfile paths
    python -m wcl_tf.tools.benchmark ops --image_size=224 --batch_size=32
    python -m wcl_tf.tools.benchmark photometric --image_size=224 --batch_size=32 --threads=1
    python -m wcl_tf.tools.benchmark gpu --config=r50 --global_batch_size=256 \
        --precision=mixed_bfloat16 --dataset=folder:/data/imagenet --train_split=train

The run being timed is described by wcl_tf.train's own flags (every Config field:
--backbone, --image_size, --num_local_crops, --knn_crops, --precision, --sync_bn, --blur,
...; `python -m wcl_tf.train --helpfull` lists them), parsed by absl into a Config exactly
as wcl_tf.train parses them: --config=NAME and --flagfile=PATH mean what they mean to
training, later flags override them. step and profile build the model and optimizer as
training builds them (on one device, whatever --strategy says); pipeline builds training's
input pipeline with the strong augmentation from the first batch. ratio reads each of
--configs as `python -m wcl_tf.train --config=NAME` (or --flagfile=PATH) followed by the
training flags of this command line (e.g. --data_dir).

Each prints a markdown table and, with --out=FILE.json, writes the numbers. Timings are
the median of --repeats timed steps after --warmup untimed ones, on whatever machine runs
it (the header says which). Peak memory is the process's peak resident set size on CPU
(it includes TensorFlow itself) and the allocator's peak on a GPU.
"""


def main():
    """Entry point of `python -m wcl_tf.tools.benchmark`, of tools/benchmark.py and of the
    console script. The flags are defined by wcl_tf.tools.benchmark.cli, imported here and
    not with the package: the modes and the timing helper import without them."""
    from wcl_tf.tools.benchmark import cli  # pylint: disable=import-outside-toplevel

    cli.main()
