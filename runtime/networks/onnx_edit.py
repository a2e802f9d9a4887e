"""Nodes and initializers added to an ONNX graph, and node inputs rewired, on the protobuf wire
format (the runtime has no ``onnx`` dependency; ``onnx_weights.py`` reads, this writes).

A ``ModelProto`` holds its graph in field 7; a ``GraphProto`` its nodes in field 1 and its
initializers in field 5. An edit copies every field of the model and the graph as it is, except:
the nodes whose inputs change (re-encoded with the new names), the new nodes (each written just
before a node given, so the graph stays in topological order) and the new initializers (appended),
and the graph's own length prefix. Fields written here::

    NodeProto       input 1, output 2, name 3, op_type 4, attribute 5, domain 7
    AttributeProto  name 1, f 2 (fixed32), i 3 (varint), type 20 (FLOAT 1, INT 2)
    TensorProto     dims 1, data_type 2, name 8, raw_data 9
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks.onnx_weights import _varint

DATA_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.int64): 7}


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement, as protobuf writes it
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(data)) + data


def _string(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode("utf-8"))


def attribute(name: str, value: float | int) -> bytes:
    if isinstance(value, float):
        return _string(1, name) + _key(2, 5) + struct.pack("<f", value) + _key(20, 0) + _encode_varint(1)
    return _string(1, name) + _key(3, 0) + _encode_varint(int(value)) + _key(20, 0) + _encode_varint(2)


def node(op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> bytes:
    """One encoded ``NodeProto``."""
    out = b"".join(_string(1, i) for i in inputs) + b"".join(_string(2, o) for o in outputs)
    out += _string(3, name) + _string(4, op_type)
    out += b"".join(_bytes_field(5, attribute(k, v)) for k, v in attrs.items())
    return out + (_string(7, domain) if domain else b"")


def tensor(name: str, value: np.ndarray) -> bytes:
    """One encoded ``TensorProto`` holding ``value`` in raw_data."""
    value = np.ascontiguousarray(value)
    if value.dtype not in DATA_TYPES:
        raise SdrtError(f"cannot write an initializer of dtype {value.dtype}")
    dims = b"".join(_key(1, 0) + _encode_varint(d) for d in value.shape)
    return dims + _key(2, 0) + _encode_varint(DATA_TYPES[value.dtype]) + _string(8, name) + \
        _bytes_field(9, value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def _raw_fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length), field start, field end) of a message."""
    i = start
    while i < end:
        first = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value = (i, n)
            i += n
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field past the message's end")
        yield number, wire, value, first, i


@dataclass(frozen=True)
class Node:
    index: int
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[0] + span[1]]).decode("utf-8", "replace")


def _graph_field(buf) -> tuple[int, int, int, int]:
    """(field start, value start, value length, field end) of ModelProto.graph."""
    for number, wire, value, first, last in _raw_fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            return first, value[0], value[1], last
    raise ValueError("no graph")


def read_nodes(data) -> list[Node]:
    """The graph's nodes in file order (op type, inputs, outputs)."""
    out = []
    with memoryview(data) as buf:
        _, a, n, _ = _graph_field(buf)
        for number, wire, value, _, _ in _raw_fields(buf, a, a + n):
            if number != 1 or wire != 2:
                continue
            op, inputs, outputs = "", [], []
            for n2, w2, v2, _, _ in _raw_fields(buf, value[0], value[0] + value[1]):
                if w2 != 2:
                    continue
                if n2 == 1:
                    inputs.append(_text(buf, v2))
                elif n2 == 2:
                    outputs.append(_text(buf, v2))
                elif n2 == 4:
                    op = _text(buf, v2)
            out.append(Node(len(out), op, tuple(inputs), tuple(outputs)))
    return out


@dataclass
class GraphEdit:
    """Nodes to add (before the node of a given index), node inputs to rename (node index -> input
    position -> new name) and initializers to add, applied to a model's bytes by ``apply``."""

    before: dict[int, list[bytes]]
    renames: dict[int, dict[int, str]]
    initializers: list[bytes]

    def apply(self, data: bytes) -> bytes:
        buf = memoryview(data)
        try:
            g_first, a, n, g_last = _graph_field(buf)
            parts, index = [], 0
            for number, wire, value, first, last in _raw_fields(buf, a, a + n):
                if number == 1 and wire == 2:
                    parts += [_bytes_field(1, encoded) for encoded in self.before.get(index, ())]
                    if index in self.renames:
                        parts.append(_bytes_field(1, self._renamed(buf, value, self.renames[index])))
                    else:
                        parts.append(bytes(buf[first:last]))
                    index += 1
                else:
                    parts.append(bytes(buf[first:last]))
        except ValueError as e:
            raise SdrtError(f"not a readable ONNX graph ({e})") from None
        parts += [_bytes_field(5, t) for t in self.initializers]
        graph = b"".join(parts)
        return bytes(buf[:g_first]) + _bytes_field(7, graph) + bytes(buf[g_last:])

    @staticmethod
    def _renamed(buf, span, renames: dict[int, str]) -> bytes:
        out, position = [], 0
        for number, wire, value, first, last in _raw_fields(buf, span[0], span[0] + span[1]):
            if number == 1 and wire == 2:
                out.append(_string(1, renames[position]) if position in renames else bytes(buf[first:last]))
                position += 1
            else:
                out.append(bytes(buf[first:last]))
        return b"".join(out)
