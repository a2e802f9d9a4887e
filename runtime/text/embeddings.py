"""Textual inversion embeddings, read without torch, found by name in the prompt as the webui finds them.

Files: the webui's ``.pt`` (``{"string_to_param": {"*": tensor[n, width]}, "name", "step", ...}``,
also with an ``nn.ParameterDict`` as old trainers saved it), diffusers concept ``.bin``
(``{"<token>": tensor[width]}``), both torch zip pickles, and ``.safetensors`` holding one tensor
(``emb_params`` or any other key), or SDXL's two (``clip_l`` and ``clip_g``, one per text
encoder). Pickles go through an unpickler that builds only tensors and
plain containers; any other global in the file is refused by name, so loading an embedding can
never run code. Tensors are read straight from the zip members.

An embedding's name is its file stem. As in the webui (``EmbeddingDatabase``) the name is matched
in token space: it is tokenized like prompt text, and at each prompt token the longest name whose
tokens start there wins. Files are only opened once a prompt names them (the webui loads every
file at start-up); a file that is unsafe, malformed, or of the wrong width is then refused with a
one-line error (the webui logs it and leaves the name as plain text).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

EXTENSIONS = (".pt", ".bin", ".safetensors")
MAX_FILE_BYTES = 256 << 20  # embeddings are kilobytes; refuse to read checkpoints by mistake
MAX_VECTORS = 75  # one chunk: the webui cannot place more either


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    path: Path
    vectors: np.ndarray  # [n, width] float32
    step: int | None
    sha256: str

    @property
    def shorthash(self) -> str:
        """The first 12 hex digits of the file's sha256, as the webui's ``TI hashes`` write it."""
        return self.sha256[:12]


# -- reading tensors without torch --

_BF16 = "bfloat16"  # numpy has no bfloat16: read as uint16 and widen
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8", "BFloat16Storage": _BF16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": _BF16, "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}  # (IA)^3 files hold on_input as BOOL


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == _BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def _itemsize(dtype: str) -> int:
    return 2 if dtype == _BF16 else np.dtype(dtype).itemsize


def _raw_dtype(dtype: str) -> str:
    return "<u2" if dtype == _BF16 else dtype


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:
    __slots__ = ("data", "dtype")

    def __init__(self, data: np.ndarray, dtype: str):
        self.data, self.dtype = data, dtype


class _ParameterDict:
    """Stands in for ``torch.nn.ParameterDict``: unpickling fills ``__dict__`` (``_parameters``)."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """``torch._utils._rebuild_tensor_v2``: a strided view of a storage, bounds-checked, copied."""
    if not isinstance(storage, _Storage):
        raise ValueError("tensor without a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError("malformed tensor layout")
    if math.prod(size) > MAX_FILE_BYTES:
        raise ValueError("tensor too large for an embedding")
    n = len(storage.data)
    if 0 not in size and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= n:
        raise ValueError("tensor reaches past its storage")
    item = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[offset:] if offset < n else storage.data[:0],
                                           shape=size, strides=[s * item for s in stride], writeable=False)
    return np.array(_widen(view, storage.dtype))


def _rebuild_parameter(data, *_):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Builds tensors, dicts, lists, tuples and scalars from a torch zip pickle, nothing else."""

    _GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            self.byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocol 2 spells it the Python 2 way
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise SdrtError(f"{self.source}: refusing to load {module}.{name} (a weights file holds only tensors "
                        "and plain containers)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise SdrtError(f"{self.source}: unsupported storage reference in the pickle")
        dtype, key, numel = pid[1].dtype, str(pid[2]), int(pid[4])
        member = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise SdrtError(f"{self.source}: missing tensor data {member}") from None
        nbytes = numel * _itemsize(dtype)
        if numel < 0 or info.file_size < nbytes or info.file_size > MAX_FILE_BYTES:
            raise SdrtError(f"{self.source}: tensor data {member} has the wrong size")
        raw = np.frombuffer(self.archive.read(member)[:nbytes], dtype=_raw_dtype(dtype))
        if self.byteorder == "big":
            raw = raw.byteswap()
        return _Storage(raw, dtype)


def read_torch_pickle(path: Path):
    """The object in a torch zip file (``torch.save``), tensors as numpy arrays, without torch."""
    if not zipfile.is_zipfile(path):
        raise SdrtError(f"{path}: not a zip-format torch file (saved by torch < 1.6?); convert it to "
                        ".safetensors")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise SdrtError(f"{path}: not a torch file (expected one data.pkl, found {len(pickles)})")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            try:
                return _TorchUnpickler(f, archive, prefix, path).load()
            except SdrtError:
                raise
            except Exception as e:  # truncated or corrupt pickles raise anything
                raise SdrtError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file (8-byte header size, JSON header, raw data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise SdrtError(f"{path}: not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise SdrtError(f"{path}: not a safetensors file (bad header)") from None
        data = f.read()
    if not isinstance(header, dict):
        raise SdrtError(f"{path}: not a safetensors file (bad header)")
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES or not _naturals(shape)
                or not _naturals(offsets) or len(offsets) != 2):
            raise SdrtError(f"{path}: unsupported or malformed tensor {key!r}")
        dtype, (begin, end) = _SAFETENSORS_DTYPES[dtype], offsets
        # Python's integers: a shape whose product overflows int64 is simply too large
        if not begin <= end <= len(data) or end - begin != math.prod(shape) * _itemsize(dtype):
            raise SdrtError(f"{path}: tensor {key!r} has the wrong size")
        raw = np.frombuffer(data[begin:end], dtype=_raw_dtype(dtype)).reshape(shape)
        out[key] = np.array(_widen(raw, dtype))
    return out


def _naturals(values) -> bool:
    """Whether ``values`` is a JSON list of non-negative integers (a shape, data offsets)."""
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                            for v in values)


# -- embeddings --


def _vectors_of(data, path: Path, key: str | None = None) -> tuple[np.ndarray, int | None]:
    """The embedding tensor of a loaded file, as the webui's ``create_embedding_from_data`` finds it.

    ``key``: for SDXL's text encoders, ``clip_l`` or ``clip_g``, the part of an SDXL embedding
    (``{"clip_l": [n, 768], "clip_g": [n, 1280]}``) that encoder takes (the webui's
    ``textual_inversion_key``); other files are refused then, as the webui skips them for their
    width."""
    step = None
    sdxl = isinstance(data, dict) and "clip_g" in data and "clip_l" in data
    if key is not None:
        if not sdxl:
            raise SdrtError(f"{path}: an SD 1.x/2.x embedding; this SDXL model takes SDXL embeddings "
                            "(clip_l + clip_g)")
        shapes = {k: getattr(data[k], "shape", None) for k in ("clip_l", "clip_g")}
        if any(s is None or len(s) != 2 for s in shapes.values()) or shapes["clip_l"][0] != shapes["clip_g"][0]:
            raise SdrtError(f"{path}: an SDXL embedding's clip_l and clip_g are [vectors, width] with as many "
                            f"vectors; these are {', '.join(f'{k} {list(s or [])}' for k, s in shapes.items())}")
        vectors = data[key]
    elif isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict from old trainers
        if not isinstance(params, dict) or len(params) != 1:
            raise SdrtError(f"{path}: an embedding file holds one term; this one holds "
                            f"{len(params) if isinstance(params, dict) else 'no'} terms")
        vectors = next(iter(params.values()))
        step = data.get("step")
    elif sdxl:
        raise SdrtError(f"{path}: an SDXL embedding (clip_l + clip_g); this model takes SD 1.x/2.x embeddings")
    elif isinstance(data, dict) and data and isinstance(next(iter(data.values())), np.ndarray):
        if len(data) != 1:
            raise SdrtError(f"{path}: an embedding file holds one tensor; this one holds {len(data)} "
                            f"({', '.join(map(str, data))})")
        vectors = next(iter(data.values()))
    else:
        raise SdrtError(f"{path}: neither a textual inversion embedding nor a diffusers concept")
    if not isinstance(vectors, np.ndarray) or vectors.dtype.kind != "f":
        raise SdrtError(f"{path}: the embedding is not a floating-point tensor")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not len(vectors):
        raise SdrtError(f"{path}: an embedding is [vectors, width], this one is {list(vectors.shape)}")
    return np.ascontiguousarray(vectors, dtype=np.float32), (int(step) if isinstance(step, int) else None)


def load_embedding(path: str | os.PathLike, name: str | None = None, key: str | None = None) -> Embedding:
    """One embedding file; its name defaults to the file stem (as in the webui, even for ``.pt``
    files that carry a ``name``). ``key``: the SDXL encoder's part (``_vectors_of``)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SdrtError(f"{path}: {size >> 20} MiB is too large for an embedding")
    if path.suffix.lower() == ".safetensors":
        data = read_safetensors(path)
    else:
        data = read_torch_pickle(path)
    vectors, step = _vectors_of(data, path, key)
    if not np.all(np.isfinite(vectors)):
        raise SdrtError(f"{path}: the embedding holds NaN or infinite values")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return Embedding(name or path.stem, path, vectors, step, h.hexdigest())


class EmbeddingLibrary:
    """The embeddings of one or more folders (searched recursively), by file stem.

    ``find(tokens, i)`` is the webui's ``find_embedding_at_position``: the embedding whose
    tokenized name starts at ``tokens[i]``, longest name first. Where two files share a stem the
    one later in sorted path order wins (the webui: the one its directory walk loads last).
    """

    def __init__(self, folders, tokenizer, width: int | None = None, key: str | None = None):
        self.width = width
        self.key = key  # SDXL: clip_l or clip_g, the part of SDXL embedding files this encoder takes
        self.paths: dict[str, Path] = {}
        for folder in [folders] if isinstance(folders, (str, os.PathLike)) else folders:
            folder = Path(folder)
            if not folder.is_dir():
                raise SdrtError(f"embeddings folder {folder} does not exist")
            for root, dirs, files in os.walk(folder, followlinks=True):
                dirs.sort()
                for fn in sorted(files):
                    p = Path(root) / fn
                    if p.suffix.lower() in EXTENSIONS and p.stat().st_size > 0:
                        self.paths[p.stem] = p
        self._by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.paths:
            ids = tokenizer.encode(name)
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for matches in self._by_first.values():
            matches.sort(key=lambda m: len(m[0]), reverse=True)
        self._loaded: dict[str, Embedding] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def get(self, name: str) -> Embedding:
        """The embedding called ``name``, loaded on first use and checked against the model."""
        if name not in self._loaded:
            emb = load_embedding(self.paths[name], name, self.key)
            n, width = emb.vectors.shape
            if self.width is not None and width != self.width:
                raise SdrtError(f"embedding {name!r} ({emb.path.name}) has {width}-wide vectors; this model's "
                                f"text encoder takes {self.width}-wide ones")
            if n > MAX_VECTORS:
                raise SdrtError(f"embedding {name!r} has {n} vectors; at most {MAX_VECTORS} fit a prompt chunk")
            self._loaded[name] = emb
        return self._loaded[name]

    def find(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """(embedding, number of prompt tokens its name spans) at ``tokens[position]``, or None."""
        for ids, name in self._by_first.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return self.get(name), len(ids)
        return None
