"""LoRA / LyCORIS files and external VAEs applied to a bundle without re-export (runtime/networks).

The reference: the same network merged into the torch modules the webui's way (its Lora
extension's formulas, written here in torch), the merged modules saved as a checkpoint and run by
the PyTorch reference of ``sdrt verify``; the runtime's image must match it to 60 dB.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from sdrt.export import convert
from sdrt.export.reference import TorchReference
from sdrt.export.write import save_checkpoint
from sdrt.runtime import sampling
from sdrt.runtime.bundle import open_bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.networks import provenance
from sdrt.runtime.networks.apply import layer_names
from sdrt.runtime.networks.onnx_weights import GraphWeights
from sdrt.runtime.networks.vae import find_vae
from sdrt.runtime.pipeline.img2img import Img2imgPipeline
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline, to_uint8
from sdrt.runtime.precision import int8_saturates

PROMPT = "a red circle on a blue background"
STEPS, SEED = 4, 7


# -- the webui's formulas, in torch (extensions-builtin/Lora: network_*.py, lyco_helpers.py) --

def _conventional(up, down, shape, dyn=None):
    up, down = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
    if dyn is not None:
        up, down = up[:, :dyn], down[:dyn, :]
    return (up @ down).reshape(shape)


def _cp(t, wa, wb):
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def webui_updown(w: dict, weight: torch.Tensor, multiplier: float, dyn=None):
    """(updown, ex_bias) as the webui's module types compute them for a layer's weight."""
    dim = ex_bias = None
    if "lora_B.weight" in w:
        w = {**w, "lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]}
    if "lora_up.weight" in w:
        up, down, mid = w["lora_up.weight"], w["lora_down.weight"], w.get("lora_mid.weight")
        dim = down.shape[0]
        shape = [up.size(0), down.size(1)]
        if mid is not None:
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1),
                                  down.reshape(down.size(0), -1))
            shape += mid.shape[2:]
        else:
            if down.dim() == 4:
                shape += down.shape[2:]
            updown = _conventional(up, down, shape, dyn)
    elif "hada_w1_a" in w:
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in w:
            shape = [w1a.size(1), w1b.size(1)] + list(w["hada_t1"].shape[2:])
            u1 = _cp(w["hada_t1"], w1a, w1b)
        else:
            u1 = _conventional(w1a, w1b, shape)
        u2 = _cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else _conventional(w2a, w2b, shape)
        updown = u1 * u2
    elif "weight" in w:
        v = w["weight"]
        shape = [v.size(0), weight.size(1)]
        if w["on_input"].item():
            shape.reverse()
        else:
            v = v.reshape(-1, 1)
        updown = weight * v
    elif "lokr_w1" in w or "lokr_w1_a" in w:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else (w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None)
        shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if weight.dim() == 4:
            shape = list(weight.shape)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    elif "diff" in w:
        updown, shape, ex_bias = w["diff"], list(w["diff"].shape), w.get("diff_b")
    else:
        updown, shape, ex_bias = w["w_norm"], list(w["w_norm"].shape), w.get("b_norm")
    # NetworkModule.finalize_updown
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if weight.numel() == updown.numel():
        updown = updown.reshape(weight.shape)
    if ex_bias is not None:
        ex_bias = ex_bias * multiplier
    scale = w["alpha"].item() / dim if dim is not None and "alpha" in w else 1.0
    return updown * scale * multiplier, ex_bias


def webui_merge(tensors: dict, layers: dict, te: float, unet: float, dyn=None) -> None:
    """Merge a network file's tensors into torch modules (``layers``: layer name -> (module, is_te))."""
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] in ("unet", "text_encoder"):
            i = max(i for i, p in enumerate(parts) if p in ("lora_A", "lora_B", "alpha"))
            layer, part = ".".join(parts[:i]), ".".join(parts[i:])
        else:
            layer, _, part = key.partition(".")
        if layer in layers:
            groups.setdefault(layer, {})[part] = value.float()
    with torch.no_grad():
        for layer, w in groups.items():
            module, is_te = layers[layer]
            updown, ex_bias = webui_updown(w, module.weight, te if is_te else unet, dyn)
            module.weight += updown
            if ex_bias is not None:
                module.bias += ex_bias


def layer_table(unet, text_encoder, configs) -> dict:
    """Every name a file may give a layer -> (module, is text encoder), from the torch modules."""
    ldm = convert.key_map(configs)["unet"]
    out = {}
    for name, m in unet.named_modules():
        if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
            out["lora_unet_" + name.replace(".", "_")] = (m, False)
            out["unet." + name] = (m, False)
            if f"{name}.weight" in ldm:
                out["lora_unet_" + ldm[f"{name}.weight"][len("model.diffusion_model."):-len(".weight")]
                    .replace(".", "_")] = (m, False)
    for name, m in text_encoder.named_modules():
        if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            out["lora_te_" + full.replace(".", "_")] = (m, True)
            out["text_encoder." + full] = (m, True)
    return out


# -- network files for the tiny model --

def _r(g, *shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


def _modules(unet, text_encoder, unet_suffixes, te_suffixes):
    out = [("unet", n, m) for n, m in unet.named_modules() if n.endswith(unet_suffixes)]
    out += [("te", n if n.startswith("text_model.") else f"text_model.{n}", m)
            for n, m in text_encoder.named_modules() if n.endswith(te_suffixes)]
    return out


def _kohya(component, name):
    return ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")


def make_lora(unet, te, g, rank=4, alpha=2.0):
    """kohya LoRA: linear layers, LoCon on 3x3 and 1x1 convs, alpha, te and unet."""
    sd = {}
    for c, n, m in _modules(unet, te, ("to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"),
                            ("q_proj", "out_proj", "fc1")):
        k, W = _kohya(c, n), m.weight
        sd[f"{k}.lora_down.weight"] = _r(g, rank, *W.shape[1:])
        sd[f"{k}.lora_up.weight"] = _r(g, W.shape[0], rank, *([1, 1] if W.dim() == 4 else []))
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def make_lora_ldm_names(unet, te, g, configs):
    """LoRA with the UNet's layers in the LDM naming (``lora_unet_input_blocks_1_1_...``) and a CP
    middle weight on a 3x3 conv."""
    ldm = convert.key_map(configs)["unet"]
    sd = {}
    for c, n, m in _modules(unet, te, ("to_k", "conv2"), ()):
        k = "lora_unet_" + ldm[f"{n}.weight"][len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        W = m.weight
        if W.dim() == 4:
            sd[f"{k}.lora_down.weight"] = _r(g, 3, W.shape[1], 1, 1)
            sd[f"{k}.lora_mid.weight"] = _r(g, 3, 3, *W.shape[2:])
            sd[f"{k}.lora_up.weight"] = _r(g, W.shape[0], 3, 1, 1)
        else:
            sd[f"{k}.lora_down.weight"] = _r(g, 3, W.shape[1])
            sd[f"{k}.lora_up.weight"] = _r(g, W.shape[0], 3)
        sd[f"{k}.alpha"] = torch.tensor(1.5)
    return sd


def make_peft(unet, te, g):
    """diffusers / PEFT: ``unet.<module>.lora_A.weight``, no alpha (scale 1)."""
    sd = {}
    for c, n, m in _modules(unet, te, ("to_q", "to_k"), ("k_proj", "v_proj")):
        prefix = "unet." if c == "unet" else "text_encoder."
        sd[f"{prefix}{n}.lora_A.weight"] = _r(g, 2, m.weight.shape[1], s=0.2)
        sd[f"{prefix}{n}.lora_B.weight"] = _r(g, m.weight.shape[0], 2, s=0.2)
    return sd


def make_loha(unet, te, g):
    """LoHa: linear, and a 3x3 conv with CP tensors (hada_t1 / hada_t2)."""
    sd = {}

    def _r(g, *shape):
        return torch.randn(*shape, generator=g) * 0.7

    for c, n, m in _modules(unet, te, ("to_q", "conv1"), ("q_proj",)):
        k, W = _kohya(c, n), m.weight
        if W.dim() == 4:
            sd[f"{k}.hada_t1"], sd[f"{k}.hada_t2"] = _r(g, 2, 2, *W.shape[2:]), _r(g, 2, 2, *W.shape[2:])
            sd[f"{k}.hada_w1_a"], sd[f"{k}.hada_w2_a"] = _r(g, 2, W.shape[0]), _r(g, 2, W.shape[0])
            sd[f"{k}.hada_w1_b"], sd[f"{k}.hada_w2_b"] = _r(g, 2, W.shape[1]), _r(g, 2, W.shape[1])
        else:
            sd[f"{k}.hada_w1_a"], sd[f"{k}.hada_w2_a"] = _r(g, W.shape[0], 2), _r(g, W.shape[0], 2)
            sd[f"{k}.hada_w1_b"], sd[f"{k}.hada_w2_b"] = _r(g, 2, W.shape[1]), _r(g, 2, W.shape[1])
        sd[f"{k}.alpha"] = torch.tensor(1.0)
    return sd


def make_lokr(unet, te, g):
    """LoKr: a full w1 and a factorized w2 on linear layers, full w2 on a 3x3 conv."""
    sd = {}
    for c, n, m in _modules(unet, te, ("to_v", "conv2"), ("fc2",)):
        k, W = _kohya(c, n), m.weight
        out, inp = W.shape[0], W.shape[1]
        sd[f"{k}.lokr_w1"] = _r(g, 2, 2)
        if W.dim() == 4:
            sd[f"{k}.lokr_w2"] = _r(g, out // 2, inp // 2, *W.shape[2:], s=0.1)
        else:
            sd[f"{k}.lokr_w2_a"], sd[f"{k}.lokr_w2_b"] = _r(g, out // 2, 2), _r(g, 2, inp // 2)
            sd[f"{k}.alpha"] = torch.tensor(1.0)
    return sd


def make_ia3(unet, te, g):
    sd = {}
    for c, n, m in _modules(unet, te, ("to_k", "to_out.0"), ("k_proj",)):
        k = _kohya(c, n)
        on_input = n.endswith("to_out.0")
        sd[f"{k}.weight"] = _r(g, m.weight.shape[1] if on_input else m.weight.shape[0])
        sd[f"{k}.on_input"] = torch.tensor(on_input)
    return sd


def make_full(unet, te, g):
    """Full diffs with bias diffs; the text encoder's without (the tiny CLIP's biases are all zero,
    and the exporter keeps one initializer for equal tensors: docs/NETWORKS.md)."""
    sd = {}
    for c, n, m in _modules(unet, te, ("proj_out", "time_emb_proj"), ("fc1",)):
        k = _kohya(c, n)
        sd[f"{k}.diff"] = _r(g, *m.weight.shape, s=0.1)
        if c == "unet":
            sd[f"{k}.diff_b"] = _r(g, *m.bias.shape, s=0.1)
    return sd


def make_norm(unet, te, g):
    sd = {}
    for c, n, m in _modules(unet, te, ("norm1", "norm3"), ("layer_norm1",)):
        k = _kohya(c, n)
        sd[f"{k}.w_norm"], sd[f"{k}.b_norm"] = _r(g, *m.weight.shape, s=0.2), _r(g, *m.bias.shape, s=0.2)
    return sd


FORMATS = {
    "lora": lambda u, t, g, c: make_lora(u, t, g),
    "lora-ldm-names-cp": lambda u, t, g, c: make_lora_ldm_names(u, t, g, c),
    "peft": lambda u, t, g, c: make_peft(u, t, g),
    "loha": lambda u, t, g, c: make_loha(u, t, g),
    "lokr": lambda u, t, g, c: make_lokr(u, t, g),
    "ia3": lambda u, t, g, c: make_ia3(u, t, g),
    "full": lambda u, t, g, c: make_full(u, t, g),
    "norm": lambda u, t, g, c: make_norm(u, t, g),
}


def write_network(path, tensors: dict, metadata: dict | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, str(path))
    return path


# -- the reference image --

def reference_image(tmp_path, modules, configs, pipe: Pipeline, prompt: str, negative: str = "") -> np.ndarray:
    """The 8-bit image of the torch reference with these (merged) modules: Euler, as ``sdrt verify``."""
    unet, vae, text_encoder = modules
    ldm = convert.diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(),
                                    "text_encoder": text_encoder.state_dict()}, configs)
    ckpt = save_checkpoint(ldm, configs, tmp_path / f"merged-{len(os.listdir(tmp_path))}.safetensors")
    ref = TorchReference(ckpt, pipe.bundle.path / "tokenizer")
    plan = pipe.plan(GenerationParams(prompt, negative_prompt=negative, sampler_name="Euler", steps=STEPS, seed=SEED))
    info = plan.sampler
    sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=info,
                                 arch=pipe.bundle.architecture)
    from sdrt.runtime.text.extra_networks import parse_prompt

    text = parse_prompt(prompt)[0]
    cond, uncond = ref.encode(text, 1, 1), ref.encode(negative, 1, 1)
    f = pipe.bundle.vae_scale_factor
    shape = (pipe.bundle.latent_channels, plan.height // f, plan.width // f)
    gen = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(shape, generator=gen)[None] * float(sigmas[0])
    lat = info.fn(lambda x, s: ref.denoise(x, s, cond, uncond, 7.0), x0, sigmas,
                  noise=lambda s, sn: torch.randn(shape, generator=gen)[None], **info.options)
    return to_uint8(ref.decode(lat)[0])


def runtime_image(pipe, prompt: str, negative: str = ""):
    (out,) = pipe(prompt, negative_prompt=negative, sampler_name="Euler", steps=STEPS, seed=SEED)
    return np.asarray(out.image), out.infotext


@pytest.fixture(scope="module")
def pipe(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("Lora")
    return Pipeline(tiny_bundle, lora_dir=d)


def _lora_dir(pipe):
    return pipe.networks.library.folders[0]


# -- provenance --

def test_provenance_maps_every_weight_by_data(tiny_bundle, tiny_modules):
    """Every weight and bias of every Linear / Conv / norm of the UNet and text encoder is found in
    both graphs, identity / reshape / transpose, and the values the runtime reads back are the source's."""
    unet, vae, te = tiny_modules
    for component, module in (("unet", unet), ("text_encoder", te), ("vae_decoder", vae)):
        prov = provenance.load(tiny_bundle / component)
        graphs = sorted((tiny_bundle / component).glob("*.onnx"))
        assert {g.name for g in graphs} == set(prov.graphs)
        state = {(k if component != "text_encoder" or k.startswith("text_model.") else f"text_model.{k}"): v
                 for k, v in module.state_dict().items() if v.is_floating_point()}
        for graph in graphs:
            g = prov.graph(graph)
            found = g.by_source()
            weights = GraphWeights(graph)
            for key in prov.sources:
                value = state[key]
                if component == "vae_decoder":
                    assert not key.startswith("encoder.")
                # sdrt's graphs take token embeddings (looked up outside); the token-id graph
                # optimum runs (the text encoder's model.onnx) holds the table
                table_outside = key.endswith("token_embedding.weight") and graph.name != "model.onnx"
                if table_outside or torch.all(value == value.flatten()[0]):
                    assert key not in found  # looked up outside the graph / a constant, not indexed
                    continue
                assert key in found, (graph.name, key)
                name = found[key][0]
                (part,) = provenance.split_parts(np.asarray(weights.read(name), np.float32),
                                                 g.initializers[name], prov)
                np.testing.assert_array_equal(part, value.numpy())
        if component == "unet":
            assert prov.sources["down_blocks.0.attentions.0.proj_in.weight"][1] == \
                "model.diffusion_model.input_blocks.1.1.proj_in.weight"
            transforms = {t for e in prov.graphs["model.onnx"].initializers.values() for _, t in e.parts}
            assert {"identity", "transpose", "reshape"} <= transforms


def test_concat_and_cast_are_found(tmp_path):
    """A fused q/k/v (concat of three sources along an axis) and a float16 copy are recognised."""
    import onnx
    from onnx import helper, numpy_helper
    from sdrt.export.provenance import _Index, graph_provenance

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(3))
    fused = np.concatenate([q.T, k.T, v.T], axis=1)  # [in, 3 * out] as a fused MatMul holds it
    half = k.astype(np.float16)
    inits = [numpy_helper.from_array(fused, "qkv"), numpy_helper.from_array(half, "k16")]
    graph = helper.make_graph([helper.make_node("Identity", ["qkv"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    d = graph_provenance(tmp_path / "model.onnx", _Index({"q.weight": q, "k.weight": k, "v.weight": v}))
    assert d["initializers"]["qkv"] == {"from": [["q.weight", "transpose"], ["k.weight", "transpose"],
                                                  ["v.weight", "transpose"]], "axis": 1}
    assert d["initializers"]["k16"] == {"from": [["k.weight", "identity"]]}
    prov = provenance.Provenance("x", {n: (a.shape, None) for n, a in (("q.weight", q), ("k.weight", k),
                                                                     ("v.weight", v))}, {})
    entry = provenance.Entry((("q.weight", "transpose"), ("k.weight", "transpose"), ("v.weight", "transpose")), 1)
    parts = provenance.split_parts(fused, entry, prov)
    for got, want in zip(parts, (q, k, v)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(provenance.join_parts(parts, entry, fused.shape), fused)


def test_bundle_without_provenance_is_one_line(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    for p in old.glob("*/provenance.json"):
        p.unlink()
    d = tmp_path / "Lora"
    write_network(d / "x.safetensors", {"lora_unet_conv_in.alpha": torch.tensor(1.0)})
    pipe = Pipeline(old, lora_dir=d)
    with pytest.raises(SdrtError, match=r"has no provenance\.json .* re-export the bundle"):
        pipe("a <lora:x:1>", steps=1)
    pipe("no tags here", steps=1)  # bundles without provenance still serve prompts without networks
    # a provenance that does not fit the graph (tampered, or a graph rewritten after export): one line
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    path = tampered / "unet" / "provenance.json"
    d = json.loads(path.read_text())
    inits = d["graphs"]["model.cpu.onnx"]["initializers"]
    inits["no_such_initializer"] = inits.pop(next(iter(inits)))
    path.write_text(json.dumps(d))
    write_network(d_lora := tmp_path / "Lora2" / "y.safetensors",
                  {"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
                   "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    pipe = Pipeline(tampered, lora_dir=d_lora.parent)
    with pytest.raises(SdrtError, match=r"model\.cpu\.onnx: its provenance does not match the graph "
                                        r"\(no_such_initializer\); re-export the bundle"):
        pipe("a <lora:y:1>", steps=1)


# -- fidelity, each format --

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_matches_the_webui_merge(fmt, pipe, tiny_modules, tiny_configs, tmp_path):
    g = torch.Generator().manual_seed(sum(map(ord, fmt)))
    u, _, t = tiny_modules
    tensors = FORMATS[fmt](u, t, g, tiny_configs)
    suffix = ".pt" if fmt in ("loha", "ia3") else ".safetensors"  # torch pickles through the safe unpickler
    write_network(_lora_dir(pipe) / f"{fmt}{suffix}", tensors)
    te, un = 0.7, 1.2
    merged = copy.deepcopy(tiny_modules)
    webui_merge(tensors, layer_table(merged[0], merged[2], tiny_configs), te, un)
    changed = sum(not torch.equal(a, b) for m0, m1 in zip(tiny_modules, merged)
                  for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert changed >= 3
    image, info = runtime_image(pipe, f"{PROMPT} <lora:{fmt}:{te}:{un}>")
    ref = reference_image(tmp_path, merged, tiny_configs, pipe, f"{PROMPT} <lora:{fmt}:{te}:{un}>")
    plain, _ = runtime_image(pipe, PROMPT)
    assert psnr(ref, image, 255.0) >= 60, fmt
    assert psnr(plain, image, 255.0) < 40  # the network changed the image
    assert f'Lora hashes: "{fmt}: ' in info


def test_named_multipliers_several_networks_and_rank(pipe, tiny_modules, tiny_configs, tmp_path):
    """``<lora:a:unet=0.6:te=0.8>`` with a second network, the second one's rank cut by ``dyn``:
    applied in prompt order, each on the weights the one before left."""
    u, _, t = tiny_modules
    a = make_lora(u, t, torch.Generator().manual_seed(1))
    b = make_ia3(u, t, torch.Generator().manual_seed(2))
    c = make_lora(u, t, torch.Generator().manual_seed(3), rank=6)
    for name, tensors in (("multi_a", a), ("multi_b", b), ("multi_c", c)):
        write_network(_lora_dir(pipe) / "sub" / f"{name}.safetensors", tensors)
    prompt = f"{PROMPT} <lora:multi_a:unet=0.6:te=0.8> <lora:multi_b:0.5> <lora:multi_c:1:1:2>"
    merged = copy.deepcopy(tiny_modules)
    layers = layer_table(merged[0], merged[2], tiny_configs)
    webui_merge(a, layers, 0.8, 0.6)
    webui_merge(b, layers, 0.5, 0.5)
    webui_merge(c, layers, 1.0, 1.0, dyn=2)
    image, info = runtime_image(pipe, prompt)
    assert psnr(reference_image(tmp_path, merged, tiny_configs, pipe, prompt), image, 255.0) >= 60
    assert info.splitlines()[-1].count("multi_") == 3


@pytest.mark.parametrize("fmt", ["lora", "peft"])
def test_diffusers_lora_loading_agrees(fmt, pipe, tiny_modules, tiny_configs, tmp_path):
    """A second reference where diffusers reads the format (kohya LoRA with LoCon, PEFT): its
    ``load_lora_weights`` + ``fuse_lora`` merge equals the webui's, and the runtime's image matches it."""
    pytest.importorskip("peft", reason="diffusers loads LoRA through peft")
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    u, v, t = tiny_modules
    tensors = FORMATS[fmt](u, t, torch.Generator().manual_seed(21), tiny_configs)
    write_network(_lora_dir(pipe) / f"diffusers_{fmt}.safetensors", tensors)
    tok_dir = pipe.bundle.path / "tokenizer"
    fused = StableDiffusionPipeline(vae=copy.deepcopy(v), text_encoder=copy.deepcopy(t), unet=copy.deepcopy(u),
                                    tokenizer=CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")),
                                    scheduler=PNDMScheduler(), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    fused.load_lora_weights({k: x.clone() for k, x in tensors.items()})
    fused.fuse_lora(lora_scale=0.8)
    fused.unload_lora_weights()
    merged = copy.deepcopy(tiny_modules)
    webui_merge(tensors, layer_table(merged[0], merged[2], tiny_configs), 0.8, 0.8)
    for ours, theirs, original in ((merged[0], fused.unet, u), (merged[2], fused.text_encoder, t)):
        a, b, o = ours.state_dict(), theirs.state_dict(), original.state_dict()
        assert sum(not torch.equal(a[k], o[k]) for k in o) >= 4
        assert max(float((a[k] - b[k]).abs().max()) for k in o) < 1e-5
    image, _ = runtime_image(pipe, f"{PROMPT} <lora:diffusers_{fmt}:0.8>")
    modules = (fused.unet, v, fused.text_encoder)
    assert psnr(reference_image(tmp_path, modules, tiny_configs, pipe, PROMPT), image, 255.0) >= 60


# -- switching, caching --

def test_switching_sets_between_generations(pipe, tiny_modules):
    u, _, t = tiny_modules
    write_network(_lora_dir(pipe) / "switch_a.safetensors", make_lora(u, t, torch.Generator().manual_seed(4)))
    write_network(_lora_dir(pipe) / "switch_b.safetensors", make_loha(u, t, torch.Generator().manual_seed(5)))
    base, _ = runtime_image(pipe, PROMPT)
    first_a, _ = runtime_image(pipe, f"{PROMPT} <lora:switch_a:1>")
    session = pipe.unet._session
    again_a, _ = runtime_image(pipe, f"{PROMPT} <lora:switch_a:1>")
    assert pipe.unet._session is session  # the set in place: nothing made again
    b, _ = runtime_image(pipe, f"{PROMPT} <lora:switch_b:1>")
    cached = pipe.networks._cache[str(pipe.unet.path)]
    assert len(cached) == 2
    back_a, _ = runtime_image(pipe, f"{PROMPT} <lora:switch_a:1>")
    back_base, _ = runtime_image(pipe, PROMPT)
    assert np.array_equal(first_a, again_a) and np.array_equal(first_a, back_a)
    assert np.array_equal(base, back_base)
    assert not np.array_equal(first_a, b) and not np.array_equal(first_a, base)
    assert pipe.unet._overrides is None and pipe.text_encoder.session._overrides is None


def test_img2img_and_fused_cpu_graph_take_the_networks(tiny_bundle, tiny_modules, tmp_path):
    """The fused CPU graph (model.cpu.onnx: GroupNorm's own gamma / beta initializers) and the
    portable one give the same image with a norm diff and LoCon applied; img2img applies them too."""
    from PIL import Image

    u, _, t = tiny_modules
    d = tmp_path / "Lora"
    g = torch.Generator().manual_seed(6)
    write_network(d / "n.safetensors", {**make_norm(u, t, g), **make_lora(u, t, g)})
    pipe = Img2imgPipeline(tiny_bundle, lora_dir=d)
    assert pipe.unet.path.name == "model.cpu.onnx"
    fused, _ = runtime_image(pipe, f"{PROMPT} <lora:n:1>")
    from sdrt.runtime.backends import open_component

    pipe.denoiser.unet = open_component(pipe.bundle, "unet", graph=tiny_bundle / "unet" / "model.onnx")
    portable, _ = runtime_image(pipe, f"{PROMPT} <lora:n:1>")
    assert psnr(fused, portable, 255.0) >= 60
    init = Image.fromarray(fused)
    with_net = pipe.img2img(f"{PROMPT} <lora:n:1>", init_images=[init], steps=4, seed=1, denoising_strength=0.6)
    without = pipe.img2img(PROMPT, init_images=[init], steps=4, seed=1, denoising_strength=0.6)
    assert not np.array_equal(np.asarray(with_net[0].image), np.asarray(without[0].image))


# -- names, hashes, warnings --

def test_names_aliases_and_hashes(pipe, tiny_modules, caplog):
    u, _, t = tiny_modules
    tensors = make_peft(u, t, torch.Generator().manual_seed(8))
    tensors["lora_unet_no_such_layer.alpha"] = torch.tensor(1.0)
    path = write_network(_lora_dir(pipe) / "deep" / "er" / "file_stem.safetensors", tensors,
                         {"ss_output_name": "my_alias"})
    raw = path.read_bytes()
    addnet = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    with caplog.at_level(logging.WARNING):
        _, info = runtime_image(pipe, f"{PROMPT} <lora:my_alias:0.5>")
    assert f'Lora hashes: "my_alias: {addnet[:12]}"' in info
    assert any("1 keys match nothing" in r.getMessage() and "lora_unet_no_such_layer.alpha" in r.getMessage()
               for r in caplog.records)
    _, info = runtime_image(pipe, f"{PROMPT} <lora:file_stem:0.5>")
    assert f'"file_stem: {addnet[:12]}"' in info
    pt = write_network(_lora_dir(pipe) / "as_pickle.pt", make_peft(u, t, torch.Generator().manual_seed(8)))
    _, info = runtime_image(pipe, f"{PROMPT} <lora:as_pickle:0.5>")
    assert f'"as_pickle: {hashlib.sha256(pt.read_bytes()).hexdigest()[:12]}"' in info
    write_network(_lora_dir(pipe) / "meta.safetensors", make_peft(u, t, torch.Generator().manual_seed(8)),
                  {"sshs_model_hash": "0123456789abcdef0123"})
    _, info = runtime_image(pipe, f"{PROMPT} <lora:meta:0.5>")
    assert '"meta: 0123456789ab"' in info
    with pytest.raises(SdrtError, match=r"no LoRA named 'nowhere' in .*--lora-dir"):
        runtime_image(pipe, f"{PROMPT} <lora:nowhere:1>")


# -- bad input --

def test_malicious_pickle_is_refused_canary_untouched(pipe, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("untouched")

    class Evil:
        def __reduce__(self):
            return os.system, (f"echo ran > {canary}",)

    torch.save({"lora_unet_conv_in.lora_up.weight": Evil()}, _lora_dir(pipe) / "evil.pt")
    with pytest.raises(SdrtError, match=r"evil\.pt: refusing to load (posix|os)\.system"):
        runtime_image(pipe, f"{PROMPT} <lora:evil:1>")
    assert canary.read_text() == "untouched"


def test_truncated_and_misshaped_files_are_one_line(pipe, tiny_modules):
    u, _, t = tiny_modules
    good = write_network(_lora_dir(pipe) / "good.safetensors", make_lora(u, t, torch.Generator().manual_seed(9)))
    truncated = _lora_dir(pipe) / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(SdrtError, match=r"truncated\.safetensors: tensor '.*' has the wrong size"):
        runtime_image(pipe, f"{PROMPT} <lora:truncated:1>")
    bad = make_lora(u, t, torch.Generator().manual_seed(9))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    bad[key] = torch.zeros(5, 4)
    write_network(_lora_dir(pipe) / "misshaped.safetensors", bad)
    base, _ = runtime_image(pipe, PROMPT)
    with pytest.raises(SdrtError, match=r"misshaped\.safetensors: lora_unet_down_blocks_0_attentions_0_"
                                        r"transformer_blocks_0_attn1_to_q\.\S+: "):
        runtime_image(pipe, f"{PROMPT} <lora:misshaped:1>")
    # nothing half-applied or cached: the sessions keep what they had, the set is not cached
    assert all(len(sig) == 0 for sig in pipe.networks._current.values())
    again, _ = runtime_image(pipe, PROMPT)
    assert np.array_equal(base, again)
    unknown = {"lora_unet_conv_in.something_else": torch.zeros(3)}
    write_network(_lora_dir(pipe) / "unknown_type.safetensors", unknown)
    with pytest.raises(SdrtError, match=r"unknown_type\.safetensors: lora_unet_conv_in\.something_else: no LoRA"):
        runtime_image(pipe, f"{PROMPT} <lora:unknown_type:1>")


def test_cli_without_torch_applies_lora_and_vae(tiny_bundle, tmp_path, no_torch_dir, tiny_modules, tiny_configs):
    from conftest import run_sdrt

    u, _, t = tiny_modules
    d = tmp_path / "Lora"
    write_network(d / "x.safetensors", make_lora(u, t, torch.Generator().manual_seed(10)))
    _vae_file(tiny_modules, tiny_configs, tmp_path / "VAE" / "my-vae.safetensors")
    r = run_sdrt("generate", f"{PROMPT} <lora:x:0.5>", "-m", tiny_bundle, "--steps", 2, "--lora-dir", d,
                 "--vae", "my-vae", "--vae-dir", tmp_path / "VAE", "--output", tmp_path / "out",
                 pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    (png,) = (tmp_path / "out").glob("*.png")
    from PIL import Image

    text = Image.open(png).text["parameters"]
    assert 'Lora hashes: "x: ' in text and "VAE: my-vae.safetensors" in text
    r = run_sdrt("generate", f"{PROMPT} <lora:missing:0.5>", "-m", tiny_bundle, "--steps", 2, "--lora-dir", d,
                 "--output", tmp_path / "out2", pythonpath_first=no_torch_dir)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: no LoRA named 'missing'")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


# -- external VAE --

def _vae_file(tiny_modules, tiny_configs, path, seed=12, prefix=""):
    """The tiny VAE with changed weights, as a webui VAE file (LDM keys, ``first_stage_model`` stripped)."""
    vae = copy.deepcopy(tiny_modules[1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ldm = convert.diffusers_to_ldm({"unet": tiny_modules[0].state_dict(), "vae": vae.state_dict(),
                                    "text_encoder": tiny_modules[2].state_dict()}, tiny_configs)
    sd = {prefix + k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    return vae, path


@pytest.mark.parametrize("name", ["nai.vae.pt", "other.safetensors"])
def test_external_vae_matches_the_reference(tiny_bundle, tiny_modules, tiny_configs, tmp_path, name):
    vae, path = _vae_file(tiny_modules, tiny_configs, tmp_path / "VAE" / name,
                          prefix="first_stage_model." if name.endswith(".pt") else "")
    pipe = Pipeline(tiny_bundle, vae=path)
    image, info = runtime_image(pipe, PROMPT)
    merged = (tiny_modules[0], vae, tiny_modules[2])
    assert psnr(reference_image(tmp_path, merged, tiny_configs, pipe, PROMPT), image, 255.0) >= 60
    plain, _ = runtime_image(Pipeline(tiny_bundle), PROMPT)
    assert psnr(plain, image, 255.0) < 40
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"Model: tiny, VAE hash: {sha[:10]}, VAE: {name}," in info or f"VAE hash: {sha[:10]}, VAE: {name}" in info
    fields = [f.split(":")[0].strip() for f in info.splitlines()[-1].split(", ")]
    assert fields.index("VAE hash") == fields.index("Model") + 1 and fields.index("VAE") == fields.index("Model") + 2
    # img2img encodes with the file's encoder weights
    i2i = Img2imgPipeline(tiny_bundle, vae=path)
    from PIL import Image

    ours = i2i.img2img(PROMPT, init_images=[Image.fromarray(image)], steps=3, seed=1, denoising_strength=0.5)
    theirs = Img2imgPipeline(tiny_bundle).img2img(PROMPT, init_images=[Image.fromarray(image)], steps=3, seed=1,
                                                  denoising_strength=0.5)
    assert not np.array_equal(np.asarray(ours[0].image), np.asarray(theirs[0].image))


def test_vae_automatic_rule_and_bad_files(tiny_modules, tiny_configs, tiny_bundle, tmp_path):
    ckpt = tmp_path / "models" / "nai.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert find_vae(ckpt, None, [tmp_path / "none"]) is None
    (tmp_path / "models" / "nai.vae.pt").write_bytes(b"")
    (tmp_path / "models" / "other.vae.pt").write_bytes(b"")
    assert find_vae(ckpt, None, [tmp_path / "none"]).name == "nai.vae.pt"
    vae_dir = tmp_path / "VAE"
    vae_dir.mkdir()
    (vae_dir / "model2.safetensors").write_bytes(b"")
    assert find_vae(tmp_path / "models" / "model2.safetensors", None, [vae_dir]).name == "model2.safetensors"
    assert find_vae(None, "model2", [vae_dir]).name == "model2.safetensors"
    # a VAE file lacking weights / mis-shaped: one line naming the file and key
    _, path = _vae_file(tiny_modules, tiny_configs, tmp_path / "v.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    key = "decoder.conv_in.weight"
    save_file({**sd, key: torch.zeros(3, 3)}, str(tmp_path / "shaped.safetensors"))
    with pytest.raises(SdrtError, match=r"shaped\.safetensors: decoder\.conv_in\.weight has shape \[3, 3\]"):
        Pipeline(tiny_bundle, vae=tmp_path / "shaped.safetensors")
    del sd[key]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SdrtError, match=r"partial\.safetensors: not a VAE for this model: 1 weights missing, "
                                        r"such as decoder\.conv_in\.weight"):
        Pipeline(tiny_bundle, vae=tmp_path / "partial.safetensors")


def test_provenance_file_is_json_with_ldm_names(tiny_bundle):
    d = json.loads((tiny_bundle / "text_encoder" / "provenance.json").read_text())
    assert d["format"] == "sdrt-provenance" and d["component"] == "text_encoder"
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert d["sources"][key]["ldm"] == f"cond_stage_model.transformer.{key}"
    names = layer_names("text_encoder", provenance.load(tiny_bundle / "text_encoder"))
    assert names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == key[:-len(".weight")]
    assert names["transformer_text_model_encoder_layers_0_self_attn_q_proj"] == key[:-len(".weight")]


# -- reduced-precision graphs --

@pytest.fixture(scope="module")
def precision_bundle(precise_bundle):
    """The tiny model with its fp32, int8, int8-static and fp16 graphs (``sdrt export``'s, shared with test_precision)."""
    return precise_bundle[0]


INT8_GRAPHS = (("unet", "model.cpu-int8.onnx"), ("unet", "model.cpu-int8-static.onnx"),
               ("vae_decoder", "model.cpu-int8-static.onnx"), ("unet", "model.cpu-mixed.onnx"))


def test_fp16_graphs_have_provenance(precision_bundle):
    from sdrt.runtime.networks.apply import build_overrides

    prov = provenance.load(precision_bundle / "unet")
    half = prov.graph(precision_bundle / "unet" / "model.cuda-fp16.onnx")
    assert set(half.by_source()) == set(prov.sources)  # every weight, cast (tiny values clamped by the converter)
    weights = GraphWeights(precision_bundle / "unet" / "model.cuda-fp16.onnx")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    new = {key: np.full(prov.shape(key), 0.5, np.float32)}
    overrides = build_overrides(prov, half, weights, new)
    (name,) = overrides.arrays
    assert overrides.arrays[name].dtype == np.float16 and np.all(overrides.arrays[name] == 0.5)


@pytest.mark.parametrize("component,graph", INT8_GRAPHS)
def test_int8_quantization_is_recorded_and_reproduced(precision_bundle, tiny_modules, component, graph):
    """Every quantized weight of the int8 graphs has its record, and re-quantizing the model's own
    weights by the records (the LoRA path, with no change) gives the graph's int8 values, scales
    and int32 biases bit for bit: the runtime quantizes as the exporter's quantizer did."""
    import dataclasses

    from sdrt.runtime.networks.apply import requantized

    prov = provenance.load(precision_bundle / component)
    path = precision_bundle / component / graph
    gprov = prov.graph(path)
    weights = GraphWeights(path)
    assert gprov.quantized and gprov.quantization is not None
    zero_points = {r.zero_point for r in gprov.quantization.values()}  # per channel: int8 vectors too
    quantized = {n for n, t in weights.index.items() if t.data_type in (2, 3) and t.size > 1} - zero_points
    assert set(gprov.quantization) == quantized
    assert all(r.scheme.symmetric and r.scheme.dtype == "int8" for r in gprov.quantization.values())
    if "static" in graph or "mixed" in graph:  # int8-static (per layer, mixed's): per output channel: convolutions along axis 0, MatMul weights [in, out] along 1
        assert {r.scheme.axis for r in gprov.quantization.values()} == {0, 1}
        assert sum(r.bias is not None for r in gprov.quantization.values()) > 10
    else:
        assert {r.scheme.axis for r in gprov.quantization.values()} == {None}
    u, v, t = tiny_modules
    module = u if component == "unet" else v
    values = {k: w for k, w in state_arrays(module).items() if k in prov.sources}
    skipped = []
    arrays = requantized(prov, gprov, weights, values, skipped)
    assert not skipped and quantized <= set(arrays)
    for name, value in arrays.items():
        assert value.dtype == weights.read(name).dtype and value.tobytes() == weights.read(name).tobytes(), name
    old = dataclasses.replace(gprov, quantization=None)  # a bundle exported before the record
    with pytest.raises(SdrtError, match=r"is quantized \(int8\) and was exported before sdrt recorded how its "
                                        r"weights were quantized: re-export the bundle"):
        requantized(prov, old, weights, values, [])


def state_arrays(module):
    from sdrt.export.provenance import state_arrays as arrays

    return arrays(module)


@pytest.mark.parametrize("graph", ["model.cpu-int8.onnx", "model.cpu-int8-static.onnx"])
def test_int8_overrides_reach_the_prepacked_weights(precision_bundle, tiny_modules, tmp_path, graph):
    """ONNX Runtime pre-packs int8 weights (MatMulInteger / QLinearMatMul / QLinearConv) when it
    makes the session: the session made with the re-quantized values gives, bit for bit, what a
    session of the graph file written with those values gives, and not the graph's own output."""
    from onnx import numpy_helper

    from sdrt.runtime.backends.onnxruntime import Session
    from sdrt.runtime.networks.apply import Networks

    u, _, t = tiny_modules
    d = tmp_path / "Lora"
    write_network(d / "x.safetensors", make_lora(u, t, torch.Generator().manual_seed(11)))
    bundle = open_bundle(precision_bundle)
    path = precision_bundle / "unet" / graph
    session = Session(path)
    g = np.random.default_rng(0)
    feeds = {"sample": g.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, 32), np.float32)}
    feeds = {k: v for k, v in feeds.items() if k in session.inputs}
    plain = session.run(feeds)["out_sample"]
    networks = Networks(bundle, d)
    networks.activate(f"{PROMPT} <lora:x:1>", {"unet": session})
    merged = session.run(feeds)["out_sample"]
    overrides = session._overrides  # what the session was made with
    gprov = provenance.load(precision_bundle / "unet").graph(path)
    assert any(n in overrides.arrays for n in gprov.quantization)  # int8 weights among the overrides
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in overrides.arrays:
            init.CopyFrom(numpy_helper.from_array(overrides.arrays[init.name], init.name))
    copy_path = precision_bundle / "unet" / f"written-{graph}"  # beside the graph: its data file names stay valid
    onnx.save(model, str(copy_path), save_as_external_data=True, location=f"written-{graph}_data")
    try:
        written = Session(copy_path).run(feeds)["out_sample"]
    finally:
        copy_path.unlink()
        (copy_path.parent / f"written-{graph}_data").unlink()
    assert np.array_equal(merged, written)
    assert not np.allclose(merged, plain, atol=1e-3)


# Measured on this project's CI-class CPU (AMD EPYC Zen 3, AVX2 without VNNI, where ONNX Runtime's
# u8 x s8 products saturate: runtime/precision.py int8_saturates) with ONNX Runtime 1.32, final
# 8-bit image, Euler 4 steps, PSNR dB: (LoRA graph vs fp32 graph with the LoRA, same without LoRA)
INT8_LORA_DB = {"int8": (44.9, 32.1), "int8-static": (20.1, 19.8)}
# How much further the LoRA image may be: int8-static's two images sit near 20 dB, where the
# trajectory is chaotic: a float-rounding change in its fp32 layers (the Winograd convolutions)
# moved them from 20.1 / 19.8 to 19.1 / 20.5 dB
# mixed's per-layer graph: its layers kept in fp32 and its activation ranges were chosen without
# the LoRA, which takes it from 36.1 to 30.4 dB (measured here; the pipeline warns)
LORA_SLACK_DB = {"int8": 1.0, "int8-static": 2.0, "mixed": 7.0}


def test_lora_on_int8_graphs_costs_no_more_than_quantization(precision_bundle, tiny_modules, tiny_configs, tmp_path,
                                                             caplog):
    """The same LoRA on the int8 / int8-static / mixed (int8-static per layer) graphs, against the
    fp32 graph with the LoRA (which holds 60 dB to the torch reference): no further from it than
    the int8 graph without LoRA is from the fp32 graph without LoRA (LORA_SLACK_DB of slack)."""
    u, _, t = tiny_modules
    d = tmp_path / "Lora"
    tensors = make_lora(u, t, torch.Generator().manual_seed(11))
    write_network(d / "x.safetensors", tensors)
    bundle = open_bundle(precision_bundle)
    pipes = {p: Pipeline(bundle, precision=p, lora_dir=d) for p in ("fp32", "int8", "int8-static", "mixed")}
    assert pipes["int8-static"].unet.path.name == "model.cpu-int8-static.onnx"
    assert pipes["mixed"].unet.path.name == "model.cpu-mixed.onnx"  # int8-static per layer
    prompt = f"{PROMPT} <lora:x:1>"
    merged = copy.deepcopy(tiny_modules)
    webui_merge(tensors, layer_table(merged[0], merged[2], tiny_configs), 1.0, 1.0)
    ref = reference_image(tmp_path, merged, tiny_configs, pipes["fp32"], prompt)
    with caplog.at_level("WARNING", logger="sdrt.runtime.pipeline.txt2img"):
        with_lora = {p: runtime_image(pipe, prompt)[0] for p, pipe in pipes.items()}
    warned = [r.getMessage() for r in caplog.records if "activation ranges were calibrated" in r.getMessage()]
    # once per pipeline whose graphs have calibrated ranges: int8-static's and mixed's, not int8's
    assert len(warned) == 2 and warned[0].startswith("precision int8-static: ") \
        and warned[1].startswith("precision mixed (unet int8-static per layer"), warned
    without = {p: runtime_image(pipe, PROMPT)[0] for p, pipe in pipes.items()}
    assert psnr(ref, with_lora["fp32"], 255.0) >= 60
    assert psnr(without["fp32"], with_lora["fp32"], 255.0) < 30  # a LoRA that changes the image
    for p, (lora_db, plain_db) in {**INT8_LORA_DB, "mixed": (None, None)}.items():
        lora_psnr = psnr(with_lora["fp32"], with_lora[p], 255.0)
        plain_psnr = psnr(without["fp32"], without[p], 255.0)
        assert lora_psnr >= plain_psnr - LORA_SLACK_DB[p], (p, lora_psnr, plain_psnr)
        if lora_db is None:
            continue
        if int8_saturates():  # where these figures were measured
            assert abs(lora_psnr - lora_db) <= 3.0 and abs(plain_psnr - plain_db) <= 3.0, (p, lora_psnr, plain_psnr)


# -- SDXL: both text encoders and the UNet --

def test_sdxl_lora_matches_the_merged_export(tmp_path, caplog, sdxl_bundle):
    """An SDXL LoRA in kohya's naming (``lora_te1_`` CLIP ViT-L, ``lora_te2_`` OpenCLIP bigG, the UNet
    in LDM and in diffusers names) applied to a bundle (conftest's tiny SDXL) gives the image of the
    bundle exported from its torch modules with the network merged the webui's way."""
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import export_modules

    configs, base = copy.deepcopy(sdxl_bundle)
    modules = random_modules(configs, seed=3)  # the bundle's weights
    unet, _, te1, te2 = modules
    g = torch.Generator().manual_seed(5)

    def linears(module, prefix, suffixes):
        out = {}
        for name, m in module.named_modules():
            if name.endswith(suffixes):
                full = name if name.startswith("text_model.") or prefix == "lora_unet_" else f"text_model.{name}"
                out[prefix + full.replace(".", "_")] = m
        return out

    targets = {**linears(te1, "lora_te1_", ("q_proj", "fc1")), **linears(te2, "lora_te2_", ("v_proj", "out_proj")),
               **linears(unet, "lora_unet_", ("attn2.to_k", "proj_in", "ff.net.2"))}
    ldm = convert.key_map(configs)["unet"]
    tensors = {}
    for i, (layer, m) in enumerate(sorted(targets.items())):
        W = m.weight
        if layer.startswith("lora_unet_") and i % 2:  # every other UNet layer in the LDM naming
            key = next(v for k, v in ldm.items() if k.replace(".", "_") == layer[len("lora_unet_"):] + "_weight")
            layer = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        tensors[f"{layer}.lora_down.weight"] = _r(g, 4, *W.shape[1:])
        tensors[f"{layer}.lora_up.weight"] = _r(g, W.shape[0], 4, *([1, 1] if W.dim() == 4 else []))
        tensors[f"{layer}.alpha"] = torch.tensor(2.0)
    write_network(tmp_path / "Lora" / "xl.safetensors", tensors)

    merged = copy.deepcopy(modules)
    layers = layer_table(merged[0], merged[2], configs)
    layers |= {"lora_te1_" + k[len("lora_te_"):]: v for k, v in layers.items() if k.startswith("lora_te_")}
    for name, m in merged[3].named_modules():
        if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            layers["lora_te2_" + full.replace(".", "_")] = (m, True)
    assert all(k.split(".")[0] in layers for k in tensors)
    webui_merge(tensors, layers, 0.8, 0.6)

    source = {"name": "xl", "kind": "random", "sha256": None, "hash": None}
    want = export_modules(*merged[:3], configs, tmp_path / "merged", source=source, text_encoder_2=merged[3])
    args = {"negative_prompt": "blurry", "sampler_name": "Euler", "steps": STEPS, "seed": SEED, "width": 64,
            "height": 64}
    pipe = Pipeline(base, lora_dir=tmp_path / "Lora")
    with caplog.at_level(logging.WARNING):
        (got,) = pipe(f"{PROMPT} <lora:xl:0.8:0.6>", **args)
    assert not [r for r in caplog.records if "xl" in r.getMessage()], "keys matched nothing"
    (expected,) = Pipeline(want)(PROMPT, **args)
    (plain,) = pipe(PROMPT, **args)
    assert psnr(np.asarray(expected.image), np.asarray(got.image), 255.0) >= 60
    assert psnr(np.asarray(plain.image), np.asarray(got.image), 255.0) < 40  # the network changed the image
    assert 'Lora hashes: "xl: ' in got.infotext


# -- TensorRT: refitting sdrt's engines, keying the TensorRT EP's cache --

class _RecordingRefitter:
    """TensorRT's ``Refitter`` as far as ``refit_engine`` uses it, recording what it is given.

    A stand-in because TensorRT cannot be installed here (no NVIDIA GPU): the engine it refits is
    a dict of the portable graph's float initializers by name, the names TensorRT's ONNX parser
    gives an engine's weights. Like TensorRT, it refuses unknown names and wrong sizes, and reports
    a weight it combined with a set one (``combined``: pairs) as missing until that one is set."""

    def __init__(self, engine, logger):
        self.engine, self.given = engine, {}

    def get_all_weights(self):
        return sorted(self.engine.refittable_weights)

    def get_weights_prototype(self, name):
        return type("Weights", (), {"dtype": np.float32, "size": self.engine.values[name].size})()

    def set_named_weights(self, name, array):
        if name not in self.engine.refittable_weights or array.size != self.engine.values[name].size:
            return False
        self.given[name] = np.array(array)
        return True

    def get_missing_weights(self):
        return [b for a, b in self.engine.combined if a in self.given and b not in self.given]

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        for name, value in self.given.items():
            self.engine.values[name] = value.reshape(self.engine.values[name].shape)
        self.engine.refits.append(sorted(self.given))
        return True


class _RecordingTensorRT:
    """The ``tensorrt`` module's names that ``refit_engine`` calls."""

    Refitter = _RecordingRefitter

    @staticmethod
    def nptype(dtype):
        return dtype


class _Engine:
    def __init__(self, graph, combined=()):
        weights = GraphWeights(graph)
        self.values = {n: np.array(weights.read(n)) for n, t in weights.index.items() if t.is_float and t.size > 1}
        self.refittable_weights = set(self.values)
        self.refittable, self.combined, self.refits = True, list(combined), []


def test_tensorrt_refit_sets_the_merged_weights_by_onnx_name(pipe, tiny_modules, tmp_path):
    """The refit of an engine built from the portable graph sets, by ONNX initializer name, exactly
    the values the ONNX Runtime session of that graph is made with (a real LoRA file on the tiny
    bundle); the graph written with the refitted weights gives that session's output bit for bit;
    weights TensorRT combined with them get the graph's own; a switch to no set restores all."""
    from onnx import numpy_helper

    from sdrt.runtime.backends.onnxruntime import Session
    from sdrt.runtime.backends.tensorrt import refit_engine, refit_weights

    u, _, t = tiny_modules
    write_network(_lora_dir(pipe) / "refit.safetensors", make_lora(u, t, torch.Generator().manual_seed(21)))
    graph = pipe.bundle.component("unet")  # what sdrt build builds the engines from
    session = Session(graph)
    pipe.networks.activate(f"{PROMPT} <lora:refit:0.8>", {"unet": session})
    overrides = session._overrides
    assert overrides is not None and len(overrides.arrays) >= 10
    partner = next(n for n in sorted(GraphWeights(graph).index) if n.endswith(".bias") and n not in overrides.arrays)
    engine = _Engine(graph, combined=[(sorted(overrides.arrays)[0], partner)])
    own = {n: v.copy() for n, v in engine.values.items()}
    named = refit_weights(graph, overrides.arrays, ())
    assert refit_engine(_RecordingTensorRT, engine, None, named, graph) == sorted(overrides.arrays) + [partner]
    for name, value in overrides.arrays.items():
        assert engine.values[name].dtype == np.float32 and engine.values[name].tobytes() == value.tobytes(), name
    assert np.array_equal(engine.values[partner], own[partner])
    changed = {n for n in engine.values if not np.array_equal(engine.values[n], own[n])}
    assert changed == set(overrides.arrays)
    model = onnx.load(str(graph))
    for init in model.graph.initializer:
        if init.name in changed:
            init.CopyFrom(numpy_helper.from_array(engine.values[init.name], init.name))
    written = tmp_path / "refitted.onnx"
    onnx.save(model, str(written), save_as_external_data=True, location="refitted.onnx_data")
    g = np.random.default_rng(1)
    feeds = {"sample": g.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([300.0, 300.0], np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, 32), np.float32)}
    assert np.array_equal(Session(written).run(feeds)["out_sample"], session.run(feeds)["out_sample"])
    # Back to the graph's own weights: everything the set changed is set again from the graph
    named = refit_weights(graph, None, sorted(overrides.arrays))
    refit_engine(_RecordingTensorRT, engine, None, named, graph)
    assert all(np.array_equal(engine.values[n], own[n]) for n in own)
    # A weight TensorRT folded into a constant, an engine built without the refit flag: one line each
    engine.refittable_weights.discard(sorted(overrides.arrays)[1])
    with pytest.raises(SdrtError, match=r"has no refittable weight named .*folded it into a constant"):
        refit_engine(_RecordingTensorRT, engine, None, dict(overrides.arrays), graph)
    engine.refittable = False
    with pytest.raises(SdrtError, match=r"built without the refit flag .*sdrt build --force"):
        refit_engine(_RecordingTensorRT, engine, None, dict(overrides.arrays), graph)
    pipe.networks.activate(PROMPT, {"unet": session})


def test_tensorrt_ep_engine_cache_is_keyed_by_the_weights(pipe, tiny_modules, tmp_path):
    """The TensorRT EP caches engines by the graph's structure, not its weights: a session made
    with merged weights gets an engine cache folder named by their digest (same values, same
    folder; the graph's own weights, the component's folder)."""
    from sdrt.runtime.backends.onnxruntime import ep_options_for
    from sdrt.runtime.networks.apply import Overrides

    graph = pipe.bundle.component("unet")
    index = GraphWeights(graph).index
    name = next(n for n, t in index.items() if t.external and t.is_float)
    base = {"trt_engine_cache_path": str(tmp_path / "ort-unet-0123"), "trt_fp16_enable": True}
    value = np.asarray(GraphWeights(graph).read(name), np.float32)
    a, b, a2 = (Overrides({name: v}, index) for v in (value + 1, value + 2, value + 1))
    folders = [ep_options_for(base, o)["trt_engine_cache_path"] for o in (a, b, a2)]
    assert folders[0] == folders[2] != folders[1] and all(Path(f).parent == Path(base["trt_engine_cache_path"])
                                                          for f in folders)
    assert ep_options_for(base, None) is base and ep_options_for(base, a)["trt_fp16_enable"] is True
