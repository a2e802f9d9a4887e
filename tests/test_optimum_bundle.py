"""Bundles written by ``optimum-cli export onnx --task text-to-image`` load and generate in sdrt.

``tests/data/optimum_tiny/`` holds a tiny SD 1.x model (random weights at toy widths, the real CLIP
vocabulary) as a diffusers folder (``diffusers/``) and as the real optimum export of that folder
(``onnx/``, untouched); ``tools/make_optimum_fixture.py`` regenerates both and
``PROVENANCE.json`` records the versions. optimum is not needed here: the optimum bundle is checked
against an sdrt export of the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_sdrt

FIXTURE = Path(__file__).parent / "data" / "optimum_tiny"
OPTIMUM = FIXTURE / "onnx"
PROMPT, NEGATIVE = "a photo of a cat, best quality", "blurry"


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def optimum_pipeline():
    from sdrt.runtime.pipeline.txt2img import Pipeline

    return Pipeline(OPTIMUM)


@pytest.fixture(scope="module")
def sdrt_pipeline(tmp_path_factory):
    """sdrt's own export of the diffusers folder the optimum bundle was made from."""
    from sdrt.export.write import export_checkpoint
    from sdrt.runtime.pipeline.txt2img import Pipeline

    return Pipeline(export_checkpoint(FIXTURE / "diffusers", tmp_path_factory.mktemp("optimum") / "sdrt"))


def params(**kw):
    from sdrt.runtime.pipeline.txt2img import GenerationParams

    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, sampler_name="Euler a", cfg_scale=7.0, seed=123,
                width=64, height=64)
    return GenerationParams(**{**base, **kw})


def generate_with_latents(pipe, p):
    """(image, final denoised latents) of one generation."""
    last = {}
    image = pipe.generate(p, callback=lambda e: last.update(e))[0].image
    return image, last["denoised"]


def test_fixture_is_an_optimum_export():
    """The graphs have optimum's I/O, not sdrt's: what the runtime has to adapt to."""
    import onnxruntime as ort

    from sdrt.runtime.bundle import open_bundle

    def io(component):
        s = ort.InferenceSession(str(OPTIMUM / component / "model.onnx"), providers=["CPUExecutionProvider"])
        return {i.name: (i.type, list(i.shape)) for i in s.get_inputs()}, [o.name for o in s.get_outputs()]

    assert not (OPTIMUM / "sdrt.json").exists()
    ins, outs = io("text_encoder")
    assert ins["input_ids"][0] == "tensor(int64)" and "last_hidden_state" in outs
    ins, outs = io("unet")
    assert set(ins) == {"sample", "timestep", "encoder_hidden_states"} and outs == ["out_sample"]
    assert ins["timestep"] == ("tensor(float)", [])  # a scalar: optimum-onnx 0.1 / optimum 2.x
    ins, outs = io("vae_decoder")
    assert list(ins) == ["latent_sample"] and outs == ["sample"]

    b = open_bundle(OPTIMUM)
    assert not b.native and b.manifest["format"] == "optimum"
    assert b.prediction_type == "epsilon" and b.default_size == (64, 64) and b.vae_scale_factor == 8
    assert b.text_encoder["hidden_size"] == 8 and b.text_encoder["num_layers"] == 1


def test_generates(optimum_pipeline):
    out = optimum_pipeline.generate(params())
    assert len(out) == 1 and out[0].image.size == (64, 64) and out[0].seed == 123
    pixels = np.asarray(out[0].image, np.float64)
    assert pixels.std() > 10.0  # an image, not a flat field
    assert "Sampler: Euler a" in out[0].infotext and "Size: 64x64" in out[0].infotext
    # Deterministic for a seed; another seed gives another image
    assert np.array_equal(np.asarray(optimum_pipeline.generate(params())[0].image), pixels.astype(np.uint8))
    assert not np.array_equal(np.asarray(optimum_pipeline.generate(params(seed=124))[0].image), pixels)


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M"])
def test_matches_sdrt_export_of_the_same_weights(optimum_pipeline, sdrt_pipeline, sampler):
    """optimum's float-timestep UNet takes the fractional timestep as sdrt's does: same images."""
    p = params(sampler_name=sampler)
    img_o, lat_o = generate_with_latents(optimum_pipeline, p)
    img_s, lat_s = generate_with_latents(sdrt_pipeline, p)
    assert psnr(img_o, img_s, 255.0) >= 50.0
    x_o, x_s = optimum_pipeline.decode_float(lat_o), sdrt_pipeline.decode_float(lat_s)
    assert psnr(x_o, x_s, 1.0) >= 50.0


def test_clip_skip_is_refused_with_one_line(optimum_pipeline):
    from sdrt.runtime.errors import SdrtError

    with pytest.raises(SdrtError) as e:
        optimum_pipeline.generate(params(clip_skip=2))
    message = str(e.value)
    assert "\n" not in message and "CLIP skip" in message and "sdrt export" in message


@pytest.mark.parametrize("steps_dim", ["steps", 1])
def test_integer_timestep_graph_gets_the_rounded_step(tmp_path, steps_dim):
    """Older optimum exports take ``timestep`` as int64 [steps]: the denoiser feeds rint(t) in that
    shape. Checked on the fixture's UNet behind an int64 -> float cast."""
    import onnx
    from onnx import TensorProto, helper

    from sdrt.runtime.backends.onnxruntime import Session
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.sampling import schedules
    from sdrt.runtime.sampling.denoiser import Denoiser

    model = onnx.load(str(OPTIMUM / "unet" / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["timestep_scalar" if n == "timestep" else n for n in node.input]
    old = next(i for i in graph.input if i.name == "timestep")
    graph.input.remove(old)
    graph.input.insert(1, helper.make_tensor_value_info("timestep", TensorProto.INT64, [steps_dim]))
    graph.initializer.append(helper.make_tensor("timestep_index", TensorProto.INT64, [], [0]))
    graph.node.insert(0, helper.make_node("Cast", ["timestep"], ["timestep_float"], to=TensorProto.FLOAT))
    graph.node.insert(1, helper.make_node("Gather", ["timestep_float", "timestep_index"], ["timestep_scalar"], axis=0))
    path = tmp_path / "unet_int64.onnx"
    onnx.save(model, str(path))

    alphas = schedules.alphas_cumprod(**open_bundle(OPTIMUM).scheduler)
    d_int = Denoiser(Session(path), alphas)
    d_float = Denoiser(Session(OPTIMUM / "unet" / "model.onnx"), alphas)
    assert d_int.integer_timestep and not d_float.integer_timestep
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, 8)).astype(np.float32)
    for sigma in (14.6, 3.3, 0.7):
        t = d_float.sigma_to_t(sigma)
        assert t != round(t)
        assert d_int.sigma_to_t(sigma) == round(t)
        assert d_int.timestep(round(t), 2).shape == ((1,) if steps_dim == 1 else (2,))
        c_in = np.float32(1.0 / (sigma**2 + 1.0) ** 0.5)
        eps = d_float.unet.run({"sample": x * c_in, "timestep": np.float32(round(t)),
                                "encoder_hidden_states": context}, ["out_sample"])["out_sample"]
        np.testing.assert_allclose(d_int(x, sigma, context), x + eps * np.float32(-sigma), rtol=1e-5, atol=1e-5)


def test_cli_generates_from_the_optimum_bundle_without_torch(tmp_path, no_torch_dir, optimum_pipeline):
    from PIL import Image

    out = tmp_path / "out"
    r = run_sdrt("generate", PROMPT, "-n", NEGATIVE, "--model", OPTIMUM, "--steps", 8, "--seed", 123,
                 "-W", 64, "-H", 64, "-o", out, pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 1
    cli_image = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert np.array_equal(cli_image, np.asarray(optimum_pipeline.generate(params())[0].image))

    r = run_sdrt("generate", PROMPT, "--model", OPTIMUM, "--steps", 2, "--clip-skip", 2, "-o", out,
                 pythonpath_first=no_torch_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "CLIP skip" in r.stderr.strip().splitlines()[-1]
