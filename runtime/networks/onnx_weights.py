"""A graph's initializers read straight from the ONNX file, without the ``onnx`` package.

The runtime depends on ONNX Runtime only, which cannot hand back a graph's weights. The few
protobuf fields needed here are read off the wire format directly: ``ModelProto.graph`` (7),
``GraphProto.initializer`` (5) and, in each ``TensorProto``, ``dims`` (1), ``data_type`` (2),
``float_data`` (4), ``int32_data`` (5, float16 bit patterns), ``name`` (8), ``raw_data`` (9),
``external_data`` (13: ``location`` / ``offset`` / ``length``) and ``data_location`` (14).
Everything else (nodes, attributes) is skipped by its length. Values are read from a memory map
of the file (and of its external data file), so only the tensors asked for are touched.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError

# TensorProto.DataType -> numpy (the types sdrt's graphs hold)
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
          10: np.float16, 11: np.float64}
FLOAT_TYPES = (1, 10, 11)


@dataclass(frozen=True)
class Initializer:
    """Where one initializer's bytes are: ``data`` (a span of the graph file) or external data."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    external: bool
    span: tuple[int, int] | None = None  # (offset, length) of raw_data / float_data in the graph file
    field: int = 9  # the TensorProto field the span holds (9 raw_data, 4 float_data, 5 int32_data)
    location: str | None = None  # external data file, relative to the graph's folder
    offset: int = 0
    length: int | None = None

    @property
    def dtype(self):
        return DTYPES.get(self.data_type)

    @property
    def is_float(self) -> bool:
        return self.data_type in FLOAT_TYPES

    @property
    def size(self) -> int:
        return math.prod(self.dims)


def _varint(buf, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _packed_int32(data: np.ndarray) -> np.ndarray:
    """A packed ``repeated int32`` field's values (varints; negative ones take ten bytes)."""
    buf, out, i = bytes(data), [], 0
    while i < len(buf):
        value, i = _varint(buf, i)
        out.append(value - (1 << 64) if value >= 1 << 63 else value)
    return np.array(out, np.int64).astype(np.int32)


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of one message's fields."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("length past the message's end")
            yield number, wire, (i, n)
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field past the message's end")


def _tensor(buf, start: int, end: int) -> Initializer:
    dims, data_type, name, span, field, external = [], 0, "", None, 9, {}
    location = 0
    for number, wire, value in _fields(buf, start, end):
        if number == 1:
            if wire == 0:
                dims.append(value)
            else:  # packed
                a, n = value
                j = a
                while j < a + n:
                    d, j = _varint(buf, j)
                    dims.append(d)
        elif number == 2 and wire == 0:
            data_type = value
        elif number == 8 and wire == 2:
            name = bytes(buf[value[0]:value[0] + value[1]]).decode("utf-8", "replace")
        elif number in (4, 5, 9) and wire == 2:
            span, field = value, number
        elif number == 13 and wire == 2:
            k = v = ""
            for n2, w2, val in _fields(buf, value[0], value[0] + value[1]):
                if w2 == 2:
                    text = bytes(buf[val[0]:val[0] + val[1]]).decode("utf-8", "replace")
                    k, v = (text, v) if n2 == 1 else (k, text)
            external[k] = v
        elif number == 14 and wire == 0:
            location = value
    if location == 1:
        try:
            offset, length = int(external.get("offset", 0)), external.get("length")
            length = int(length) if length is not None else None
        except ValueError:
            raise ValueError(f"bad external data entry of {name}") from None
        return Initializer(name, tuple(dims), data_type, True, location=external.get("location"),
                           offset=offset, length=length)
    return Initializer(name, tuple(dims), data_type, False, span=span, field=field)


class GraphWeights:
    """The initializers of one ``.onnx`` file: ``index`` by name, ``read(name)`` their values."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        except OSError as e:
            raise SdrtError(f"cannot read {self.path}: {e.strerror or e}") from None
        self._external: dict[str, np.memmap] = {}
        try:
            self.index = self._parse()
        except ValueError as e:
            raise SdrtError(f"{self.path}: not a readable ONNX graph ({e})") from None

    def _parse(self) -> dict[str, Initializer]:
        buf = memoryview(self._map)
        out = {}
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number != 7 or wire != 2:
                continue
            a, n = value
            for n2, w2, v2 in _fields(buf, a, a + n):
                if n2 == 5 and w2 == 2:
                    t = _tensor(buf, v2[0], v2[0] + v2[1])
                    out[t.name] = t
        return out

    def read(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` (a read-only view where the bytes allow it)."""
        t = self.index[name]
        if t.dtype is None:
            raise SdrtError(f"{self.path}: initializer {name} has an unsupported data type {t.data_type}")
        if t.external:
            data = self._external_bytes(t)
        elif t.span is None:
            data = np.zeros(0, np.uint8)
        else:
            a, n = t.span
            data = np.frombuffer(self._map, np.uint8, n, a)
        if not t.external and t.field == 4:  # float_data: packed float32
            values = data.view(np.float32)
        elif not t.external and t.field == 5:  # int32_data: float16 / int8 values one per int32, packed varints
            ints = _packed_int32(data)
            values = ints.astype(t.dtype) if t.data_type != 10 else ints.astype(np.uint16).view(np.float16)
        else:
            values = data.view(t.dtype)
        if values.size != t.size:
            raise SdrtError(f"{self.path}: initializer {name} holds {values.size} values for shape {list(t.dims)}")
        return values.reshape(t.dims)

    def _external_bytes(self, t: Initializer) -> np.ndarray:
        location = t.location or ""
        target = (self.path.parent / location).resolve()
        if not location or Path(location).is_absolute() or self.path.parent.resolve() not in target.parents:
            raise SdrtError(f"{self.path}: initializer {t.name} names external data outside its folder")
        if location not in self._external:
            try:
                self._external[location] = np.memmap(target, np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise SdrtError(f"{self.path}: cannot read the external data {location} ({e})") from None
        data = self._external[location]
        length = t.length if t.length is not None else t.size * np.dtype(t.dtype).itemsize
        if t.offset < 0 or t.offset + length > len(data):
            raise SdrtError(f"{self.path}: initializer {t.name} reaches past the end of {location}")
        return data[t.offset:t.offset + length]
