"""The webui's hypernetworks (``<hypernet:name:multiplier>``) put into the UNet graph (runtime/networks/hypernet.py).

The reference: the webui's ``HypernetworkModule`` (its Sequential, written here in torch) applied
the webui's way in every attention of the diffusers UNet of the torch reference (``context =
default(context, x)``, each hypernetwork's pair picked by the context's width, ``k = to_k(hn_k(
context))``, ``v = to_v(hn_v(context))``), sampled as ``sdrt verify`` samples; the runtime's
image must match it to 60 dB.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from sdrt.export.reference import TorchReference
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.networks.hypernet import ACTIVATIONS, read_hypernetwork
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline, to_uint8
from sdrt.runtime.text.extra_networks import parse_prompt
from test_networks import layer_table, make_lora, webui_merge, write_network

PROMPT = "a red circle on a blue background"
STEPS, SEED, SIZE = 4, 7, 64
# The tiny SD 1.x UNet: self-attention over 32 channels (down 0, up 1) and 64 (mid), and a text
# context 32 wide: a module of width 32 serves both its self- and its cross-attentions
WIDTHS = (32, 64)

TORCH_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                     "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "hardswish": torch.nn.Hardswish,
                     "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU,
                     "silu": torch.nn.SiLU, "mish": torch.nn.Mish, "softplus": torch.nn.Softplus,
                     "selu": torch.nn.SELU, "celu": torch.nn.CELU, "relu6": torch.nn.ReLU6,
                     "hardtanh": torch.nn.Hardtanh, "hardsigmoid": torch.nn.Hardsigmoid,
                     "softsign": torch.nn.Softsign, "tanhshrink": torch.nn.Tanhshrink,
                     "logsigmoid": torch.nn.LogSigmoid, "rrelu": torch.nn.RReLU, "hardshrink": torch.nn.Hardshrink,
                     "softshrink": torch.nn.Softshrink}


# -- the webui's modules, in torch (modules/hypernetworks/hypernetwork.py) --

class WebuiModule(torch.nn.Module):
    """``HypernetworkModule``: Linear, activation (not after the last Linear unless activate_output),
    LayerNorm, Dropout per the dropout structure; ``x + linear(x) * multiplier``."""

    def __init__(self, dim, structure, activation=None, layer_norm=False, activate_output=False, dropout=None):
        super().__init__()
        dropout = dropout or [0] * len(structure)
        layers = []
        for i in range(len(structure) - 1):
            layers.append(torch.nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
            if not (activation in ("linear", None) or (i >= len(structure) - 2 and not activate_output)):
                layers.append(TORCH_ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * structure[i + 1])))
            if dropout[i + 1] > 0:
                layers.append(torch.nn.Dropout(p=dropout[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * self.multiplier


def make_hypernet(path, seed, structure=(1, 2, 1), activation=None, layer_norm=False, activate_output=False,
                  use_dropout=False, dropout=None, widths=WIDTHS, old=False, scale=0.3):
    """A webui hypernetwork file with random weights; returns its torch modules {width: (k, v)}."""
    g = torch.Generator().manual_seed(seed)
    modules, d = {}, {}
    for w in widths:
        pair = []
        for _ in "kv":
            m = WebuiModule(w, list(structure), activation, layer_norm, activate_output, dropout).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
            pair.append(m)
        modules[w] = tuple(pair)
        states = [m.state_dict() for m in pair]
        if old:
            states = [{k.replace("linear.0", "linear1").replace("linear.1", "linear2"): v for k, v in s.items()}
                      for s in states]
        d[w] = tuple(states)
    d.update(step=10, name=path.stem, activation_func=activation, is_layer_norm=layer_norm,
             weight_initialization="Normal", sd_checkpoint="0123abcd", sd_checkpoint_name="tiny",
             optional_info=None)
    if not old:
        d.update(layer_structure=list(structure), activate_output=activate_output, use_dropout=use_dropout,
                 last_layer_dropout=False)
        if dropout is not None:
            d["dropout_structure"] = list(dropout)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, str(path))
    return modules


class HyperProcessor:
    """The webui's attention forward with hypernetworks on diffusers' ``Attention``."""

    def __init__(self, chain):
        self.chain = chain  # [(modules {width: (k, v)}, multiplier)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = context
        for modules, multiplier in self.chain:
            pair = modules.get(ck.shape[2])
            if pair is not None:
                pair[0].multiplier = pair[1].multiplier = multiplier
                ck, cv = pair[0](ck), pair[1](cv)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ck))
        v = attn.head_to_batch_dim(attn.to_v(cv))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k, None), v))
        return attn.to_out[1](attn.to_out[0](out))


def reference_image(ref: TorchReference, pipe: Pipeline, prompt: str, chain) -> np.ndarray:
    """The 8-bit image of the torch reference with the hypernetworks applied the webui's way."""
    ref.unet.set_attn_processor(HyperProcessor(chain))
    plan = pipe.plan(GenerationParams(prompt, sampler_name="Euler", steps=STEPS, seed=SEED, width=SIZE, height=SIZE))
    info = plan.sampler
    sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=info,
                                 arch=pipe.bundle.architecture)
    cond, uncond = ref.encode(parse_prompt(prompt)[0], 1, 1), ref.encode("", 1, 1)
    f = pipe.bundle.vae_scale_factor
    shape = (pipe.bundle.latent_channels, plan.height // f, plan.width // f)
    gen = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(shape, generator=gen)[None] * float(sigmas[0])
    with torch.no_grad():
        lat = info.fn(lambda x, s: ref.denoise(x, s, cond, uncond, 7.0), x0, sigmas,
                      noise=lambda s, sn: torch.randn(shape, generator=gen)[None], **info.options)
    return to_uint8(ref.decode(lat)[0])


def runtime_image(pipe, prompt: str):
    (out,) = pipe(prompt, sampler_name="Euler", steps=STEPS, seed=SEED, width=SIZE, height=SIZE)
    return np.asarray(out.image), out.infotext


@pytest.fixture(scope="module")
def hn_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hypernetworks")


@pytest.fixture(scope="module")
def pipe(tiny_bundle, hn_dir, tmp_path_factory):
    return Pipeline(tiny_bundle, hypernetwork_dir=hn_dir, lora_dir=tmp_path_factory.mktemp("Lora"))


@pytest.fixture(scope="module")
def ref(tiny_checkpoint, pipe):
    return TorchReference(tiny_checkpoint, pipe.bundle.path / "tokenizer")


@pytest.fixture(scope="module")
def plain(pipe):
    return runtime_image(pipe, PROMPT)[0]


# -- fidelity --

STRUCTURES = {
    "linear_121": dict(structure=(1, 2, 1)),
    "relu_ln_1_1.5_1": dict(structure=(1, 1.5, 1), activation="relu", layer_norm=True),
    "tanh_out_dropout": dict(structure=(1, 2, 2, 1), activation="tanh", activate_output=True, use_dropout=True,
                             dropout=(0, 0.3, 0.3, 0)),
    "old_linear1_linear2": dict(old=True),
}


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_structure_matches_the_webui(kind, pipe, hn_dir, ref, plain):
    modules = make_hypernet(hn_dir / f"{kind}.pt", seed=len(kind), **STRUCTURES[kind])
    prompt = f"{PROMPT} <hypernet:{kind}:0.8>"
    image, info = runtime_image(pipe, prompt)
    expected = reference_image(ref, pipe, prompt, [(modules, 0.8)])
    print(f"{kind}: PSNR {psnr(expected, image, 255.0):.1f} dB against the reference, "
          f"{psnr(plain, image, 255.0):.1f} against no hypernetwork")
    assert psnr(expected, image, 255.0) >= 60, kind
    assert psnr(plain, image, 255.0) < 40  # the hypernetwork changed the image
    assert f"<hypernet:{kind}:0.8>" in info.splitlines()[0] and "Hypernet" not in info.splitlines()[-1]


def test_two_hypernetworks_with_a_lora(pipe, hn_dir, ref, tiny_modules, tiny_configs, plain):
    """Two hypernetworks in prompt order (the second with a module for the 32-wide contexts only) and
    a LoRA in one prompt: the LoRA merged into the weights, the MLPs chained in front of them."""
    first = make_hypernet(hn_dir / "sub" / "first.pt", seed=11, activation="leakyrelu", layer_norm=True)
    second = make_hypernet(hn_dir / "second.pt", seed=12, structure=(1, 0.5, 1), activation="elu", widths=(32,))
    u, _, t = tiny_modules
    lora = make_lora(u, t, torch.Generator().manual_seed(13))
    write_network(pipe.networks.library.folders[0] / "style.safetensors", lora)
    prompt = f"{PROMPT} <hypernet:first:0.6> <lora:style:0.7> <hypernet:second:1.3>"
    image, info = runtime_image(pipe, prompt)
    unet, text_encoder = copy.deepcopy(ref.unet), copy.deepcopy(ref.text_encoder)
    webui_merge(lora, layer_table(unet, text_encoder, tiny_configs), 0.7, 0.7)
    merged = copy.copy(ref)
    merged.unet, merged.text_encoder = unet, text_encoder
    expected = reference_image(merged, pipe, prompt, [(first, 0.6), (second, 1.3)])
    print(f"two hypernetworks and a LoRA: PSNR {psnr(expected, image, 255.0):.1f} dB")
    assert psnr(expected, image, 255.0) >= 60
    without_lora, _ = runtime_image(pipe, f"{PROMPT} <hypernet:first:0.6> <hypernet:second:1.3>")
    assert psnr(without_lora, image, 255.0) < 40 and psnr(plain, without_lora, 255.0) < 40
    assert 'Lora hashes: "style: ' in info and "<hypernet:first:0.6>" in info


def test_switching_sets_and_graphs(pipe, hn_dir, plain, tiny_bundle):
    """The same set twice makes nothing again; another set and back gives the same image bit for
    bit; no tags returns to the graph's own; the fused CPU graph and the portable one agree."""
    from sdrt.runtime.backends import open_component

    make_hypernet(hn_dir / "switch_a.pt", seed=21, activation="silu", activate_output=True)
    make_hypernet(hn_dir / "switch_b.pt", seed=22, activation="gelu", layer_norm=True)
    a, _ = runtime_image(pipe, f"{PROMPT} <hypernet:switch_a>")
    session = pipe.unet._session
    assert runtime_image(pipe, f"{PROMPT} <hypernet:switch_a:1>")[0].tobytes() == a.tobytes()
    assert pipe.unet._session is session  # the same set: the session stays
    b, _ = runtime_image(pipe, f"{PROMPT} <hypernet:switch_b:1>")
    assert np.array_equal(runtime_image(pipe, f"{PROMPT} <hypernet:switch_a:1>")[0], a)
    assert np.array_equal(runtime_image(pipe, PROMPT)[0], plain)
    assert pipe.unet._overrides is None and not np.array_equal(a, b)
    assert np.array_equal(runtime_image(pipe, f"{PROMPT} <hypernet:switch_a:0>")[0], plain)
    assert pipe.unet.path.name == "model.cpu.onnx"
    portable = Pipeline(tiny_bundle, hypernetwork_dir=hn_dir)
    portable.denoiser.unet = open_component(portable.bundle, "unet", graph=tiny_bundle / "unet" / "model.onnx")
    assert psnr(a, runtime_image(portable, f"{PROMPT} <hypernet:switch_a>")[0], 255.0) >= 60


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_nodes_match_torch(activation, tmp_path):
    """Each activation the webui's files may name, as ONNX nodes in front of a MatMul (the edit on
    the wire format), against the webui's module in torch."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from sdrt.runtime.networks import onnx_edit
    from sdrt.runtime.networks.hypernet import _Builder, module_nodes

    torch_modules = make_hypernet(tmp_path / "a.pt", seed=5, activation=activation, layer_norm=True,
                                  activate_output=True, widths=(8,), scale=1.0)
    hn = read_hypernetwork(tmp_path / "a.pt")
    w = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes,
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    b = _Builder("hn")
    out = module_nodes(b, hn.modules[8][1], "h", 0.7)
    edited = onnx_edit.GraphEdit({1: b.nodes}, {1: {0: out}}, b.initializers).apply(model.SerializeToString())
    onnx.checker.check_model(onnx.load_from_string(edited))
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32) * 2
    got = ort.InferenceSession(edited, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    v = torch_modules[8][1]
    v.multiplier = 0.7
    with torch.no_grad():
        expected = (v(torch.from_numpy(x)) @ torch.from_numpy(w)).numpy()
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max()), activation


def test_missing_settings_take_the_webui_defaults(tmp_path):
    """``Hypernetwork.load``'s defaults: ``activate_output`` true when the file does not say (the
    activation after the last Linear too), dropout from ``use_dropout`` / ``last_layer_dropout``
    (its index counted in the keys)."""
    torch_modules = make_hypernet(tmp_path / "a.pt", seed=3, structure=(1, 2, 2, 1), activation="relu",
                                  activate_output=True, dropout=(0, 0.3, 0.3, 0), widths=(8,))
    d = torch.load(tmp_path / "a.pt", weights_only=False)
    for key in ("activate_output", "dropout_structure"):
        del d[key]
    torch.save({**d, "use_dropout": True, "last_layer_dropout": True}, tmp_path / "b.pt")
    (k, _) = read_hypernetwork(tmp_path / "b.pt").modules[8]
    assert [layer.kind for layer in k.layers] == ["linear", "act", "linear", "act", "linear", "act"]
    weights = [layer.weight for layer in k.layers if layer.kind == "linear"]
    assert all(np.array_equal(w, m.weight.detach().numpy()) for w, m in
               zip(weights, [m for m in torch_modules[8][0].linear if isinstance(m, torch.nn.Linear)]))


# -- names --

def test_names_follow_list_hypernetworks(tmp_path):
    from sdrt.runtime.networks.hypernet import HypernetLibrary

    for rel in ("A/dup.pt", "b/dup.pt", "deep/er/x.pt", "None.pt", "y.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    names = HypernetLibrary(tmp_path).scan()
    # the webui: sorted by path ignoring case, a later stem wins; "None" skipped; .pt only
    assert sorted(names) == ["dup", "x"] and names["dup"] == tmp_path / "b" / "dup.pt"
    with pytest.raises(SdrtError, match=r"no hypernetwork named 'y' in .*--hypernetwork-dir"):
        HypernetLibrary(tmp_path).get("y")


# -- bad input --

def test_bad_files_are_one_line_and_leave_the_sessions(pipe, hn_dir, plain, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("untouched")

    class Evil:
        def __reduce__(self):
            return os.system, (f"echo ran > {canary}",)

    torch.save({32: (Evil(), {}), "layer_structure": [1, 2, 1]}, hn_dir / "evil.pt")
    good = hn_dir / "good.pt"
    make_hypernet(good, seed=31)
    good_image, _ = runtime_image(pipe, f"{PROMPT} <hypernet:good:1>")
    (hn_dir / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    d = torch.load(good, weights_only=False)
    d[64] = (d[64][0], {**d[64][1], "linear.1.weight": torch.zeros(5, 4)})
    torch.save(d, hn_dir / "misshaped.pt")
    torch.save({**torch.load(good, weights_only=False), "activation_func": "prelu"}, hn_dir / "prelu.pt")
    d = torch.load(good, weights_only=False)
    d[32] = ({k: v for k, v in d[32][0].items() if k != "linear.1.bias"}, d[32][1])
    torch.save(d, hn_dir / "missing.pt")
    torch.save({**torch.load(good, weights_only=False), "is_layer_norm": True}, hn_dir / "layer_norm.pt")
    cases = {
        "evil": r"evil\.pt: refusing to load (posix|os)\.system",
        "truncated": r"truncated\.pt: truncated or corrupt",
        "misshaped": r"misshaped\.pt: 64/v: linear\.1\.weight has shape \[5, 4\], expected \[64, 128\]",
        "prelu": r"prelu\.pt: activation_func 'prelu' is not supported",
        "missing": r"missing\.pt: 32/k: linear\.1\.bias is missing",
        # settings that do not describe the weights (the webui's strict load_state_dict refuses them)
        "layer_norm": r"layer_norm\.pt: 32/k: linear\.1\.weight has shape \[32, 64\], expected \[64\]",
        "nowhere": r"no hypernetwork named 'nowhere' in .*hypernetworks",
    }
    session = pipe.unet._session
    for name, message in cases.items():
        with pytest.raises(SdrtError, match=message) as e:
            runtime_image(pipe, f"{PROMPT} <hypernet:good:1> <hypernet:{name}:0.5>")
        assert "\n" not in str(e.value)
        # nothing half-applied: the session with the set it had stays
        assert pipe.unet._session is session
        assert np.array_equal(runtime_image(pipe, f"{PROMPT} <hypernet:good:1>")[0], good_image)
    assert canary.read_text() == "untouched"
    with pytest.raises(SdrtError, match=r"cannot read the multiplier 'te=0.5' of <hypernet:good:te=0.5>"):
        runtime_image(pipe, f"{PROMPT} <hypernet:good:te=0.5>")


def test_cli_without_torch(tiny_bundle, tmp_path, no_torch_dir):
    from conftest import run_sdrt
    from PIL import Image

    folder = tmp_path / "hn"
    make_hypernet(folder / "style.pt", seed=41, activation="relu")
    r = run_sdrt("generate", f"{PROMPT} <hypernet:style:0.5>", "-m", tiny_bundle, "--steps", 2, "--hypernetwork-dir",
                 folder, "--output", tmp_path / "out", pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    (png,) = (tmp_path / "out").glob("*.png")
    assert Image.open(png).text["parameters"].startswith(f"{PROMPT} <hypernet:style:0.5>\n")
    canary = tmp_path / "canary"
    canary.write_text("untouched")

    class Evil:
        def __reduce__(self):
            return os.system, (f"echo ran > {canary}",)

    torch.save({32: (Evil(), {})}, folder / "evil.pt")
    for tag, message in (("evil", "evil.pt: refusing to load"), ("gone", "no hypernetwork named 'gone'")):
        r = run_sdrt("generate", f"{PROMPT} <hypernet:{tag}>", "-m", tiny_bundle, "--steps", 2, "--hypernetwork-dir",
                     folder, "--output", tmp_path / tag, pythonpath_first=no_torch_dir)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and message in lines[0]
        assert not (tmp_path / tag).exists()
    assert canary.read_text() == "untouched"
