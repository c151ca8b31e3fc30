"""Reads files written by PyTorch's `torch.save` without PyTorch, and without running them.

`torch.save` (PyTorch >= 1.6) writes a zip archive:

    <archive>/data.pkl      a pickle of the saved object; every tensor in it is a call of
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
                            ...) whose storage is a persistent id
                            ("storage", torch.<Type>Storage, key, location, numel)
    <archive>/data/<key>    the raw bytes of each storage (stored, not compressed)
    <archive>/byteorder     "little" or "big" (absent in old files: little)

Unpickling a file runs whatever callables it names, so a checkpoint from the internet is
untrusted input. `load(path)` unpickles with `SafeUnpickler`, whose `find_class` accepts
only the globals a tensor checkpoint needs (the tensor and parameter rebuild functions,
storage types, OrderedDict) and refuses every other one with `UnsafeCheckpointError`
naming it, before anything is called. Tensors come back as `LazyTensor`s: dtype, shape,
strides, offset and the storage's key; a storage's bytes are read from the zip only when
`LazyTensor.numpy()` is called. So the entries one does not use (the optimizer's momentum
in a training checkpoint, half of its size) are never read, and tensors that share a
storage read the same bytes.

Storage types: float32, float16, bfloat16 (numpy dtype from ml_dtypes), float64 and the
integer and bool types. The legacy format of PyTorch < 1.6 (a bare pickle stream) and
TorchScript archives are refused with a message that says how to re-save the file.
"""

import collections
import io
import pickle
import zipfile

import numpy as np

# The legacy (pre-1.6) format starts with a pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class CheckpointError(ValueError):
    """The file is not a readable torch.save checkpoint; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allow-list (it would run code on loading)."""


def _bfloat16():
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (installed with TensorFlow)

    return np.dtype(ml_dtypes.bfloat16)


# torch.<Name>Storage -> numpy dtype (a callable for bfloat16, whose numpy type lives in
# ml_dtypes).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class StorageType:
    """Stands for the class torch.<name> named by a storage's persistent id."""

    def __init__(self, name):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        self.dtype = dtype() if dtype is _bfloat16 else np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class Storage:
    """One storage of the archive. Its bytes are read from the zip at each `array()` call
    and not kept (an import holds one tensor at a time, not the whole file)."""

    def __init__(self, archive, key, dtype, byteorder):
        self.archive, self.key, self.dtype, self.byteorder = archive, key, dtype, byteorder

    @property
    def nbytes(self):
        return self.archive.entry_size(self.key)

    def array(self):
        """The storage as a new 1-D writable numpy array of its dtype."""
        data = self.archive.read_storage(self.key)
        if len(data) % self.dtype.itemsize:
            raise CheckpointError(f"storage {self.key!r} holds {len(data)} bytes, not a "
                                  f"multiple of its {self.dtype} items: the file is corrupt.")
        array = np.frombuffer(data, dtype=self.dtype)
        if self.byteorder == "big" and self.dtype.itemsize > 1:
            array = array.byteswap()
        return array


class LazyTensor:
    """A tensor of the checkpoint, not read yet: `numpy()` reads its storage."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)

    @property
    def dtype(self):
        return self.storage.dtype

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self):
        """A new, writable, C-contiguous numpy array with the tensor's values."""
        flat = self.storage.array()
        if self.size == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or last >= flat.size or min(self.stride, default=0) < 0:
            raise CheckpointError(
                f"tensor of shape {self.shape} (offset {self.offset}, strides {self.stride}) "
                f"reaches past its storage {self.storage.key!r} of {flat.size} elements: the "
                "file is corrupt.")
        if self.offset == 0 and self.size == flat.size and self.stride == _contiguous(self.shape):
            return flat.reshape(self.shape)  # The storage's own buffer: no copy.
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape, strides=[s * item for s in self.stride],
            writeable=False)
        return np.array(view, order="C", copy=True)

    def __repr__(self):
        return f"LazyTensor({self.dtype}, shape={self.shape})"


def _contiguous(shape):
    """C-order strides (in elements) of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _rebuild_tensor(storage, offset, size, stride, *unused):
    # torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    # backward_hooks[, metadata]): only the first four describe the values.
    return LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks): the tensor.
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


# (module, name) -> what the unpickler builds instead. Nothing else is ever resolved.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save pickle into LazyTensors and plain containers only."""

    def __init__(self, file, archive, byteorder):
        super().__init__(file)
        self.archive, self.byteorder = archive, byteorder
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return StorageType(name)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint's pickle names the global "
                f"{module}.{name}, which is not part of a tensor checkpoint (unpickling it "
                "could run code); nothing was executed. For a pickled model object, "
                "re-save its state_dict() with torch.save.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise CheckpointError(f"unsupported persistent id {pid!r} in the checkpoint's "
                                  "pickle (expected a tensor storage).")
        storage_type, key = pid[1], str(pid[2])
        storage = self.storages.get(key)
        if storage is None:
            storage = Storage(self.archive, key, storage_type.dtype, self.byteorder)
            self.storages[key] = storage
        return storage


class _Archive:
    """The zip written by torch.save: its pickle and storages."""

    def __init__(self, path):
        self.path = path
        self._zip = zipfile.ZipFile(path)  # pylint: disable=consider-using-with
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            if any(n.endswith("/constants.pkl") for n in names):
                raise CheckpointError(
                    f"{path} is a TorchScript archive (torch.jit.save), not a torch.save "
                    "checkpoint: save the model's state_dict() with torch.save instead.")
            raise CheckpointError(f"{path} is a zip archive without data.pkl: not a "
                                  "torch.save checkpoint.")
        self.prefix = pickles[0][:-len("data.pkl")]
        self._infos = {info.filename: info for info in self._zip.infolist()}
        self.bytes_read = 0  # Storage bytes read so far.
        self.storages_read = set()

    def read(self, name):
        return self._zip.read(self.prefix + name)

    def has(self, name):
        return self.prefix + name in self._infos

    def entry_size(self, key):
        return self._info(key).file_size

    def _info(self, key):
        info = self._infos.get(f"{self.prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"storage {key!r} is missing from {self.path}: the file is "
                                  "truncated or corrupt.")
        return info

    def read_storage(self, key):
        info = self._info(key)
        self.bytes_read += info.file_size
        self.storages_read.add(key)
        data = bytearray(info.file_size)  # Writable: numpy arrays over it need no copy.
        with self._zip.open(info) as f:
            if f.readinto(data) != info.file_size:
                raise CheckpointError(f"storage {key!r} of {self.path} is truncated.")
        return data

    def close(self):
        self._zip.close()


class Checkpoint:
    """An opened torch.save file: `obj` (the unpickled object, tensors as LazyTensors).

    Use as a context manager (closes the file), or call close(). `bytes_read` counts the
    storage bytes read so far; `storage_bytes` those of every storage in the file.
    """

    def __init__(self, path):
        _check_format(path)
        try:
            self._archive = _Archive(path)
            byteorder = "little"
            if self._archive.has("byteorder"):
                byteorder = self._archive.read("byteorder").decode("ascii").strip()
            data = self._archive.read("data.pkl")
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err}).") from None
        unpickler = SafeUnpickler(io.BytesIO(data), self._archive, byteorder)
        try:
            self.obj = unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                AttributeError, IndexError) as err:
            raise CheckpointError(f"{path}: the checkpoint's pickle is corrupt ({err}).") from None
        self.storages = unpickler.storages

    @property
    def bytes_read(self):
        return self._archive.bytes_read

    @property
    def storage_bytes(self):
        return sum(s.nbytes for s in self.storages.values())

    def close(self):
        self._archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_format(path):
    """Raises CheckpointError for a file that is not a zip-format torch.save."""
    with open(path, "rb") as f:
        head = f.read(64)
    if zipfile.is_zipfile(path):
        return
    if head[:1] == b"\x80":  # A pickle stream: the legacy format stores its magic first.
        try:
            magic = pickle.Unpickler(io.BytesIO(head)).load()
        except Exception:  # noqa: BLE001  Anything else is reported below.
            magic = None
        if magic == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6) format, which this reader does not "
                "read. Re-save it with PyTorch >= 1.6: python -c \"import torch; "
                f"torch.save(torch.load('{path}', map_location='cpu', weights_only=True), "
                "'resaved.pth')\" and import resaved.pth.")
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path} is truncated or corrupt (its zip directory cannot be "
                              "read).")
    raise CheckpointError(f"{path} is not a torch.save checkpoint (not a zip archive).")


def load(path):
    """The object saved in `path`, with LazyTensors for tensors (reads no storage).

    The file stays open until the returned Checkpoint is closed; prefer
    `with Checkpoint(path) as ckpt: ...`.
    """
    return Checkpoint(path)


def to_numpy(obj):
    """`obj` with every LazyTensor replaced by its numpy array (reads their storages)."""
    if isinstance(obj, LazyTensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, to_numpy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj
