"""``<hypernet:name:multiplier>`` tags: the webui's hypernetworks, put into the UNet graph as nodes.

A hypernetwork file (the webui's ``.pt``, ``modules/hypernetworks/hypernetwork.py``) maps context
widths to a pair of small MLPs, ``{768: (state_dict_k, state_dict_v), 320: ..., "layer_structure":
[1, 2, 1], "activation_func": "relu", "is_layer_norm": False, "dropout_structure": [...], ...}``.
In every attention of the UNet the webui takes the context (the text's for cross-attention, the
image tokens ``x`` themselves for self-attention: ``context = default(context, x)``), picks the
pair by the context's last dimension, and feeds the keys' projection ``to_k`` with
``context + k_mlp(context) * multiplier`` and the values' ``to_v`` with the same through the
value MLP; several hypernetworks apply in turn (``apply_hypernetworks``).

sdrt does the same inside the UNet graph: the ``to_k`` / ``to_v`` MatMuls are found by the
provenance of their weights (``...attn1.to_k.weight``; the context width is the weight's second
dimension), the MLPs are added as ONNX nodes in front of them (MatMul, Add, the activation,
LayerNormalization, then ``x + y * multiplier``; dropout is off at inference) with the file's
weights as initializers, and the session is made from the edited graph's bytes
(``onnx_edit.GraphEdit``). The MLP of a tensor several projections read (the text context all
cross-attentions share) is computed once per UNet run. Nothing is written to disk.
"""

from __future__ import annotations

import math
import mmap
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks import files, onnx_edit, provenance
from sdrt.runtime.networks.onnx_weights import GraphWeights
from sdrt.runtime.text.embeddings import read_torch_pickle

DEFAULT_HYPERNETWORK_DIR = Path("models/hypernetworks")
CACHE_SETS = 2  # edited graphs kept per session (the set in place and the one before)
_LN_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which the webui's modules use

# The webui's activation_dict: its own names ("swish" is torch's Hardswish) and every
# torch.nn activation class by its lower-case name; those without weights of their own are
# written here as ONNX ops (defaults of the torch classes, at inference). Others (PReLU, which
# has weights; Softmax, Softmin and LogSoftmax, which would normalize over the batch; GLU, which
# halves the width; Threshold and MultiheadAttention, which need arguments) are refused by name.
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "hardswish", "tanh", "sigmoid", "gelu", "silu",
               "mish", "softplus", "selu", "celu", "relu6", "hardtanh", "hardsigmoid", "softsign", "tanhshrink",
               "logsigmoid", "rrelu", "hardshrink", "softshrink")


# -- the file --

@dataclass(frozen=True)
class Layer:
    """One step of a module's ``linear`` Sequential: ``linear`` (weight [out, in], bias),
    ``norm`` (LayerNorm weight, bias) or ``act`` (the activation's name)."""

    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    activation: str | None = None


@dataclass(frozen=True)
class Module:
    dim: int
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Hypernetwork:
    path: Path
    modules: dict[int, tuple[Module, Module]]  # context width -> (keys' MLP, values' MLP)


def dropout_structure(layer_structure, use_dropout, last_layer_dropout) -> list[float]:
    """The webui's ``parse_dropout_structure`` for files that do not store one."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def layout(dim: int, structure: list[float], activation: str | None, layer_norm: bool, activate_output: bool,
           dropout: list[float]) -> list[tuple[str, tuple[int, ...] | str | None]]:
    """The webui's ``HypernetworkModule`` Sequential, step by step: Linear, the activation (not after
    the last Linear unless ``activate_output``), LayerNorm, Dropout (a step without weights that
    still takes its index in the state dict's keys)."""
    steps = []
    for i in range(len(structure) - 1):
        n_in, n_out = int(dim * structure[i]), int(dim * structure[i + 1])
        steps.append(("linear", (n_out, n_in)))
        if not (activation in ("linear", None) or (i >= len(structure) - 2 and not activate_output)):
            steps.append(("act", activation))
        if layer_norm:
            steps.append(("norm", (n_out,)))
        if dropout[i + 1] > 0:
            steps.append(("dropout", None))
    return steps


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise SdrtError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(2) == b"PK":  # a zip whose end (its directory) is cut off
                raise SdrtError(f"{path}: truncated or corrupt torch file (its zip directory is missing)")
    obj = read_torch_pickle(path)
    if not isinstance(obj, dict):
        raise SdrtError(f"{path}: not a hypernetwork (a {type(obj).__name__}, not a dict)")
    return obj


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """A webui hypernetwork file as the webui's ``Hypernetwork.load`` reads it (its defaults for
    missing settings; old ``linear1`` / ``linear2`` keys renamed by ``fix_old_state_dict``); a
    one-line error naming the file and key for anything the webui's strict load would refuse (the
    webui logs such a file and generates without it; sdrt stops: docs/DIFFERENCES.md)."""
    path = Path(path)
    d = _read_file(path)
    structure = d.get("layer_structure", [1, 2, 1]) or [1, 2, 1]
    activation = d.get("activation_func")
    try:
        structure = [float(x) for x in structure]
    except (TypeError, ValueError):
        raise SdrtError(f"{path}: layer_structure {structure!r} is not a list of numbers") from None
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise SdrtError(f"{path}: layer_structure {structure} must start and end with 1")
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        raise SdrtError(f"{path}: activation_func {activation!r} is not supported (supported: "
                        f"{', '.join(ACTIVATIONS)})")
    drop = d.get("dropout_structure")
    use_dropout = True if drop is not None and any(drop) else bool(d.get("use_dropout", False))
    if drop is None:
        drop = dropout_structure(structure, use_dropout, bool(d.get("last_layer_dropout", False)))
    if not isinstance(drop, (list, tuple)) or len(drop) < len(structure):
        raise SdrtError(f"{path}: dropout_structure {drop!r} does not fit layer_structure {structure}")
    layer_norm, activate_output = bool(d.get("is_layer_norm", False)), bool(d.get("activate_output", True))
    modules = {}
    for size, pair in d.items():
        if not isinstance(size, int) or isinstance(size, bool):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise SdrtError(f"{path}: key {size}: expected a pair of state dicts (keys, values)")
        steps = layout(size, structure, activation, layer_norm, activate_output, drop)
        modules[size] = tuple(_module(path, f"{size}/{kv}", size, steps, state)
                              for kv, state in zip("kv", pair))
    if not modules:
        raise SdrtError(f"{path}: not a hypernetwork (no module for any context width)")
    return Hypernetwork(path, modules)


def _module(path: Path, where: str, dim: int, steps, state: dict) -> Module:
    state = dict(state)
    for old, new in (("linear1", "linear.0"), ("linear2", "linear.1")):  # fix_old_state_dict
        for part in ("weight", "bias"):
            if f"{old}.{part}" in state:
                state[f"{new}.{part}"] = state.pop(f"{old}.{part}")
    layers, expected = [], set()
    for i, (kind, shape) in enumerate(steps):
        if kind == "act":
            layers.append(Layer("act", activation=shape))
        if kind not in ("linear", "norm"):
            continue
        values = []
        for part, want in (("weight", shape), ("bias", shape[:1])):
            key = f"linear.{i}.{part}"
            expected.add(key)
            value = state.get(key)
            if not isinstance(value, np.ndarray):
                raise SdrtError(f"{path}: {where}: {key} is missing")
            if tuple(value.shape) != tuple(want):
                raise SdrtError(f"{path}: {where}: {key} has shape {list(value.shape)}, expected {list(want)}")
            values.append(np.asarray(value, np.float32))
        layers.append(Layer(kind, *values))
    extra = sorted(k for k in state if k not in expected)
    if extra:
        raise SdrtError(f"{path}: {where}: unexpected key {extra[0]} (the file's layer_structure / "
                        f"is_layer_norm / dropout settings do not describe these weights)")
    return Module(dim, tuple(layers))


# -- names --

class HypernetLibrary:
    """The ``.pt`` files under some folders by file stem, as the webui's ``list_hypernetworks``
    (recursive, sorted by path ignoring case, a later stem replacing an earlier one, ``None`` skipped)."""

    def __init__(self, folders=None):
        if folders is None:
            folders = [DEFAULT_HYPERNETWORK_DIR]
        elif isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        self.folders = [Path(f) for f in folders]

    def scan(self) -> dict[str, Path]:
        out = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            found = []
            for root, _, filenames in os.walk(folder, followlinks=True):
                found += [Path(root) / f for f in filenames if f.lower().endswith(".pt")]
            for p in sorted(found, key=lambda p: str(p).lower()):
                if p.stem != "None":
                    out[p.stem] = p
        return out

    def get(self, name: str) -> Path:
        """The file of a name; an unknown name is one error naming the folders (the webui logs it and
        goes on without it: docs/DIFFERENCES.md)."""
        path = self.scan().get(name)
        if path is None:
            where = ", ".join(str(f) for f in self.folders)
            raise SdrtError(f"no hypernetwork named {name!r} in {where} (a .pt file stem; --hypernetwork-dir "
                            f"sets the folder)")
        return path


# -- the graph --

class _Builder:
    """New nodes and initializers of one edit, with fresh names."""

    def __init__(self, prefix: str):
        self.prefix, self.count = prefix, 0
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{self.prefix}/{stem}_{self.count}"

    def const(self, value, stem: str = "c") -> str:
        name = self.name(stem)
        self.initializers.append(onnx_edit.tensor(name, np.asarray(value, np.float32)))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type)
        self.nodes.append(onnx_edit.node(op_type, list(inputs), [out], out, **attrs))
        return out


def _activation(b: _Builder, name: str, x: str) -> str:
    """torch.nn's activation (its default arguments) in ONNX ops (opset 17)."""
    if name in ("relu", "tanh", "sigmoid", "softsign", "selu", "softplus"):
        return b.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign", "selu": "Selu",
                     "softplus": "Softplus"}[name], x)
    if name == "leakyrelu":
        return b.op("LeakyRelu", x, alpha=0.01)
    if name == "rrelu":  # at inference a leaky ReLU with the mean of its slopes, (1/8 + 1/3) / 2
        return b.op("LeakyRelu", x, alpha=(1.0 / 8.0 + 1.0 / 3.0) / 2.0)
    if name in ("hardshrink", "softshrink"):
        return b.op("Shrink", x, lambd=0.5, bias=0.5 if name == "softshrink" else 0.0)
    if name == "elu":
        return b.op("Elu", x, alpha=1.0)
    if name == "celu":
        return b.op("Celu", x, alpha=1.0)
    if name in ("swish", "hardswish"):  # the webui's "swish" is torch.nn.Hardswish
        return b.op("HardSwish", x)
    if name == "hardsigmoid":  # relu6(x + 3) / 6
        return b.op("HardSigmoid", x, alpha=1.0 / 6.0, beta=0.5)
    if name in ("relu6", "hardtanh"):
        lo, hi = (0.0, 6.0) if name == "relu6" else (-1.0, 1.0)
        return b.op("Clip", x, b.const(lo), b.const(hi))
    if name == "gelu":  # exact: x * (1 + erf(x / sqrt 2)) / 2
        erf = b.op("Erf", b.op("Mul", x, b.const(1.0 / math.sqrt(2.0))))
        return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", erf, b.const(1.0)))
    if name == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if name == "mish":
        return b.op("Mul", x, b.op("Tanh", b.op("Softplus", x)))
    if name == "tanhshrink":
        return b.op("Sub", x, b.op("Tanh", x))
    if name == "logsigmoid":  # -softplus(-x)
        return b.op("Neg", b.op("Softplus", b.op("Neg", x)))
    raise SdrtError(f"hypernetwork activation {name!r} is not supported")


def module_nodes(b: _Builder, module: Module, x: str, multiplier: float) -> str:
    """The webui's ``HypernetworkModule.forward``, ``x + linear(x) * multiplier``, as nodes; the output's name."""
    h = x
    for layer in module.layers:
        if layer.kind == "linear":
            h = b.op("Add", b.op("MatMul", h, b.const(layer.weight.T, "weight")), b.const(layer.bias, "bias"))
        elif layer.kind == "norm":
            h = b.op("LayerNormalization", h, b.const(layer.weight, "scale"), b.const(layer.bias, "bias"),
                     axis=-1, epsilon=_LN_EPSILON)
        else:
            h = _activation(b, layer.activation, h)
    return b.op("Add", x, b.op("Mul", h, b.const(np.float32(multiplier), "multiplier")))


def projections(prov: provenance.Provenance, gprov: provenance.GraphProvenance, nodes: list[onnx_edit.Node],
                graph: Path) -> list[tuple[int, str, int]]:
    """(node index, "k" or "v", context width) of every attention's ``to_k`` / ``to_v`` MatMul,
    found by the provenance of its weight (a MatMul whose second input holds exactly that weight)."""
    by_source = gprov.by_source()
    consumers: dict[str, list[onnx_edit.Node]] = {}
    for n in nodes:
        for name in n.inputs:
            consumers.setdefault(name, []).append(n)
    out = []
    for key in prov.sources:
        kind = "k" if key.endswith(".to_k.weight") else "v" if key.endswith(".to_v.weight") else None
        if kind is None:
            continue
        inits = by_source.get(key, [])
        matmuls = [n for i in inits for n in consumers.get(i, [])
                   if n.op_type == "MatMul" and len(n.inputs) == 2 and n.inputs[1] == i
                   and len(gprov.initializers[i].parts) == 1 and not gprov.initializers[i].same]
        if not matmuls:
            raise SdrtError(f"{graph}: cannot apply hypernetworks: the projection {key} is not a MatMul by its own "
                            f"weight in this graph (SDRT_GRAPHS=portable uses the portable graph)")
        out += [(n.index, kind, prov.shape(key)[1]) for n in matmuls]
    return sorted(out)


def build_edit(prov: provenance.Provenance, graph: Path,
               chain: list[tuple[Hypernetwork, float]]) -> onnx_edit.GraphEdit:
    """The graph edit that puts a set of hypernetworks (in prompt order) in front of every
    ``to_k`` / ``to_v`` projection of ``graph`` whose context width one of them has modules for."""
    gprov = prov.graph(graph)
    if gprov.quantized:
        raise SdrtError(f"{graph} is quantized (int8): hypernetworks on int8 graphs are not supported yet; "
                        f"use --precision fp32")
    weights = GraphWeights(graph)
    provenance.check_graph(prov, gprov, weights.index, graph)
    try:
        nodes = read_nodes_of(graph)
    except ValueError as e:
        raise SdrtError(f"{graph}: not a readable ONNX graph ({e})") from None
    b = _Builder("sdrt_hypernet")
    before: dict[int, list[bytes]] = {}
    renames: dict[int, dict[int, str]] = {}
    done: dict[tuple[str, str], str] = {}
    for index, kind, width in projections(prov, gprov, nodes, graph):
        used = [(h.modules[width][0 if kind == "k" else 1], m) for h, m in chain if width in h.modules]
        if not used:
            continue
        x = nodes[index].inputs[0]
        if (x, kind) not in done:
            start = len(b.nodes)
            weight = weights.index[nodes[index].inputs[1]]
            half = weight.data_type == 10
            h = b.op("Cast", x, to=1) if half else x  # the webui runs the MLPs in float32 (cond_cast_float)
            for module, multiplier in used:
                h = module_nodes(b, module, h, multiplier)
            done[x, kind] = b.op("Cast", h, to=10) if half else h
            before.setdefault(index, []).extend(b.nodes[start:])
        renames[index] = {0: done[x, kind]}
    return onnx_edit.GraphEdit(before, renames, b.initializers)


def read_nodes_of(graph: Path) -> list[onnx_edit.Node]:
    """The graph file's nodes, read from a memory map (graphs with their weights inside are large)."""
    with open(graph, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return onnx_edit.read_nodes(data)


class HypernetOverrides:
    """A session's graph with a hypernetwork set's nodes (and the LoRA set's values, ``base``): the
    session is made from the edited bytes, its external data found through the session option."""

    def __init__(self, base, edit: onnx_edit.GraphEdit):
        self.base, self.edit = base, edit

    def add_to(self, options, path: Path) -> list:
        values = self.base.add_to(options, path) if self.base is not None else []
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(path).parent))
        return values

    def model(self, path: Path) -> bytes:
        data = self.base.model(path) if self.base is not None else str(path)
        if isinstance(data, str):
            data = Path(data).read_bytes()
        try:
            return self.edit.apply(data)
        except SdrtError as e:
            raise SdrtError(f"{path}: {e}") from None


# -- the set --

@dataclass(frozen=True)
class ActiveHypernet:
    path: Path
    mentioned: str
    multiplier: float
    sha256: str


class Hypernetworks:
    """The hypernetworks a prompt names, read once per file content, and the UNet's edited graphs
    per set (the last ``CACHE_SETS`` kept per session graph)."""

    def __init__(self, folders=None):
        self.library = HypernetLibrary(folders)
        self._hashes: dict[tuple, str] = {}
        self._read: OrderedDict = OrderedDict()
        self._edits: dict[str, OrderedDict] = {}

    def resolve(self, tags) -> list[ActiveHypernet]:
        """``<hypernet:name[:multiplier]>`` tags as files, as the webui's ``extra_networks_hypernet``
        reads them (the multiplier is the second argument, 1 without it)."""
        out = []
        for tag in tags:
            if tag.type != "hypernet":
                continue
            if not tag.items or not tag.items[0]:
                raise SdrtError(f"{tag.tag} in the prompt names no hypernetwork")
            try:
                multiplier = float(tag.items[1]) if len(tag.items) > 1 else 1.0
            except ValueError:
                raise SdrtError(f"cannot read the multiplier {tag.items[1]!r} of {tag.tag} in the prompt") from None
            path = self.library.get(tag.items[0])
            out.append(ActiveHypernet(path, tag.items[0], multiplier, self._hash(path)))
        return out

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = files.sha256(path)
        return self._hashes[key]

    def read(self, active: ActiveHypernet) -> Hypernetwork:
        if active.sha256 not in self._read:
            self._read[active.sha256] = read_hypernetwork(active.path)
            while len(self._read) > 4:
                self._read.popitem(last=False)
        return self._read[active.sha256]

    def overrides(self, prov: provenance.Provenance, session, active: list[ActiveHypernet], base,
                  key) -> HypernetOverrides:
        """The session's graph with the set's nodes (``base``: the LoRA values, or None), cached by ``key``."""
        cache = self._edits.setdefault(str(session.path), OrderedDict())
        edit = cache.get(key)
        if edit is None:
            chain = [(self.read(a), a.multiplier) for a in active]
            edit = build_edit(prov, Path(session.path), chain)
            cache[key] = edit
            while len(cache) > CACHE_SETS:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return HypernetOverrides(base, edit)
