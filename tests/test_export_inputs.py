"""Every export input gives the same bundle outputs: .safetensors, .ckpt and diffusers folders."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from sdrt.export.graphs import EXTERNAL_DATA, consolidate
from sdrt.export.write import export_checkpoint, save_checkpoint
from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

REQUEST = GenerationParams("a green triangle", negative_prompt="red", steps=6, sampler_name="Euler a", seed=5)


def _image(bundle):
    return np.asarray(Pipeline(bundle).generate(REQUEST)[0].image)


def test_ckpt_export_matches_safetensors(tiny_checkpoint, tiny_bundle, tiny_configs, tmp_path):
    from safetensors.torch import load_file

    ckpt = save_checkpoint(load_file(str(tiny_checkpoint)), tiny_configs, tmp_path / "tiny.ckpt")
    bundle = export_checkpoint(ckpt, tmp_path / "from-ckpt")
    manifest = json.loads((bundle / "sdrt.json").read_text())
    assert manifest["source"]["kind"] == "ckpt" and len(manifest["source"]["sha256"]) == 64
    assert np.array_equal(_image(bundle), _image(tiny_bundle))


def test_diffusers_folder_export_matches(tiny_modules, tiny_configs, tiny_bundle, tmp_path):
    from sdrt.runtime.text.tokenizer import ClipTokenizer

    unet, vae, text_encoder = tiny_modules
    folder = tmp_path / "tiny-diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    ClipTokenizer.default().write_files(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny_configs["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    bundle = export_checkpoint(folder, tmp_path / "from-diffusers")
    assert json.loads((bundle / "sdrt.json").read_text())["source"]["kind"] == "diffusers"
    assert np.array_equal(_image(bundle), _image(tiny_bundle))


def test_external_data_when_over_the_limit(tiny_bundle, tmp_path):
    """Graphs over the protobuf limit keep their weights in one model.onnx_data file."""
    work = tmp_path / "vae_decoder"
    work.mkdir()
    # the graph with its weights inline (the bundle's copy shares model.onnx_data with model.cpu.onnx)
    onnx.save_model(onnx.load(str(tiny_bundle / "vae_decoder" / "model.onnx")), str(work / "model.onnx"))
    reference = Session(tiny_bundle / "vae_decoder" / "model.onnx")
    size = os.path.getsize(work / "model.onnx")
    consolidate(work / "model.onnx", limit=size // 4)
    assert sorted(p.name for p in work.iterdir() if p.suffix != ".json") == ["model.onnx", EXTERNAL_DATA]
    assert os.path.getsize(work / "model.onnx") < size // 2  # the graph stays, the weights moved
    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    a = reference.run({"latent_sample": z})["sample"]
    b = Session(work / "model.onnx").run({"latent_sample": z})["sample"]
    assert np.array_equal(a, b)
