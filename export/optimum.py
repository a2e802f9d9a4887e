"""The text encoder graph optimum's and diffusers' ONNX pipelines run: sdrt's graph fed with token ids.

sdrt's own text encoder graph takes ``inputs_embeds`` (the runtime looks the tokens up, so textual
inversion vectors and CLIP skip cost nothing); ``ORTStableDiffusionPipeline`` and
``ORTStableDiffusionXLPipeline`` feed ``text_encoder/model.onnx`` with ``input_ids`` alone and read
transformers' output names. This pass derives that graph from sdrt's, in ONNX, sharing its weights
(``model.onnx_data``)::

    input_ids [b, 77] --Gather(token table)--> inputs_embeds --(sdrt's graph)--> last_hidden_state
                                                     |                               |
                                       Add(position) = hidden_states.0     GatherND(first end token)
    hidden_states [L, b, 77, h] --Gather(k-1)--> hidden_states.k                      |
                                                                  pooler_output  or  MatMul(P) = text_embeds

``text_embeds`` (the projected pooled output, CLIPTextModelWithProjection: SDXL's ``text_encoder_2``)
comes first, as diffusers reads the pooled vector as output 0; otherwise ``last_hidden_state`` then
``pooler_output`` (CLIPTextModel). ``hidden_states.0..L`` (transformers' ``hidden_states``: the
embeddings, then each layer's raw output) where sdrt's graph has the raw states (SD 2.x, SDXL).
The pooled state is the one at each row's first end token (what sdrt pools and transformers reads
for configs whose ``eos_token_id`` is the real one).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import TEXT_TOKENS, ComponentSpec, TensorSpec

log = logging.getLogger(__name__)

TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"
PROJECTION = "text_projection.weight_t"


def ids_spec(hidden_size: int, num_layers: int, *, raw_states: bool, projection_dim: int | None,
             name: str = "text_encoder") -> ComponentSpec:
    """The I/O of the token-id graph (optimum's / transformers' names and order)."""
    states = ("batch", TEXT_TOKENS, hidden_size)
    last = TensorSpec("last_hidden_state", "float32", states)
    pooled = ((TensorSpec("text_embeds", "float32", ("batch", projection_dim)), last) if projection_dim
              else (last, TensorSpec("pooler_output", "float32", ("batch", hidden_size))))
    layers = tuple(TensorSpec(f"hidden_states.{k}", "float32", states) for k in range(num_layers + 1)) \
        if raw_states else ()
    return ComponentSpec(name, inputs=(TensorSpec("input_ids", "int64", ("batch", TEXT_TOKENS)),),
                         outputs=(*pooled, *layers), profile={"batch": (1, 2, 16)})


def write_ids_graph(embeds_graph: Path, target: Path, spec: ComponentSpec, table: np.ndarray, eos: int,
                    projection: np.ndarray | None = None) -> None:
    """Write ``target``: the graph at ``embeds_graph`` (sdrt's, its large weights already in
    ``model.onnx_data`` beside it) fed through ``table`` [vocab, hidden] with ``input_ids``, with the
    outputs of ``spec``. ``projection`` [hidden, projection_dim]: the pooled output's ``x @ P``. A
    table that fp16 holds exactly is stored in fp16 and cast (as the runtime's lookup does)."""
    model = onnx.load(str(embeds_graph), load_external_data=False)
    g = model.graph
    if [i.name for i in g.input] != ["inputs_embeds"]:
        raise SdrtError(f"{embeds_graph}: expected sdrt's text encoder graph (input inputs_embeds)")
    dtype = np.float16 if table.dtype == np.float16 else np.float32
    head = [helper.make_node("Gather", [TOKEN_TABLE, "input_ids"],
                             ["inputs_embeds" if dtype == np.float32 else "token_embeds"], axis=0)]
    if dtype == np.float16:
        head.append(helper.make_node("Cast", ["token_embeds"], ["inputs_embeds"], to=TensorProto.FLOAT))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table, dtype), TOKEN_TABLE))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", TEXT_TOKENS]))

    # The pooled state: last_hidden_state at each row's first end token
    g.initializer.append(numpy_helper.from_array(np.array(eos, np.int64), "eos_token_id"))
    nodes = [
        helper.make_node("Equal", ["input_ids", "eos_token_id"], ["is_eos"]),
        helper.make_node("Cast", ["is_eos"], ["is_eos_int"], to=TensorProto.INT32),
        helper.make_node("ArgMax", ["is_eos_int"], ["first_eos"], axis=1, keepdims=1),
        helper.make_node("GatherND", ["last_hidden_state", "first_eos"], ["pooler_output"], batch_dims=1),
    ]
    if projection is not None:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(projection, np.float32), PROJECTION))
        nodes.append(helper.make_node("MatMul", ["pooler_output", PROJECTION], ["text_embeds"]))
    layer_outputs = [t.name for t in spec.outputs if t.name.startswith("hidden_states.")]
    if layer_outputs:
        first = [n for n in g.node if "inputs_embeds" in n.input and n.op_type == "Add"]
        if len(first) != 1:
            raise SdrtError(f"{embeds_graph}: the token embeddings do not meet the position embeddings in one Add")
        embeddings = first[0].output[0]
        for k, name in enumerate(layer_outputs):
            if k == 0:
                nodes.append(helper.make_node("Identity", [embeddings], [name]))
                continue
            index = f"layer_index_{k}"
            g.initializer.append(numpy_helper.from_array(np.array(k - 1, np.int64), index))
            nodes.append(helper.make_node("Gather", ["hidden_states", index], [name], axis=0))
    body = list(g.node)
    del g.node[:]
    g.node.extend([*head, *body, *nodes])
    del g.output[:]
    for t in spec.outputs:
        g.output.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)))
    _prune(g)
    onnx.save_model(model, str(target))
    onnx.checker.check_model(str(target))
    log.info("%s: token-id graph for optimum written", target.parent.name)


def _prune(g: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no output needs (sdrt's stacked per-layer states)."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    kept = list(reversed(keep))
    del g.node[:]
    g.node.extend(kept)
    initializers = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(initializers)
    del g.value_info[:]
