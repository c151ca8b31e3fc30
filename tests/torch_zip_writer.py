"""Writes float32 state dicts in torch.save's zip format without PyTorch (tests only).

For the tests that need a full-size ResNet-50 checkpoint where PyTorch is not installed
(the tool pipeline on an imported run). The reader itself is checked against files that
PyTorch wrote (tests/torch_files/, and tests/test_import_torch.py when torch is present);
this writer emits the same opcodes PyTorch 2.x does for a dict of OrderedDicts of
contiguous float32 tensors: GLOBAL torch._utils._rebuild_tensor_v2 / torch.FloatStorage /
collections.OrderedDict, a BINPERSID storage id per tensor, storages in data/<key>.
"""

import pickle
import zipfile

import numpy as np


class _Global:
    def __init__(self, module, name):
        self.text = f"{module}\n{name}\n".encode("ascii")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _Global("torch", "FloatStorage")
_ORDERED_DICT = _Global("collections", "OrderedDict")


class _Tensor:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access  (the Python pickler)
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _FLOAT_STORAGE, obj.key, "cpu", obj.numel)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + obj.text)
            return
        if isinstance(obj, _Tensor):
            shape = tuple(obj.array.shape)
            strides, step = [], 1
            for n in reversed(shape):
                strides.append(step)
                step *= n
            self.save(_REBUILD)
            self.save((_Storage(obj.key, obj.array.size), 0, shape, tuple(reversed(strides)),
                       False, _Reduce(_ORDERED_DICT, ())))
            self.write(pickle.REDUCE)
            return
        if isinstance(obj, _Reduce):
            self.save(obj.func)
            self.save(obj.args)
            self.write(pickle.REDUCE)
            return
        super().save(obj, save_persistent_id)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args


def save(obj, path, archive="checkpoint"):
    """obj: nested dicts whose leaves are numpy arrays (written as float32 tensors) or
    plain values. Dicts named in `ordered` are fine as plain dicts."""
    storages = []

    def convert(value):
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value, dtype="<f4")
            tensor = _Tensor(str(len(storages)), array)
            storages.append(tensor)
            return tensor
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    converted = convert(obj)
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        data = _PickleBuffer()
        _Pickler(data, protocol=2).dump(converted)
        z.writestr(f"{archive}/data.pkl", bytes(data.buffer))
        z.writestr(f"{archive}/byteorder", "little")
        for tensor in storages:
            z.writestr(f"{archive}/data/{tensor.key}", tensor.array.tobytes())
        z.writestr(f"{archive}/version", "3\n")
    return path


class _PickleBuffer:
    def __init__(self):
        self.buffer = bytearray()

    def write(self, data):
        self.buffer += data


