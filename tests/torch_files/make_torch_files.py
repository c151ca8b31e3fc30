"""Writes the small PyTorch checkpoints in this folder, which the tests read WITHOUT torch.

Needs PyTorch (not a dependency of wcl_tf): run once, from the repository root,

    python tests/torch_files/make_torch_files.py

and commit the .pt files. tests/test_import_torch_reader.py knows their values from the
formulas below (restated there with numpy), so the reader is checked against files that
PyTorch itself wrote.
"""

import collections
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class _OpensAFile:
    """Pickles as a call of builtins.open(MARKER, "w"): loading it with an ordinary
    unpickler creates MARKER in the working directory."""

    def __reduce__(self):
        return (open, ("wcl_torch_marker.txt", "w"))


def tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4  # storage "shared"
    wide = torch.arange(20, dtype=torch.float32) - 5
    weights = collections.OrderedDict()
    weights["module.net.shared"] = base
    weights["module.net.transposed"] = base.t()  # strided, same storage as "shared"
    weights["module.net.slice"] = wide[7:13]  # storage offset 7
    weights["module.net.column"] = base[:, 1]  # offset 1, stride 4
    weights["module.net.half"] = (torch.arange(6, dtype=torch.float32) / 8).half()
    weights["module.net.bfloat"] = (torch.arange(6, dtype=torch.float32) - 2.5).bfloat16()
    weights["module.net.double"] = torch.arange(3, dtype=torch.float64) / 3
    weights["module.net.count"] = torch.tensor(1234)  # int64 scalar
    weights["module.net.mask"] = torch.tensor([True, False, True])
    param = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.SGD([param], lr=0.0, momentum=0.9)
    param.grad = torch.full((2, 2), 3.0)
    optimizer.step()
    return {
        "model": weights,
        "optimizer": optimizer.state_dict(),
        "epoch": 7,
        "nested": {"list": [base[0], (1, 2.5, "x", None, True)], "empty": {}},
    }


def main():
    torch.save(tensors(), os.path.join(HERE, "tensors.pt"))
    torch.save({"model": {"net.conv1.weight": torch.zeros(8, 3, 3, 3),
                          "net.fc.weight": torch.zeros(10, 8)}},
               os.path.join(HERE, "other_architecture.pt"))
    torch.save({"model": _OpensAFile()}, os.path.join(HERE, "foreign_global.pt"))
    torch.save({"w": torch.ones(2)}, os.path.join(HERE, "legacy.pt"),
               _use_new_zipfile_serialization=False)
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".pt"):
            print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")


if __name__ == "__main__":
    main()
