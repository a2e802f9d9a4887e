"""Graph passes over exported ONNX graphs: constant folding, fusions, dead-node removal.

Each pass takes a :class:`Graph` (an editable view of a ``ModelProto``), rewrites it in place
and returns how many times it fired. :func:`optimize` runs them in order and reports the counts.

Fusions target operators ONNX Runtime runs on the CPU:

- ``fuse_group_norm``: torch's GroupNorm export (Reshape -> InstanceNormalization -> Reshape ->
  Mul(gamma) -> Add(beta)), with a following SiLU (x * Sigmoid(x)) folded in, becomes one
  ``ai.sdrt.GroupNorm`` (sdrt's kernels library, kernels/ort/).
- ``fuse_attention``: the scaled-dot-product attention that torch exports (per-head Reshape /
  Transpose of the Q, K, V projections, scaled MatMul, Softmax, MatMul, merge of the heads)
  becomes one ``com.microsoft.MultiHeadAttention`` fed by the projections; self- and
  cross-attention alike.
- ``fuse_gelu``: the erf form of GELU (x * 0.5 * (1 + erf(x / sqrt 2))) becomes
  ``com.microsoft.Gelu``; in the UNet's GEGLU feed-forward that leaves MatMul + bias, two
  Slices, Gelu and the gating Mul.
- ``winograd_conv``: 3x3 convolutions (padding 1, stride 1) up to 640 output channels become
  ``ai.sdrt.Conv3x3``, Winograd's F(4x4, 3x3) in sdrt's kernels library.
- LayerNorm needs no pass: from opset 17 torch exports ``LayerNormalization`` whole; the report
  counts them.

Not in :data:`PASSES` (it changes the arithmetic, so only reduced-precision graphs take it):

- ``bf16_attention``: self-attention's ``MultiHeadAttention`` becomes ``ai.sdrt.Attention``,
  whose products run in bf16 on CPUs with AVX-512 BF16 (float32 elsewhere).

Every fusion checks the values it relies on (constant shapes, the epsilon, perm attributes) and
leaves a subgraph alone when they are not what it expects, so a pass never changes numbers beyond
float rounding. The unit tests build each subgraph with ``onnx.helper`` and compare the fused
graph's outputs with the unfused ones in ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

SDRT_DOMAIN = "ai.sdrt"
MS_DOMAIN = "com.microsoft"
FOLD_LIMIT = 1 << 16  # elements: constant folding evaluates shape arithmetic, not weights
EXTERNAL_LIMIT = 1 << 16  # elements: external initializers read for their values


class Graph:
    """A ModelProto's main graph with producer / consumer maps and constant lookup."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | Path | None = None):
        self.model = model
        self.base_dir = str(base_dir) if base_dir is not None else None
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self._counter = 0
        self._shapes: dict[str, list] | None = None
        self.reindex()

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers[i].append(node)

    # -- lookups -----------------------------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None when not constant."""
        if name in self.inits:
            return self.const_initializer(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and not node.input:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(a))
        return None

    def const_initializer(self, name: str) -> np.ndarray | None:
        """The value of an initializer (not of a Constant node). Weights kept in external data are
        read from it when small (norm scales, shapes); large ones are never loaded: the passes do
        not need their values, so a 3.4 GB UNet is optimized without reading its weights."""
        t = self.inits.get(name)
        if t is None:
            return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if self.base_dir is None or math.prod(t.dims) > EXTERNAL_LIMIT:
                return None
            return numpy_helper.to_array(t, self.base_dir)
        return numpy_helper.to_array(t)

    def parent(self, node: onnx.NodeProto, index: int, op_type: str | tuple[str, ...]) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        types = (op_type,) if isinstance(op_type, str) else op_type
        return p if p is not None and p.op_type in types else None

    def only_consumer(self, name: str, op_type: str | None = None) -> onnx.NodeProto | None:
        """The single node reading ``name`` (and ``name`` not a graph output), else None."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0] if op_type is None or users[0].op_type == op_type else None

    def private(self, *nodes: onnx.NodeProto, keep: str) -> bool:
        """True when every output of ``nodes`` except ``keep`` is read only inside ``nodes``."""
        inside = {id(n) for n in nodes}
        for n in nodes:
            for o in n.output:
                if o == keep:
                    continue
                if o in self.outputs or any(id(u) not in inside for u in self.consumers.get(o, [])):
                    return False
        return True

    def rank(self, name: str) -> int | None:
        """The rank of a tensor (see :meth:`shape`); None when unknown."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> list[int | None] | None:
        """The shape of a tensor (None for a dimension known only at run time): an initializer's,
        else from ONNX's shape inference on the graph's structure (run once, weights not loaded);
        None when unknown."""
        if name in self.inits:
            return list(self.inits[name].dims)
        if self._shapes is None:
            structure = onnx.ModelProto()
            structure.CopyFrom(self.model)
            for t in structure.graph.initializer:  # dims are all inference needs of a weight
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
            try:
                inferred = onnx.shape_inference.infer_shapes(structure, strict_mode=False).graph
            except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):  # ranks unknown: left alone
                inferred = onnx.GraphProto()
            self._shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                     for d in v.type.tensor_type.shape.dim]
                            for v in (*inferred.value_info, *inferred.input, *inferred.output)
                            if v.type.tensor_type.HasField("shape")}
        return self._shapes.get(name)

    # -- edits -------------------------------------------------------------------------------

    def fresh(self, stem: str) -> str:
        while True:
            self._counter += 1
            name = f"sdrt_{stem}_{self._counter}"
            if name not in self.producer and name not in self.inits:
                return name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor

    def add_initializer(self, array: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        """Remove ``old`` and insert ``new`` where the last of ``old`` stood: ``old`` is the fused
        subgraph, whose last node comes after everything ``new`` reads and before every reader of
        what it writes. Node protos held before a replace are stale after it (the graph stores
        copies): passes look nodes up again by their output names."""
        def key(n):
            return n.output[0] if n.output else n.name

        gone = {key(n) for n in old}
        nodes = list(self.graph.node)
        at = max(i for i, n in enumerate(nodes) if key(n) in gone)
        rebuilt = [n for n in nodes[:at] if key(n) not in gone] + new + [n for n in nodes[at + 1:] if key(n) not in gone]
        del self.graph.node[:]
        self.graph.node.extend(rebuilt)
        self.reindex()

    def nodes_of(self, op_type: str):
        """The current nodes of a type, looked up afresh as the graph changes under the caller."""
        for name in [n.output[0] for n in self.graph.node if n.op_type == op_type and n.output]:
            node = self.producer.get(name)
            if node is not None and node.op_type == op_type:
                yield node

    def use_opset(self, domain: str, version: int) -> None:
        if not any(o.domain == domain for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(domain, version))


# -- passes ---------------------------------------------------------------------------------------

def fold_constants(g: Graph) -> int:
    """Evaluate nodes whose inputs are all small constants (shape arithmetic, scales) with ONNX's
    reference evaluator and store the results as initializers; Constant nodes become
    initializers too. One sweep in topological order. Returns the number of nodes removed."""
    from onnx.reference import ReferenceEvaluator

    kept = []
    folded = 0
    for node in g.graph.node:
        if node.op_type == "Constant" and not node.input:
            value = g.const(node.output[0])
            if value is not None:
                g.set_initializer(node.output[0], np.asarray(value))
                folded += 1
                continue
        elif node.domain in ("", "ai.onnx") and node.input and node.op_type not in _NOT_FOLDED:
            values = [g.const_initializer(i) if i else None for i in node.input]
            if all(v is not None or not i for v, i in zip(values, node.input)) and \
                    sum(v.size for v in values if v is not None) <= FOLD_LIMIT:
                try:
                    results = _evaluate(ReferenceEvaluator, node, values, g.opset)
                except Exception:  # an op the reference evaluator lacks: left to the runtime
                    results = None
                if results is not None and all(np.asarray(r).size <= FOLD_LIMIT for r in results):
                    for name, value in zip(node.output, results):
                        g.set_initializer(name, np.asarray(value))
                    folded += 1
                    continue
        kept.append(node)
    if folded:
        del g.graph.node[:]  # copies kept protos back: stale references are not held across this
        g.graph.node.extend(kept)
        g.reindex()
    return folded


_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _evaluate(evaluator_cls, node: onnx.NodeProto, values: list, opset: int) -> list:
    names = [f"in{i}" for i in range(len(node.input))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
              for n, v in zip(names, values) if v is not None]
    outputs = [helper.make_tensor_value_info(f"out{i}", onnx.TensorProto.UNDEFINED, None)
               for i in range(len(node.output))]
    single = helper.make_node(node.op_type, [n if v is not None else "" for n, v in zip(names, values)],
                              [o.name for o in outputs], domain=node.domain)
    single.attribute.extend(node.attribute)
    model = helper.make_model(helper.make_graph([single], "fold", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    feeds = {n: np.asarray(v) for n, v in zip(names, values) if v is not None}
    return list(evaluator_cls(model).run(None, feeds))


def fuse_group_norm(g: Graph) -> int:
    """Reshape(x, [0, G, -1]) -> InstanceNormalization(ones, zeros) -> Reshape(x's shape) ->
    Mul(gamma[C,1,1]) -> Add(beta[C,1,1]) [-> x * Sigmoid(x)] => ai.sdrt.GroupNorm."""
    count = 0
    for inorm in g.nodes_of("InstanceNormalization"):
        r1 = g.parent(inorm, 0, "Reshape")
        if r1 is None:
            continue
        shape = g.const(r1.input[1])
        scale, bias = g.const(inorm.input[1]), g.const(inorm.input[2])
        if shape is None or shape.tolist()[0::2] != [0, -1] or len(shape) != 3:
            continue
        groups = int(shape[1])
        if scale is None or bias is None or not (np.all(scale == 1) and np.all(bias == 0)):
            continue
        r2 = g.only_consumer(inorm.output[0], "Reshape")
        mul = r2 and g.only_consumer(r2.output[0], "Mul")
        add = mul and g.only_consumer(mul.output[0], "Add")
        if add is None or g.only_consumer(r1.output[0]) is not inorm:
            continue
        # r2 restores x's shape: Reshape(., Shape(x)) (or a constant equal to it, not checked here)
        shape_src = g.producer.get(r2.input[1])
        if shape_src is not None and shape_src.op_type == "Shape" and shape_src.input[0] != r1.input[0]:
            continue
        gamma = _other_const(g, mul, r2.output[0])
        beta = _other_const(g, add, mul.output[0])
        if gamma is None or beta is None:
            continue
        channels = gamma.size
        if gamma.shape not in ((channels, 1, 1), (channels, 1), (1, channels, 1, 1)) or beta.size != channels:
            continue
        if channels % groups:
            continue
        eps = next((helper.get_attribute_value(a) for a in inorm.attribute if a.name == "epsilon"), 1e-5)
        removed = [r1, inorm, r2, mul, add]
        out = add.output[0]
        silu = _silu_after(g, add)
        if silu is not None:
            removed += silu
            out = silu[1].output[0]
        node = helper.make_node(
            "GroupNorm", [r1.input[0], g.add_initializer(gamma.reshape(channels).astype(np.float32), "gn_gamma"),
                          g.add_initializer(beta.reshape(channels).astype(np.float32), "gn_beta")],
            [out], name=g.fresh("GroupNorm"), domain=SDRT_DOMAIN, groups=groups, epsilon=float(eps),
            activation=1 if silu else 0, channels_last=0)
        g.replace(removed, [node])  # the Shape(x) feeding r2 goes with remove_dead_nodes
        count += 1
    if count:
        g.use_opset(SDRT_DOMAIN, 1)
    return count


def _other_const(g: Graph, node: onnx.NodeProto, data: str) -> np.ndarray | None:
    """The constant operand of a binary node whose other operand is ``data``."""
    if len(node.input) != 2 or data not in node.input:
        return None
    other = node.input[1] if node.input[0] == data else node.input[0]
    return g.const(other)


def _silu_after(g: Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """[Sigmoid, Mul] computing x * Sigmoid(x) of ``node``'s output, when they are its only readers."""
    x = node.output[0]
    users = g.consumers.get(x, [])
    if len(users) != 2 or x in g.outputs:
        return None
    sig = next((u for u in users if u.op_type == "Sigmoid"), None)
    mul = next((u for u in users if u.op_type == "Mul"), None)
    if sig is None or mul is None or sorted(mul.input) != sorted([x, sig.output[0]]):
        return None
    if g.only_consumer(sig.output[0]) is not mul:
        return None
    return [sig, mul]


def fuse_attention(g: Graph) -> int:
    """Torch's scaled_dot_product_attention export => com.microsoft.MultiHeadAttention.

    Matched (per head count H, head size d)::

        q = Mul(Transpose<0,2,1,3>(Reshape(Q, [B, -1, H, d])), s)
        k = Mul(Transpose<0,2,3,1>(Reshape(K, [B, -1, H, d])), s)
        v = Transpose<0,2,1,3>(Reshape(V, [B, -1, H, d]))
        out = Reshape(Transpose<0,2,1,3>(MatMul(Softmax(MatMul(q, k)), v)), [B, -1, H*d])

    with s * s = 1/sqrt(d) (torch splits the scale over q and k). Q, K, V stay as they are (the
    projections); MultiHeadAttention takes them in [B, S, H*d].
    """
    count = 0
    for softmax in g.nodes_of("Softmax"):
        axis = next((helper.get_attribute_value(a) for a in softmax.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3):
            continue
        qk, mask = g.parent(softmax, 0, "MatMul"), None
        if qk is None:  # masked scores (the text encoder's causal mask): Softmax(Add(MatMul(q, k), mask))
            qk, mask = _masked_scores(g, softmax)
        pv = g.only_consumer(softmax.output[0], "MatMul")
        if qk is None or pv is None or pv.input[0] != softmax.output[0]:
            continue
        q = _head_split(g, qk, 0, (0, 2, 1, 3), scaled=True)
        k = _head_split(g, qk, 1, (0, 2, 3, 1), scaled=True)
        v = _head_split(g, pv, 1, (0, 2, 1, 3), scaled=False)
        if q is None or k is None or v is None:
            continue
        heads = {q["heads"], k["heads"], v["heads"]}
        if len(heads) != 1 or None in heads:
            continue
        (num_heads,) = heads
        # transformers' CLIP first reshapes the product to the [B, H, S, d] it already has
        same = _same_shape_reshape(g, pv, num_heads, q["nodes"][1].output[0])
        merge_t = g.only_consumer((same or pv).output[0], "Transpose")
        merge_r = merge_t and g.only_consumer(merge_t.output[0], "Reshape")
        if merge_r is None or _perm(merge_t) != (0, 2, 1, 3):
            continue
        scale = q["scale"] * k["scale"] if q["scale"] is not None and k["scale"] is not None else None
        if scale is None and not (q["default_scale"] and k["default_scale"]):
            continue
        removed = [qk, softmax, pv, merge_t, merge_r] + q["nodes"] + k["nodes"] + v["nodes"] + ([same] if same else [])
        needed = {q["input"], k["input"], v["input"]}
        if mask is not None:
            removed.append(g.producer[softmax.input[0]])
            needed.add(mask)
        removed += _orphans(g, removed, needed=needed)
        if not g.private(*removed, keep=merge_r.output[0]):
            continue
        attrs = {"num_heads": int(num_heads)}
        if scale is not None:
            attrs["scale"] = float(scale)
        # the mask goes in as attention_bias (input 6: query, key, value, bias, key_padding_mask, attention_bias)
        inputs = [q["input"], k["input"], v["input"]] + (["", "", mask] if mask is not None else [])
        node = helper.make_node("MultiHeadAttention", inputs, [merge_r.output[0]],
                                name=g.fresh("MultiHeadAttention"), domain=MS_DOMAIN, **attrs)
        g.replace(removed, [node])
        count += 1
    if count:
        g.use_opset(MS_DOMAIN, 1)
    return count


def _same_shape_reshape(g: Graph, pv: onnx.NodeProto, heads: int, q_heads: str) -> onnx.NodeProto | None:
    """The Reshape of the attention product ``pv`` ([B, H, S, d]) to the same shape, as CLIP's
    export writes it: Reshape(pv, Concat(B, H or -1, S, d)) with B = Shape(pv)[0], S =
    Shape(pv or the query heads ``q_heads``)[2], d = Shape(pv or the value heads)[3]; with three
    of four dimensions equal, the fourth is too. None when ``pv`` is not so followed."""
    reshape = next((u for u in g.consumers.get(pv.output[0], []) if u.op_type == "Reshape"), None)
    if reshape is None or reshape.input[0] != pv.output[0]:
        return None
    concat = g.producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    part = g.const(concat.input[1])
    if part is None or part.size != 1 or int(part.reshape(-1)[0]) not in (heads, -1):
        return None
    if (_shape_dim(g, concat.input[0]) != (pv.output[0], 0)
            or _shape_dim(g, concat.input[2]) not in ((pv.output[0], 2), (q_heads, 2))
            or _shape_dim(g, concat.input[3]) not in ((pv.output[0], 3), (pv.input[1], 3))):
        return None
    return reshape


def _shape_dim(g: Graph, name: str) -> tuple[str, int] | None:
    """(tensor, axis) when ``name`` is Unsqueeze(Gather(Shape(tensor), axis)) (or without the Unsqueeze)."""
    n = g.producer.get(name)
    if n is not None and n.op_type == "Unsqueeze":
        n = g.producer.get(n.input[0])
    if n is None or n.op_type != "Gather":
        return None
    shape, index = g.producer.get(n.input[0]), g.const(n.input[1])
    if shape is None or shape.op_type != "Shape" or index is None or index.size != 1 or len(shape.attribute):
        return None
    return shape.input[0], int(index.reshape(-1)[0])


def _masked_scores(g: Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str | None]:
    """(the q.k MatMul, the mask) of Softmax(Add(MatMul(q, k), mask)), where the mask is 4-D, as
    MultiHeadAttention's ``attention_bias`` takes it ([1 or B, 1 or H, S, L]; the CLIP text
    encoder's causal mask is [B, 1, S, S]); (None, None) otherwise."""
    add = g.parent(softmax, 0, "Add")
    if add is None or len(add.input) != 2:
        return None, None
    for k in (0, 1):
        qk = g.parent(add, k, "MatMul")
        if qk is not None and g.only_consumer(qk.output[0]) is add and g.only_consumer(add.output[0]) is softmax:
            mask = add.input[1 - k]
            return (qk, mask) if g.rank(mask) == 4 else (None, None)
    return None, None


def reached_from(graph: onnx.GraphProto, name: str) -> set[str]:
    """Every tensor computed from ``name`` (a graph input), ``name`` included."""
    reached = {name}
    for node in graph.node:  # ONNX nodes are topologically sorted
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return reached


def bf16_attention(g: Graph, stream_input: str = "sample") -> int:
    """Self-attention ``com.microsoft.MultiHeadAttention`` => ``ai.sdrt.Attention`` (sdrt's
    kernels library): the same op without masks or biases, its q.k and p.v products in bf16 with
    float32 sums on CPUs with AVX-512 BF16 (vdpbf16ps), in float32 elsewhere.

    Self-attention is the node whose keys depend on ``stream_input`` (image tokens: 4096 per item
    at 512x512, where it is the UNet's largest cost). Cross-attention (77 text tokens) keeps ONNX
    Runtime's kernel, which is faster there. Nodes with masks, biases or other attributes than
    ``num_heads`` and ``scale`` are left alone. Not one of :data:`PASSES`: it changes the
    arithmetic, so only the reduced-precision graphs (``--precision int8``, ``int8-static``) run it.
    """
    reached = reached_from(g.graph, stream_input)
    count = 0
    for mha in g.nodes_of("MultiHeadAttention"):
        if mha.domain != MS_DOMAIN or len(mha.input) != 3 or mha.input[1] not in reached:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        if set(attrs) - {"num_heads", "scale"} or attrs.get("num_heads", 0) <= 0:
            continue
        node = helper.make_node("Attention", list(mha.input), list(mha.output),
                                name=g.fresh("Attention"), domain=SDRT_DOMAIN, **attrs)
        g.replace([mha], [node])
        count += 1
    if count:
        g.use_opset(SDRT_DOMAIN, 1)
    return count


def _perm(node: onnx.NodeProto) -> tuple[int, ...]:
    return tuple(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), ()))


def _head_split(g: Graph, node: onnx.NodeProto, index: int, perm: tuple[int, ...], scaled: bool) -> dict | None:
    """Follow [Mul(., s) <-] Transpose<perm> <- Reshape(X, [B, -1, H, d]) back from ``node``'s input."""
    nodes = []
    scale, default_scale = None, False
    src = g.producer.get(node.input[index])
    if scaled:
        if src is None or src.op_type != "Mul":
            return None
        trans = next((g.producer.get(i) for i in src.input
                      if g.producer.get(i) is not None and g.producer[i].op_type == "Transpose"), None)
        if trans is None:
            return None
        other = src.input[1] if src.input[0] == trans.output[0] else src.input[0]
        value = g.const(other)
        if value is not None:
            if value.size != 1:
                return None
            scale = float(value.reshape(()))
        else:
            default_scale = _is_default_scale(g, other, trans.output[0])
            if not default_scale:
                return None
        nodes.append(src)
        src = trans
    if src is None or src.op_type != "Transpose" or _perm(src) != perm:
        return None
    reshape = g.parent(src, 0, "Reshape")
    if reshape is None:
        return None
    heads = _heads_of(g, reshape.input[1], reshape.input[0])
    nodes += [src, reshape]
    return {"input": reshape.input[0], "heads": heads, "scale": scale, "default_scale": default_scale,
            "nodes": nodes}


def _is_default_scale(g: Graph, name: str, head_tensor: str) -> bool:
    """Whether ``name`` computes sqrt(1 / sqrt(last dim of head_tensor)) (torch's split scale):
    Sqrt <- [Cast] <- Div(1, Sqrt(<- [Cast] <- Slice(Shape(head_tensor), -1)))."""
    n = g.producer.get(name)
    if n is None or n.op_type != "Sqrt":
        return False
    n = _skip_cast(g, n.input[0])
    if n is None or n.op_type != "Div" or g.const(n.input[0]) is None or float(g.const(n.input[0]).reshape(-1)[0]) != 1:
        return False
    n = g.producer.get(n.input[1])
    if n is None or n.op_type != "Sqrt":
        return False
    n = _skip_cast(g, n.input[0])
    if n is None or n.op_type != "Slice":
        return False
    shape = g.producer.get(n.input[0])
    starts = g.const(n.input[1])
    return shape is not None and shape.op_type == "Shape" and starts is not None and starts.tolist() == [-1]


def _skip_cast(g: Graph, name: str) -> onnx.NodeProto | None:
    n = g.producer.get(name)
    while n is not None and n.op_type == "Cast":
        n = g.producer.get(n.input[0])
    return n


def _heads_of(g: Graph, shape_name: str, data: str) -> int | None:
    """H of a [B, -1, H, d] reshape target of ``data``: a constant, or a Concat whose third part is
    constant; for [B, S, -1, d] (CLIP's), the width of ``data`` over the constant d."""
    value = g.const(shape_name)
    if value is not None:
        return int(value[2]) if value.size == 4 and value[2] > 0 else None
    concat = g.producer.get(shape_name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    part, d = g.const(concat.input[2]), g.const(concat.input[3])
    if part is None or part.size != 1:
        return None
    heads = int(part.reshape(-1)[0])
    if heads == -1 and d is not None and d.size == 1 and int(d.reshape(-1)[0]) > 0:
        shape = g.shape(data)
        width = shape[-1] if shape else None
        return width // int(d.reshape(-1)[0]) if width and width % int(d.reshape(-1)[0]) == 0 else None
    return heads if heads > 0 else None


def _orphans(g: Graph, removed: list[onnx.NodeProto], needed: set[str]) -> list[onnx.NodeProto]:
    """Nodes that only fed ``removed`` (the shape and scale arithmetic), found backwards; the
    producers of ``needed`` tensors stay."""
    gone = {id(n) for n in removed}
    extra: list[onnx.NodeProto] = []
    frontier = [i for n in removed for i in n.input]
    while frontier:
        name = frontier.pop()
        node = g.producer.get(name)
        if node is None or id(node) in gone or any(o in needed for o in node.output):
            continue
        if any(o in g.outputs or any(id(u) not in gone for u in g.consumers.get(o, [])) for o in node.output):
            continue
        gone.add(id(node))
        extra.append(node)
        frontier.extend(node.input)
    return extra


def fuse_gelu(g: Graph) -> int:
    """x * 0.5 * (1 + erf(x / sqrt(2))) in torch's exported order => com.microsoft.Gelu.

    Matched: Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x, .) -> Mul(., 0.5), the operands of each
    binary node in either order.
    """
    count = 0
    for erf in g.nodes_of("Erf"):
        div = g.parent(erf, 0, "Div")
        if div is None or not _near(g.const(div.input[1]), math.sqrt(2.0)):
            continue
        x = div.input[0]
        add = g.only_consumer(erf.output[0], "Add")
        if add is None or not _near(_other_const(g, add, erf.output[0]), 1.0):
            continue
        mul1 = g.only_consumer(add.output[0], "Mul")
        if mul1 is None or x not in mul1.input:
            continue
        mul2 = g.only_consumer(mul1.output[0], "Mul")
        if mul2 is None or not _near(_other_const(g, mul2, mul1.output[0]), 0.5):
            continue
        if not g.private(div, erf, add, mul1, mul2, keep=mul2.output[0]):
            continue
        node = helper.make_node("Gelu", [x], [mul2.output[0]], name=g.fresh("Gelu"), domain=MS_DOMAIN)
        g.replace([div, erf, add, mul1, mul2], [node])
        count += 1
    if count:
        g.use_opset(MS_DOMAIN, 1)
    return count


# Conv3x3 takes the convolutions whose output channels are at most this many (and input channels
# at most three times that: a UNet's skip concatenations): in SD's UNets those run at the two
# largest resolutions (320 and 640 channels), in the VAE all of them (up to 512). Measured against
# ONNX Runtime's Conv (MLAS, 2 threads, AVX2): 1.6-2.7x faster at 32 or more 4x4 tiles per call
# with these widths; with 1280 channels on an 8x8 map (2 images: 8 tiles) 0.56x, the filters'
# transform then costing more than the products it saves (docs/OPTIMIZATION.md).
CONV3X3_MAX_OUT = 640
CONV3X3_MAX_IN = 3 * CONV3X3_MAX_OUT


def winograd_conv(g: Graph) -> int:
    """3x3 convolutions with padding 1 and stride 1 => ``ai.sdrt.Conv3x3`` (Winograd F(4x4, 3x3),
    sdrt's kernels library): 4x fewer multiply-adds than the direct convolution, float32, equal
    to it up to rounding (about 1e-5 of the output's range). Matched: a Conv of weights [K, C, 3,
    3] and bias [K] (initializers), pads 1, strides and dilations 1, one group, no auto_pad, K at
    most :data:`CONV3X3_MAX_OUT` and C at most :data:`CONV3X3_MAX_IN`. The node keeps its name
    and its weight and bias inputs (LoRA merges and TensorRT refits address them by name)."""
    def initializer(name: str) -> onnx.TensorProto | None:  # through the Identity torch puts on a shared one
        node = g.producer.get(name)
        return g.inits.get(node.input[0] if node is not None and node.op_type == "Identity" else name)

    count = 0
    for conv in list(g.nodes_of("Conv")):
        weight, bias = (initializer(conv.input[i]) if len(conv.input) == 3 else None for i in (1, 2))
        if weight is None or bias is None:
            continue
        dims = list(weight.dims)
        if len(dims) != 4 or dims[2:] != [3, 3] or list(bias.dims) != dims[:1]:
            continue
        if dims[0] > CONV3X3_MAX_OUT or dims[1] > CONV3X3_MAX_IN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        wanted = {"pads": [1, 1, 1, 1], "strides": [1, 1], "dilations": [1, 1], "group": 1, "kernel_shape": [3, 3]}
        if "pads" not in attrs or any(k not in wanted or (list(v) if isinstance(v, (list, tuple)) else v) != wanted[k]
                                      for k, v in attrs.items()):
            continue
        conv.op_type, conv.domain = "Conv3x3", SDRT_DOMAIN
        del conv.attribute[:]
        count += 1
    if count:
        g.use_opset(SDRT_DOMAIN, 1)
        g.reindex()
    return count


def _near(value: np.ndarray | None, target: float) -> bool:
    return value is not None and value.size == 1 and abs(float(value.reshape(())) - target) <= 1e-6 * abs(target)


def count_layer_norms(g: Graph) -> int:
    """LayerNorm is exported whole from opset 17; counted, not fused."""
    return sum(1 for n in g.graph.node if n.op_type == "LayerNormalization")


def remove_dead_nodes(g: Graph) -> int:
    """Nodes none of whose outputs reach a graph output; unused initializers go too."""
    live = set(g.outputs)
    keep = []
    for node in reversed(list(g.graph.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    removed = len(g.graph.node) - len(keep)
    if removed:
        del g.graph.node[:]
        g.graph.node.extend(reversed(keep))
    unused = [t for t in g.graph.initializer if t.name not in live]
    for t in unused:
        g.graph.initializer.remove(t)
        g.inits.pop(t.name, None)
    g.reindex()
    return removed


# -- the pipeline ---------------------------------------------------------------------------------

@dataclass
class PassReport:
    name: str
    count: int
    seconds: float


@dataclass
class OptimizeReport:
    passes: list[PassReport] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    custom_ops: bool = False  # the optimized graph imports the ai.sdrt domain (sdrt's kernels library)

    def counts(self) -> dict[str, int]:
        return {p.name: p.count for p in self.passes}

    def summary(self) -> str:
        parts = ", ".join(f"{p.name} {p.count}" for p in self.passes)
        return f"{self.nodes_before} -> {self.nodes_after} nodes ({parts})"


PASSES: list[tuple[str, Callable[[Graph], int]]] = [
    ("fold_constants", fold_constants),
    ("group_norm", fuse_group_norm),
    ("attention", fuse_attention),
    ("gelu", fuse_gelu),
    ("conv3x3", winograd_conv),
    ("layer_norm", count_layer_norms),
    ("dead_nodes", remove_dead_nodes),
]


FUSIONS = ("group_norm", "attention", "gelu", "conv3x3")  # the passes that change what runs


def optimize(model: onnx.ModelProto, passes: list[str] | None = None,
             base_dir: str | Path | None = None) -> OptimizeReport:
    """Run the passes (all by default, in PASSES order) on ``model`` in place; ``base_dir`` is where
    its external data lives, when it was loaded without it."""
    g = Graph(model, base_dir)
    report = OptimizeReport(nodes_before=len(model.graph.node))
    for name, fn in PASSES:
        if passes is not None and name not in passes:
            continue
        t0 = time.perf_counter()
        n = fn(g)
        report.passes.append(PassReport(name, n, time.perf_counter() - t0))
    report.nodes_after = len(model.graph.node)
    report.custom_ops = any(o.domain == SDRT_DOMAIN for o in model.opset_import)
    log.info("graph passes: %s", report.summary())
    return report


def optimize_file(src: str | Path, dst: str | Path, passes: list[str] | None = None) -> OptimizeReport:
    """Optimize the graph at ``src`` into ``dst`` (same folder: the weights stay where they are).

    Weights in external data are neither loaded nor copied: ``dst`` refers to ``src``'s data file,
    so a bundle keeps one copy of its weights for the portable and the optimized graph. Written to
    a temporary name and renamed.
    """
    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("the optimized graph goes beside its source, whose weight file it shares")
    model = onnx.load(str(src), load_external_data=False)
    report = optimize(model, passes, base_dir=src.parent)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        onnx.save_model(model, str(tmp))
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return report
