"""Reading and writing weight files without torch.

- `.safetensors`: the safetensors numpy API; bf16 (which numpy lacks) is read from the raw buffer.
- torch zip pickles (`.ckpt/.pt/.bin/.pth` written by `torch.save` since torch 1.6): a restricted
  unpickler that admits only the globals a tensor file needs and reads storages straight from the
  zip's `data/` entries. Nothing in the file can run code.
- MindSpore `.ckpt` (protobuf) through `mindspore.load_checkpoint`.

The format is told by content, not by extension: SD checkpoints named `.ckpt` are torch zips while
mindone's `.ckpt` are protobuf.
"""
import collections
import contextlib
import json
import os
import pickle
import struct
import tempfile
import zipfile

import numpy as np

from ldm.errors import UserInputError


class CheckpointError(UserInputError):
    """A weight file that cannot be read; the message is one line naming the file."""


class UnsafeCheckpointError(CheckpointError):
    """A torch pickle that references a global a weight file has no business with."""


def _bf16_to_f32(raw_u16):
    """bfloat16 bit patterns (uint16) -> float32: bf16 is the top half of a float32."""
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _safetensors_header(path):
    """The JSON header, after checking it is whole and every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {name} ends past the end)")
    return header, 8 + n


def _load_safetensors(path):
    from safetensors import safe_open

    header, data_start = _safetensors_header(path)
    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                info = header[name]
                if info["dtype"] == "BF16":
                    begin, end = info["data_offsets"]
                    raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
                    out[name] = _bf16_to_f32(raw.reshape(info["shape"]))
                else:
                    out[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error type for any malformed file
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return out


def read_safetensors_metadata(path):
    """The `__metadata__` string map of a safetensors file ({} when absent)."""
    header, _ = _safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def save_safetensors(tensors, path, metadata=None):
    """Write `{name: ndarray}` to `path` atomically (contiguous copies, string metadata)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(arrays, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)


# ---------------------------------------------------------------------------------------------- torch pickles

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
    """What `torch.<X>Storage` resolves to: only its element type matters."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, array, is_bf16):
        self.array = array
        self.is_bf16 = is_bf16


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, materialized as a numpy array."""
    array = storage.array
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
        raise ValueError(f"bad tensor geometry size={size} stride={stride} offset={storage_offset}")
    if all(size):
        # as_strided trusts its arguments: a crafted file must not make it read outside the storage
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= array.size:
            raise ValueError(f"tensor of size {size} reaches element {last} of a storage of {array.size}")
        view = np.lib.stride_tricks.as_strided(
            array[storage_offset:], shape=size, strides=[s * array.itemsize for s in stride], writeable=False)
        out = np.array(view)
    else:
        out = np.zeros(size, dtype=array.dtype)
    if storage.is_bf16:
        return _bf16_to_f32(out)
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


def _rebuild_parameter(data, *_ignored):
    return data


class _ParameterDict(dict):
    """`torch.nn.ParameterDict` (original textual_inversion embeddings): its `_parameters` as a dict."""

    def __setstate__(self, state):
        self.update(state.get("_parameters") or {})


class _Record:
    """Inert stand-in for training bookkeeping objects (Lightning callbacks): keeps the state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


def _encode(text, encoding="latin1"):
    # numpy scalars pickled with protocol 2 carry their bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_scalar(dtype, data):
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    # plain data that SD training checkpoints and original TI embeddings carry next to the weights
    ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Record,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, path, load_storage):
        super().__init__(fileobj)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(
            f"{self._path}: refused: the pickle references {module}.{name}, which a weight file does not need "
            "(loading it could run code); convert the file to .safetensors from a trusted environment")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._path}: refused: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(storage_type, str(key), int(numel))


def _zip_member_array(path, zf, info, dtype):
    """The bytes of a zip member as an array; stored (uncompressed) members are memory-mapped."""
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(zf.read(info), dtype=dtype)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    count = info.file_size // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(count,))


def load_torch_pickle(path):
    """Unpickle a torch zip checkpoint with tensors as numpy arrays (bf16 -> float32), running no code."""
    path = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a torch zip checkpoint ({e})") from None
    with zf:
        pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (no single data.pkl in the zip)")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        storages = {}

        def load_storage(storage_type, key, numel):
            if key not in storages:
                member = prefix + "data/" + key
                if member not in names:
                    raise CheckpointError(f"{path}: storage {key} is missing from the zip")
                dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
                array = _zip_member_array(path, zf, zf.getinfo(member), dtype)
                if array.size < numel:
                    raise CheckpointError(f"{path}: storage {key} is truncated")
                storages[key] = _Storage(array, storage_type.name == "BFloat16Storage")
            return storages[key]

        try:
            with zf.open(pkl[0]) as f:
                obj = _RestrictedUnpickler(f, path, load_storage).load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from None
    return obj


# ---------------------------------------------------------------------------------------------- MindSpore

def _load_mindspore(path):
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    out = {}
    for name, p in params.items():
        if p.dtype == ms.bfloat16:
            p = p.astype(ms.float32)
        out[name] = p.asnumpy()
    return out


# ---------------------------------------------------------------------------------------------- entry points

def sniff_format(path):
    """'safetensors', 'torch-zip', 'mindspore', 'legacy-pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "legacy-pickle"
    # a MindSpore checkpoint is a protobuf `Checkpoint` whose first field (repeated `value`) has tag 0x0a
    if head[:1] == b"\x0a":
        return "mindspore"
    return "unknown"


def load_state_dict(path):
    """`{name: np.ndarray}` from a safetensors, torch zip or MindSpore file; `{"state_dict": ...}` unwrapped."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    kind = sniff_format(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "mindspore":
        return _load_mindspore(path)
    if kind == "legacy-pickle":
        raise CheckpointError(f"{path}: pre-1.6 torch pickle format is not supported; re-save it as .safetensors")
    if kind != "torch-zip":
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors, torch zip nor MindSpore)")
    obj = load_torch_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temp path next to `path`; it replaces `path` only if the body succeeds, else it is removed.

    The file gets the mode a plain `open(path, "w")` would give (0644 under the usual umask), not
    mkstemp's 0600 or the 0400 MindSpore's save_checkpoint sets.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
