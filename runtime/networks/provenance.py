"""Provenance: which source weight each graph initializer holds, and how it was transformed.

The exporter (``sdrt.export.provenance``) writes ``<component>/provenance.json`` by comparing
every initializer's *data* with the component's source tensors (the diffusers state dict), so no
name table links graph weights to model weights. The runtime reads it to put merged weights
(LoRA, a swapped VAE) into a graph without re-exporting it::

    {"format": "sdrt-provenance", "version": 1, "component": "unet",
     "sources": {"<diffusers key>": {"shape": [...], "ldm": "<single-file key>"}},
     "graphs": {"model.onnx": {"quantized": false, "initializers": {
         "<initializer>": {"from": [["<diffusers key>", "transpose"]]},             # one source
         "<initializer>": {"from": [["<k1>", "identity"], ["<k2>", "identity"]], "axis": 0},  # concat
         "<initializer>": {"from": [["<k1>", "identity"]], "same": ["<k2>"]}}}}}     # equal data

An int8 graph (``"quantized": true``) also holds, for each quantized weight, the float initializer
of the component's float graph it was quantized from and the quantization
(:mod:`sdrt.runtime.networks.quantized`)::

    "quantization": {"<W>_quantized": {"graph": "model.cpu.onnx", "initializer": "<W>",
        "transpose": false, "scale": "<W>_scale", "zero_point": "<W>_zero_point", "dtype": "int8",
        "range": [-127, 127], "symmetric": true, "axis": null, "rounding": "half to even",
        "bias": {"quantized": "<B>_quantized", "initializer": "<B>", "input_scale": "<x>_scale"}}},
    "unrecorded": ["<quantized initializers no float weight reproduced>"]

Bundles exported before this record existed have no ``quantization``: a LoRA on their quantized
weights asks for a re-export.

A transform is ``identity`` (same shape), ``reshape`` (same values in C order, another shape) or
``transpose`` (a 2-D weight transposed, as torch exports ``Linear`` for ``MatMul``); the dtype
may differ (a float16 graph holds the source cast). A concat holds its parts along ``axis``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks.quantized import DTYPES, Scheme

FORMAT = "sdrt-provenance"
VERSION = 1
FILENAME = "provenance.json"
TRANSFORMS = ("identity", "reshape", "transpose")


def to_graph(source: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """A source-layout array in the initializer's layout."""
    if transform == "transpose":
        source = source.reshape(source.shape[0], -1).T
    return np.ascontiguousarray(source).reshape(shape)


def to_source(graph: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """An initializer's value (or its part of a concat) in the source layout."""
    if transform == "transpose":
        return np.ascontiguousarray(graph.reshape(graph.shape[0], -1).T).reshape(shape)
    return graph.reshape(shape)


@dataclass(frozen=True)
class Entry:
    """One initializer's origin: its parts (source key, transform), their concat axis, and
    further source keys whose values are the same (the exporter keeps one copy of equal tensors)."""

    parts: tuple[tuple[str, str], ...]
    axis: int | None = None
    same: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.parts) + self.same


@dataclass(frozen=True)
class Quantized:
    """One quantized weight: the float initializer ``initializer`` of the float graph ``graph``
    (transposed first when ``transpose``), quantized by ``scheme`` into the initializer the record
    is keyed by, with its ``scale`` and ``zero_point`` initializers; ``bias``: (int32 bias
    initializer, the float bias initializer of ``graph``, the input scale initializer) of a
    QLinearConv, whose bias scale is the input scale times the weight's."""

    graph: str
    initializer: str
    transpose: bool
    scale: str
    zero_point: str
    scheme: Scheme
    bias: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class GraphProvenance:
    initializers: dict[str, Entry]
    quantized: bool
    quantization: dict[str, Quantized] | None = field(default=None)  # None: exported before the record

    def by_source(self) -> dict[str, list[str]]:
        """Source key -> the initializers holding it."""
        out: dict[str, list[str]] = {}
        for name, entry in self.initializers.items():
            for key in entry.keys:
                out.setdefault(key, []).append(name)
        return out


@dataclass(frozen=True)
class Provenance:
    component: str
    sources: dict[str, tuple[tuple[int, ...], str | None]]  # key -> (shape, LDM key)
    graphs: dict[str, GraphProvenance]  # by graph file name

    def graph(self, path: Path) -> GraphProvenance:
        g = self.graphs.get(Path(path).name)
        if g is None:
            raise SdrtError(f"{path}: no provenance for this graph (re-export the bundle with this sdrt)")
        return g

    def shape(self, key: str) -> tuple[int, ...]:
        return self.sources[key][0]


def load(component_dir: Path) -> Provenance:
    """The provenance of a bundle component; a one-line error for bundles exported without it."""
    path = Path(component_dir) / FILENAME
    if not path.exists():
        raise SdrtError(f"{component_dir} has no {FILENAME} (bundles exported before sdrt applied LoRA and VAE "
                        f"files lack it): re-export the bundle with sdrt export to use them")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError("unknown format or version")
        sources = {k: (tuple(int(x) for x in v["shape"]), v.get("ldm")) for k, v in d["sources"].items()}
        graphs = {}
        for name, g in d["graphs"].items():
            entries = {}
            for init, e in g["initializers"].items():
                parts = tuple((str(k), str(t)) for k, t in e["from"])
                if not parts or any(t not in TRANSFORMS or k not in sources for k, t in parts):
                    raise ValueError(f"bad entry for {init}")
                axis = e.get("axis")
                same = tuple(str(k) for k in e.get("same", ()))
                if (len(parts) > 1) != (axis is not None) or any(k not in sources for k in same):
                    raise ValueError(f"bad entry for {init}")
                entries[init] = Entry(parts, None if axis is None else int(axis), same)
            graphs[name] = GraphProvenance(entries, bool(g.get("quantized", False)), _quantization(g))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SdrtError(f"{path}: unreadable provenance ({e}); re-export the bundle") from None
    return Provenance(str(d.get("component", Path(component_dir).name)), sources, graphs)


def _quantization(g: dict) -> dict[str, Quantized] | None:
    if "quantization" not in g:
        return None
    out = {}
    for name, r in g["quantization"].items():
        low, high = (int(x) for x in r["range"])
        axis = r.get("axis")
        if r["dtype"] not in DTYPES or not low <= 0 <= high or Path(r["graph"]).name != r["graph"]:
            raise ValueError(f"bad quantization of {name}")
        bias = r.get("bias")
        out[name] = Quantized(str(r["graph"]), str(r["initializer"]), bool(r.get("transpose", False)), str(r["scale"]),
                              str(r["zero_point"]),
                              Scheme(r["dtype"], low, high, bool(r["symmetric"]), None if axis is None else int(axis)),
                              None if bias is None else (str(bias["quantized"]), str(bias["initializer"]),
                                                         str(bias["input_scale"])))
    return out


def check_graph(prov: Provenance, graph: GraphProvenance, index: dict, path: Path) -> None:
    """The provenance fits the graph file (``index``: its initializers by name): every initializer
    it names is there, with as many elements as its parts; a one-line error otherwise."""
    for name, entry in graph.initializers.items():
        t = index.get(name)
        parts = sum(math.prod(prov.shape(k)) for k, _ in entry.parts)
        same = all(math.prod(prov.shape(k)) == parts for k in entry.same)
        if t is None or t.size != parts or not same or (entry.axis is not None and entry.axis >= len(t.dims)):
            raise SdrtError(f"{path}: its provenance does not match the graph ({name}); re-export the bundle")


def split_parts(value: np.ndarray, entry: Entry, prov: Provenance) -> list[np.ndarray]:
    """An initializer's value cut into its parts, each in its source's layout."""
    if entry.axis is None:
        key, transform = entry.parts[0]
        return [to_source(value, transform, prov.shape(key))]
    sizes = [math.prod(prov.shape(k)) // math.prod(value.shape[:entry.axis] + value.shape[entry.axis + 1:])
             for k, _ in entry.parts]
    pieces = np.split(value, np.cumsum(sizes)[:-1], axis=entry.axis)
    return [to_source(p, t, prov.shape(k)) for p, (k, t) in zip(pieces, entry.parts)]


def join_parts(parts: list[np.ndarray], entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
    """Source-layout parts back into the initializer's layout."""
    if entry.axis is None:
        return to_graph(parts[0], entry.parts[0][1], shape)
    rest = math.prod(shape) // shape[entry.axis]  # elements per index along the axis
    part_shape = list(shape)
    graphs = []
    for p, (_, t) in zip(parts, entry.parts):
        part_shape[entry.axis] = p.size // rest
        graphs.append(to_graph(p, t, tuple(part_shape)))
    return np.concatenate(graphs, axis=entry.axis)
