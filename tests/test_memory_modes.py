"""Memory modes (graphs loaded only for their stage) and tiled VAE decoding, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import tiling
from sdrt.runtime.pipeline.tiling import TileSpec
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

from conftest import run_sdrt


class Recorder:
    """A session stand-in that records, at each run, the fed shapes and which graphs the pipeline holds."""

    def __init__(self, session: Session, pipe: Pipeline):
        self.session, self.pipe, self.runs = session, pipe, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, feeds, outputs=None):
        out = self.session.run(feeds, outputs)
        self.runs.append(({k: v.shape for k, v in feeds.items()}, self.pipe.loaded()))
        return out


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    return float(10 * np.log10(peak**2 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_memory_modes_give_identical_images_and_hold_one_stage_at_a_time(tiny_bundle):
    p = GenerationParams("a red circle", steps=3, sampler_name="Euler a", seed=11, batch_size=2, n_iter=2)
    images, held = {}, {}
    for mode in ("normal", "med", "low"):
        pipe = Pipeline(tiny_bundle, memory=mode)
        at_start = pipe.loaded()
        pipe.vae_decoder = Recorder(pipe.vae_decoder, pipe)
        during_sampling = set()
        images[mode] = [np.asarray(r.image) for r in pipe.generate(p, callback=lambda e: during_sampling.add(
            tuple(pipe.loaded())))]
        during_decode = {tuple(loaded) for _, loaded in pipe.vae_decoder.runs}
        held[mode] = (at_start, during_sampling, during_decode, pipe.loaded())
    for mode in ("med", "low"):
        assert all(np.array_equal(a, b) for a, b in zip(images["normal"], images[mode])), mode
    everything = ("text_encoder", "unet", "vae_decoder")
    assert held["normal"] == (list(everything), {everything}, {everything}, list(everything))
    assert held["med"] == (["unet"], {("unet",)}, {("unet", "vae_decoder")}, ["unet"])
    assert held["low"] == ([], {("unet",)}, {("vae_decoder",)}, [])


def test_unknown_memory_mode(tiny_bundle):
    with pytest.raises(SdrtError, match="unknown memory mode 'tiny'; valid modes: normal, med, low"):
        Pipeline(tiny_bundle, memory="tiny")


def test_released_session_reloads_on_the_next_run(tiny_bundle):
    s = Session(tiny_bundle / "vae_decoder" / "model.onnx", lazy=True)
    assert not s.loaded
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = s.run({"latent_sample": z})["sample"]
    assert s.loaded and s.inputs["latent_sample"].shape == ["batch", 4, "height", "width"]
    s.release()
    assert not s.loaded and s.outputs == ["sample"]
    np.testing.assert_array_equal(s.run({"latent_sample": z})["sample"], first)


# --- tiling ------------------------------------------------------------------------------------------

def test_tile_layout():
    assert tiling.tile_starts(8, 32, 8) == [0]
    assert tiling.tile_starts(48, 32, 8) == [0, 16]
    assert tiling.tile_starts(64, 32, 8) == [0, 16, 32]
    assert tiling.tile_starts(100, 32, 8) == [0, 23, 45, 68]
    for length in range(33, 200, 7):
        starts = tiling.tile_starts(length, 32, 8)
        assert starts[0] == 0 and starts[-1] + 32 == length
        assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))  # neighbours share >= 8
    # Complementary ramps: two tiles' weights sum to one across their overlap
    a, b = tiling.feather(16, 0, 6), tiling.feather(16, 6, 0)
    np.testing.assert_allclose(a[10:] + b[:6], 1.0)
    with pytest.raises(SdrtError, match="overlap between 1 and 16"):
        TileSpec(32, 20)
    with pytest.raises(SdrtError, match="multiple of 8 pixels"):
        TileSpec.from_pixels(100)
    assert TileSpec.from_pixels(256) == TileSpec(32, 8)


def test_tiled_decode_of_a_local_decoder_is_exact():
    """A decoder without a receptive field beyond its pixel (nearest upsampling) tiles exactly."""
    z = np.random.default_rng(0).standard_normal((4, 40, 56)).astype(np.float32)
    shapes = []

    def decode(t):
        shapes.append(t.shape)
        return np.repeat(np.repeat(t[:3], 8, axis=1), 8, axis=2)

    out = tiling.decode_tiled(decode, z, TileSpec(16, 4), 8)
    np.testing.assert_allclose(out, decode(z), rtol=1e-6, atol=1e-6)
    assert {s for s in shapes[:-1]} == {(4, 16, 16)}  # every tile has the tile size


def test_tiled_vae_decode_is_close_to_the_whole_decode(tiny_bundle, tiny_pipeline):
    """A 384x384 image (48x48 latents) decoded whole and in 256-pixel tiles (32 latents, overlap >= 8)."""
    p = GenerationParams("a red circle", steps=2, sampler_name="Euler", seed=7, width=384, height=384)
    cond, uncond = tiny_pipeline.conditioning(p)
    latents = tiny_pipeline.sample(p, [7], cond, uncond)
    whole = tiny_pipeline.decode_float(latents)

    pipe = Pipeline(tiny_bundle, vae_tiling=TileSpec(32, 8))
    pipe.vae_decoder = Recorder(pipe.vae_decoder, pipe)
    tiled = pipe.decode_float(latents)
    sizes = {shapes["latent_sample"] for shapes, _ in pipe.vae_decoder.runs}
    assert sizes == {(1, 4, 32, 32)} and len(pipe.vae_decoder.runs) == 4  # 2x2 tiles, none larger
    value = psnr(whole, tiled)
    print(f"tiled vs whole VAE decode, pipeline latents 48x48, tiles 32/8: PSNR {value:.1f} dB")
    assert value >= 35.0, value

    # Unit-variance random latents straight into the decoder: a harder case for the group norms
    z = np.random.default_rng(0).standard_normal((4, 48, 48)).astype(np.float32)
    session = Session(tiny_bundle / "vae_decoder" / "model.onnx")

    def decode(t):
        return session.run({"latent_sample": t[None]}, ["sample"])["sample"][0]

    value = psnr(np.clip((decode(z) + 1) / 2, 0, 1), np.clip((tiling.decode_tiled(decode, z, TileSpec(32, 8), 8)
                                                               + 1) / 2, 0, 1))
    print(f"tiled vs whole VAE decode, random latents 48x48, tiles 32/8: PSNR {value:.1f} dB")
    assert value >= 30.0, value


def test_cli_lowvram_matches_normal(tiny_bundle, tiny_pipeline, tmp_path):
    r = run_sdrt("generate", "a red circle", "-m", tiny_bundle, "--steps", 3, "--seed", 5, "--lowvram",
                 "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    (want,) = tiny_pipeline.generate(GenerationParams("a red circle", steps=3, seed=5))
    assert np.array_equal(np.asarray(Image.open(r.stdout.strip()).convert("RGB")), np.asarray(want.image))
    r = run_sdrt("generate", "x", "-m", tiny_bundle, "--memory", "low", "--medvram", "-o", tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == ("error: conflicting memory modes: low, med (give one of "
                                                      "--memory, --medvram, --lowvram)")
