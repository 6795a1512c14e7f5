"""Reads files written by `torch.save` without PyTorch: tensors come back as numpy arrays.

Both on-disk formats are understood:

- the zip archive of torch >= 1.6: `<name>/data.pkl` (the object pickle, storages as persistent ids),
  `<name>/data/<key>` (each storage's raw bytes, in the byte order of `<name>/byteorder`, little-endian
  when older files lack that record);
- the legacy stream (`_use_new_zipfile_serialization=False`, and every file from torch < 1.6, e.g.
  pytorch-fid's Inception weights): pickles of the magic number, the protocol version and the system
  info, then the object pickle, then the list of storage keys, then each storage as an int64 element
  count followed by its raw bytes, both little-endian whatever the writer's byte order.

Tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, ...) become numpy arrays with the
tensor's own size, stride and storage offset, copied out of the storage. bfloat16 becomes float32 (numpy
has no bfloat16). `collections.OrderedDict`, `argparse.Namespace` and a few harmless builtins and numpy
constructors are rebuilt as themselves; every other class or function a pickle names is replaced by a
`TorchObject` subclass that records the module, name, arguments and state. So optimizer or scheduler
objects load, and, unlike `torch.load(weights_only=False)`, no code a file names gets to run.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, Optional

import numpy as np

try:   # numpy >= 2 moved the pickle helpers; `numpy.core` still works there but warns
  from numpy._core import multiarray as _np_multiarray
except ImportError:   # pragma: no cover - numpy 1.x
  from numpy.core import multiarray as _np_multiarray

__all__ = ["TorchDType", "TorchObject", "load", "load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Legacy storage class name → element type; "bfloat16" is special-cased (read as uint16).
_STORAGE_DTYPES = {
  "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
  "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
  "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
  "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# `torch.<name>` dtype objects (pickled by name) → element type.
_TORCH_DTYPES = {
  "float64": "float64", "double": "float64", "float32": "float32", "float": "float32", "float16": "float16",
  "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
  "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool", "complex64": "complex64",
  "cfloat": "complex64", "complex128": "complex128", "cdouble": "complex128",
}


class TorchObject:
  """Stand-in for a class or function named in the pickle that this reader does not rebuild.

  Attributes: `module`, `name` (of the original), `args`/`kwargs` (what it was called or `__new__`-ed
  with), `state` (what `__setstate__` would have received), and `dict_items` / `list_items` for
  objects the pickle filled like a dict or a list.
  """

  module: str = ""
  name: str = ""
  args: tuple = ()
  kwargs: Mapping[str, Any] = {}
  state: Any = None

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs = args, dict(kwargs)
    return obj

  def __init__(self, *args, **kwargs):   # arguments were recorded by __new__
    pass

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.__dict__.setdefault("dict_items", {})[key] = value

  def append(self, value: Any) -> None:
    self.__dict__.setdefault("list_items", []).append(value)

  def extend(self, values: Any) -> None:
    self.__dict__.setdefault("list_items", []).extend(values)

  def __repr__(self) -> str:
    return f"TorchObject({self.module}.{self.name}, args={self.args!r}, state={self.state!r})"


class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: only the element type matters."""

  def __init__(self, name: str, dtype: str):
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class TorchDType:
  """What `torch.float32` & co. unpickle to; `numpy` is the matching numpy dtype (bfloat16 → float32)."""

  def __init__(self, name: str, dtype: str):
    self.name, self.dtype = name, dtype
    self.numpy = np.dtype("float32" if dtype == "bfloat16" else dtype)

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage:
  """A storage's elements as a flat native-endian numpy array (None while only the structure is read)."""

  def __init__(self, data: Optional[np.ndarray]):
    self.data = data


def _element_size(dtype: str) -> int:
  return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _decode_storage(raw: bytes, dtype: str, numel: int, little_endian: bool) -> np.ndarray:
  """Raw storage bytes → flat numpy array of `numel` elements (bfloat16 widened to float32)."""
  nbytes = numel * _element_size(dtype)
  if len(raw) < nbytes:
    raise ValueError(f"storage holds {len(raw)} bytes, {nbytes} expected (truncated file?)")
  order = "<" if little_endian else ">"
  if dtype == "bfloat16":
    half = np.frombuffer(raw, np.dtype(order + "u2"), count=numel)
    return (half.astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, np.dtype(dtype).newbyteorder(order), count=numel).astype(np.dtype(dtype))


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple, stride: tuple, *unused) -> Any:
  """`torch._utils._rebuild_tensor(_v2)`: a strided view of the storage, copied out."""
  del unused   # requires_grad, backward hooks, metadata
  if not isinstance(storage, _Storage):
    raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
  if storage.data is None:   # structure-only pass of the legacy format
    return None
  flat, size, stride = storage.data, tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise ValueError(f"tensor size {size} and stride {stride} differ in length")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if storage_offset < 0 or min(stride, default=0) < 0 or last >= flat.size:
    raise ValueError(f"tensor (offset {storage_offset}, size {size}, stride {stride}) exceeds its storage of "
                     f"{flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view, copy=True, order="C")


def _rebuild_parameter(data: Any, *unused) -> Any:
  """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is its data here."""
  return data


def _rebuild_from_type(func: Callable, new_type: Any, args: tuple, state: Any = None) -> Any:
  """`torch._tensor._rebuild_from_type(_v2)`: tensor subclasses lose their subclass."""
  return func(*args)


def _rebuild_from_numpy(data: Any, dtype: Any, *unused) -> Any:
  """`torch._utils._rebuild_device_tensor_from_numpy` and friends (tensors of XLA/MPS devices)."""
  return np.asarray(data).astype(dtype.numpy) if isinstance(dtype, TorchDType) else np.asarray(data)


def _torch_device(*args) -> str:
  return ":".join(str(a) for a in args)


_TORCH_FUNCTIONS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_from_numpy,
  ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _rebuild_from_numpy,
  ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
  ("torch.tensor", "_rebuild_from_type"): _rebuild_from_type,   # module name before torch 1.9
  ("torch", "Size"): tuple,
  ("torch", "device"): _torch_device,
}
# Harmless callables rebuilt for real; anything else becomes a TorchObject.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("collections", "defaultdict"): collections.defaultdict,
  ("argparse", "Namespace"): argparse.Namespace,
  ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
  ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray, ("builtins", "range"): range,
  ("_codecs", "encode"): lambda s, encoding="utf-8": s.encode(encoding),   # bytes pickled by protocol 2
  ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
  ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
  ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
}
_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
  """One TorchObject subclass per (module, name), so `isinstance` and `type(x).name` tell them apart."""
  key = (module, name)
  if key not in _STAND_INS:
    _STAND_INS[key] = type(name.split(".")[-1], (TorchObject,), {"module": module, "name": name,
                                                                  "__module__": __name__})
  return _STAND_INS[key]


class _Unpickler(pickle.Unpickler):
  """Resolves globals from the tables above and storages through `storage_fn(key, dtype, numel)`."""

  def __init__(self, file, storage_fn: Optional[Callable[[str, str, int], Optional[np.ndarray]]] = None):
    super().__init__(file, encoding="utf-8")
    self.storage_fn = storage_fn
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _TORCH_FUNCTIONS:
      return _TORCH_FUNCTIONS[(module, name)]
    if module.startswith("torch") and name.endswith("Storage") and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])   # also torch.cuda.FloatStorage of GPU checkpoints
    if module == "torch" and name in _TORCH_DTYPES:
      return TorchDType(name, _TORCH_DTYPES[name])
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    return _stand_in(module, name)

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module":   # legacy files of whole nn.Modules: (class, source file, source)
      return pid[1]
    if kind != "storage" or self.storage_fn is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid[:1]!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    view = pid[5] if len(pid) > 5 else None   # legacy format: (view key, offset, size) or None
    if not isinstance(storage_type, (_StorageType, TorchDType)):
      raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
    dtype = storage_type.dtype
    if key not in self.storages:
      self.storages[key] = _Storage(self.storage_fn(key, dtype, numel))
    storage = self.storages[key]
    if view is not None and storage.data is not None:
      _, offset, size = view
      storage = _Storage(storage.data[int(offset):int(offset) + int(size)])
    return storage


def _read_zip(path: str) -> Any:
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"truncated or corrupt zip archive ({e})") from None
  with zf:
    # The top folder is "archive" by default but was the file's stem in some torch versions.
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
      kind = "a TorchScript archive" if any(n.endswith("/constants.pkl") for n in zf.namelist()) else "a zip archive"
      raise ValueError(f"{kind} without data.pkl, not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(zf.namelist())
    order = zf.read(prefix + "byteorder").decode("ascii").strip() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
      raise ValueError(f"unknown byte order {order!r}")

    def storage(key: str, dtype: str, numel: int) -> np.ndarray:
      name = f"{prefix}data/{key}"
      if name not in names:
        raise ValueError(f"storage record {name} missing")
      return _decode_storage(zf.read(name), dtype, numel, order == "little")

    return _Unpickler(io.BytesIO(zf.read(prefix + "data.pkl")), storage).load()


def _read_legacy(data: bytes) -> Any:
  f = io.BytesIO(data)
  try:
    magic = _Unpickler(f).load()
  except Exception:   # not a pickle at all
    magic = None
  if magic != _LEGACY_MAGIC:
    if data[257:262] == b"ustar":
      raise ValueError("tar format of torch < 0.1.10 is not supported")
    raise ValueError("not a torch.save file (neither a zip archive nor a legacy stream with the magic number)")
  protocol = _Unpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"unsupported legacy protocol version {protocol!r}")
  _Unpickler(f).load()   # sys_info: its byte order is the writer's; the storages are little-endian regardless
  start = f.tell()

  # Storage bytes follow the object pickle, and their element size comes from the storage types inside
  # it: a first pass over the pickle learns the types, a second one rebuilds the tensors from the bytes.
  types: dict[str, tuple[str, int]] = {}

  def record(key: str, dtype: str, numel: int) -> None:
    types[key] = (dtype, numel)

  _Unpickler(f, record).load()
  keys = _Unpickler(f).load()
  arrays = {}
  for key in keys:
    key = str(key)
    if key not in types:
      raise ValueError(f"storage {key!r} listed but not used by the pickle")
    dtype, _ = types[key]
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"file ends before storage {key!r} (truncated file?)")
    numel = struct.unpack("<q", head)[0]
    if numel < 0:
      raise ValueError(f"storage {key!r} has a negative size (corrupt file?)")
    raw = f.read(numel * _element_size(dtype))
    arrays[key] = _decode_storage(raw, dtype, numel, little_endian=True)
  missing = sorted(set(types) - set(arrays))
  if missing:
    raise ValueError(f"storages {missing[:5]} have no data (truncated file?)")
  f.seek(start)
  return _Unpickler(f, lambda key, dtype, numel: arrays[key]).load()


def load(path: str | os.PathLike) -> Any:
  """Loads a file written by `torch.save`, tensors as numpy arrays.

  Args:
    path: the `.pt` / `.pth` file (zip or legacy format).
  Returns:
    The saved object: dicts, lists, `OrderedDict`s, `argparse.Namespace`s and numbers as themselves,
    tensors and Parameters as numpy arrays, other objects as `TorchObject` stand-ins.
  Raises:
    OSError: the file cannot be read.
    ValueError: it is not a torch.save file, or is truncated or corrupt (the message names the file).
  """
  path = os.fspath(path)
  with open(path, "rb") as fh:
    head = fh.read(4)
  try:
    if head[:2] == b"PK":
      return _read_zip(path)
    with open(path, "rb") as fh:
      return _read_legacy(fh.read())
  except OSError:
    raise
  except (ValueError, pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, AttributeError,
          struct.error, UnicodeDecodeError, OverflowError, zipfile.BadZipFile) as e:
    what = str(e) if isinstance(e, ValueError) else f"truncated or corrupt pickle ({type(e).__name__}: {e})"
    raise ValueError(f"{path}: {what}") from None


def load_state_dict(path: str | os.PathLike, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """The tensors of a saved state_dict, by name.

  Args:
    path: a torch.save file holding a state_dict, or a dict with one under `key`.
    key: the entry holding the state_dict (e.g. 'state_dict'); None for the file itself, or its
      'state_dict' entry when the file is a checkpoint dict that has one.
  Returns:
    {name: array} in the saved order; non-tensor entries (e.g. `_extra_state`) are left out.
  Raises:
    ValueError: the file is unreadable or holds no such state_dict.
  """
  obj = load(path)
  if key is None and isinstance(obj, Mapping) and "state_dict" in obj and not isinstance(obj["state_dict"],
                                                                                          np.ndarray):
    key = "state_dict"
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
      raise ValueError(f"{path}: no entry {key!r} (has {keys})")
    obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
  state = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not state:
    raise ValueError(f"{path}: the state_dict holds no tensors")
  return state


if __name__ == "__main__":   # quick look at a file: python -m vaebm_jax.torch_pickle FILE
  for name, value in load_state_dict(sys.argv[1]).items():
    print(f"{name:60s} {value.dtype} {value.shape}")
