"""Time and peak memory of importing a full-size WCL checkpoint (needs PyTorch to write it).

    python tools/benchmark_import_torch.py [--keep=DIR]

Writes, in a temporary folder, what the authors' wcl.py saves after an epoch: a
torch.save of {"model": the state dict of DistributedDataParallel(ResNet-50 + two
2048-4096-4096-256 heads), "optimizer": SGD state with a momentum buffer per parameter,
"epoch": 200} (about 77 M parameters: 310 MB of weights, 610 MB with the momentum), with
random weights. Then, each in a fresh process timed by GNU time (/usr/bin/time: wall seconds and
the process's maximum resident set):

    reader    wcl_tf.torch_checkpoint alone: open the file and read every model tensor
              (one at a time, as the import does), no TensorFlow
    baseline  TensorFlow + Keras + the empty ResNet-50 WCLModel built, nothing read
    import    python -m wcl_tf.tools.import_torch (writes the run folder)

and prints wall time, peak RSS and the storage bytes the import read (its
import_record.json) against the bytes in the file. Only the writing of the checkpoint
needs PyTorch; the import does not use it.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path):
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel

    def head():
        layers = torch.nn.Module()
        layers.linear1 = torch.nn.Linear(2048, 4096)
        layers.bn1 = torch.nn.BatchNorm1d(4096)
        layers.linear2 = torch.nn.Linear(4096, 4096)
        layers.bn2 = torch.nn.BatchNorm1d(4096)
        layers.linear3 = torch.nn.Linear(4096, 256)
        return layers

    model = torch.nn.Module()
    model.net = torchvision.models.resnet50()
    del model.net.fc
    model.head1, model.head2 = head(), head()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # one momentum buffer per parameter
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 200}, path)
    return sum(p.numel() for p in params), sum(v.numel() * v.element_size()
                                               for v in state.values())


READER = """
import sys
from wcl_tf import torch_checkpoint, torch_import
with torch_checkpoint.Checkpoint(sys.argv[1]) as ckpt:
    state, _, _ = torch_import.state_dict_of(ckpt.obj)
    for tensor in state.values():
        array = tensor.numpy()
        del array
    print(ckpt.bytes_read, ckpt.storage_bytes)
"""

BASELINE = """
from wcl_tf import torch_import
torch_import.build_models({"layout": "pretraining", "head_hidden_dim": 4096,
                           "head_output_dim": 256})
"""


def measured(args):
    """(seconds, peak RSS bytes, stdout, CPU seconds) of one child process, from /usr/bin/time (GNU
    time's %M: the child's own maximum resident set; getrusage(RUSAGE_CHILDREN) would
    also count this process's RSS, which a fork inherits)."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M %U %S", *args], env=env,
                         capture_output=True, text=True, check=True)
    line = [l for l in out.stderr.splitlines() if l.startswith("TIME ")][-1]
    seconds, kib, user, system = line.split()[1:]
    return float(seconds), int(kib) * 1024, out.stdout, float(user) + float(system)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write the checkpoint and run folder here and keep "
                        "them (default: a temporary folder, deleted)")
    parser.add_argument("--mode", choices=["all", "reader", "baseline", "import"],
                        default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "wcl-200.pth")
        if not os.path.exists(path):
            params, weight_bytes = write_checkpoint(path)
            print(f"checkpoint: {params:,} parameters, {weight_bytes / 1e6:.0f} MB in the "
                  f"model state dict, file {os.path.getsize(path) / 1e6:.0f} MB")
        modes = ["reader", "baseline", "import"] if args.mode == "all" else [args.mode]
        for mode in modes:
            if mode == "reader":
                seconds, peak, out, cpu = measured([sys.executable, "-c", READER, path])
                read, total = (int(x) for x in out.split())
                print(f"reader:   {seconds:5.1f} s ({cpu:.1f} s CPU), peak RSS {peak / 1e6:5.0f} MB, "
                      f"read {read / 1e6:.0f} of {total / 1e6:.0f} MB of storages")
            elif mode == "baseline":
                seconds, peak, _, cpu = measured([sys.executable, "-c", BASELINE])
                print(f"baseline: {seconds:5.1f} s ({cpu:.1f} s CPU), peak RSS {peak / 1e6:5.0f} MB "
                      "(TensorFlow + the empty model)")
            else:
                run = os.path.join(folder, "run")
                if os.path.exists(run):
                    shutil.rmtree(run)
                seconds, peak, _, cpu = measured([sys.executable, "-m",
                                             "wcl_tf.tools.import_torch",
                                             f"--checkpoint={path}", f"--model_dir={run}"])
                record = json.load(open(os.path.join(run, "import_record.json")))
                print(f"import:   {seconds:5.1f} s ({cpu:.1f} s CPU), peak RSS {peak / 1e6:5.0f} MB, read "
                      f"{record['storage_bytes_read'] / 1e6:.0f} of "
                      f"{record['storage_bytes_in_file'] / 1e6:.0f} MB of storages")


if __name__ == "__main__":
    main()
