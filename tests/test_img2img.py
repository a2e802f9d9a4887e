"""img2img against the webui's rules and a PyTorch reference (tiny model).

The reference: diffusers' VAE encoder (the posterior's mean, as sdrt), k-diffusion 0.1.1's
samplers over the webui's partial schedule ``sigmas[steps - t_enc - 1:]`` from ``init + noise *
sigma``, diffusers' DDIM scheduler over the webui's timesteps below ``timesteps[t_enc]``, and the
seed's torch generator for the noise. Shared with the runtime: the sigma schedule values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_sdrt
from PIL import Image, PngImagePlugin
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline.img2img import (
    Img2imgPipeline,
    flatten,
    img2img_steps,
    resize_image,
    resize_latents,
)
from sdrt.runtime.pipeline.params import GenerationParams, Img2imgParams
from sdrt.runtime.pipeline.txt2img import to_uint8
from test_sampler_e2e import Generators
from test_samplers import SD_SCHEDULER, TorchShim

torch = pytest.importorskip("torch")

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
SEED, CFG, STEPS = 21, 5.0, 20
LANCZOS = Image.Resampling.LANCZOS


def init_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth synthetic picture (gradients and a disc) at any size."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    disc = ((x - 0.4) ** 2 + (y - 0.55) ** 2 < 0.08).astype(float)
    rgb = np.stack([0.8 * disc + 0.2 * x, 0.3 + 0.5 * y * (1 - disc), 0.9 - 0.6 * x * y]) + 0.02 * seed
    return Image.fromarray((255 * np.clip(rgb, 0, 1)).transpose(1, 2, 0).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Img2imgPipeline(tiny_bundle)


# ---- the webui's step arithmetic -------------------------------------------------------------

@pytest.mark.parametrize("steps, strength, fix, expected", [
    # (schedule length, t_enc), computed by hand from setup_img2img_steps
    (20, 0.75, False, (20, 15)),
    (20, 0.5, False, (20, 10)),
    (20, 0.3, False, (20, 6)),     # 0.3 * 20 = 6.000000000000001
    (30, 0.35, False, (30, 10)),   # 10.5 truncated
    (20, 0.0, False, (20, 0)),     # one step from the last sigma still runs
    (20, 1.0, False, (20, 19)),    # strength capped at 0.999: 19.98 -> 19, all 20 steps
    (20, 0.75, True, (26, 19)),    # fix steps: 20 / 0.75 = 26.67
    (20, 0.5, True, (40, 19)),
    (10, 0.33, True, (30, 9)),     # 30.3
    (20, 1.0, True, (20, 19)),     # 20 / 0.999 = 20.02
    (20, 0.0, True, (0, 19)),      # no schedule: the init latents as they are
])
def test_steps_follow_webui(steps, strength, fix, expected):
    assert img2img_steps(steps, strength, fix) == expected


def test_plan_steps_and_schedule(pipe):
    img = init_image(64, 64)
    plan = pipe.plan(Img2imgParams(PROMPT, steps=20, init_images=[img], denoising_strength=0.75, sampler_name="Euler"))
    assert (plan.schedule_steps, plan.t_enc, plan.steps) == (20, 15, 16)
    plan = pipe.plan(Img2imgParams.from_webui({"prompt": PROMPT, "steps": 20, "init_images": [img],
                                               "denoising_strength": 0.5, "sampler_name": "Euler",
                                               "override_settings": {"img2img_fix_steps": True}}))
    assert (plan.schedule_steps, plan.t_enc, plan.steps) == (40, 19, 20)
    plan = pipe.plan(Img2imgParams(PROMPT, steps=20, init_images=[img], denoising_strength=0.5, sampler_name="DDIM"))
    assert (plan.t_enc, plan.steps) == (10, 9)  # DDIM: one step fewer than its timesteps (webui quirk kept)


# ---- resize modes --------------------------------------------------------------------------------

def bands(width: int, height: int, horizontal: bool) -> Image.Image:
    """Three flat colour bands (red, green, blue) left to right, or top to bottom."""
    a = np.zeros((height, width, 3), np.uint8)
    n = width if horizontal else height
    for i, c in enumerate(([255, 0, 0], [0, 255, 0], [0, 0, 255])):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if horizontal:
            a[:, sl] = c
        else:
            a[sl] = c
    return Image.fromarray(a)


def test_resize_just_resize_stretches():
    out = resize_image(0, bands(200, 100, True), 64, 64)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(bands(200, 100, True).resize((64, 64), LANCZOS)))


@pytest.mark.parametrize("size, horizontal", [((200, 100), True), ((100, 200), False)])
def test_resize_crop_keeps_the_centre(size, horizontal):
    im = bands(*size, horizontal)
    out = np.asarray(resize_image(1, im, 64, 64))
    # covered at 128 x 64 (or 64 x 128), the centre 64 kept: a third of the first and last bands is cut
    cover = np.asarray(im.resize((128, 64) if horizontal else (64, 128), LANCZOS))
    kept = cover[:, 32:96] if horizontal else cover[32:96]
    assert out.shape == (64, 64, 3) and np.array_equal(out, kept)
    line = out[32] if horizontal else out[:, 32]
    assert line[0].argmax() == 0 and line[32].argmax() == 1 and line[63].argmax() == 2
    # the outer bands lost half their width: red covers ~ (66.7 - 50) / 100 * 64 = 10.7 pixels
    assert 9 <= int((line[:, 0] > 128).sum()) <= 12


@pytest.mark.parametrize("size, horizontal", [((200, 100), False), ((100, 200), True)])
def test_resize_fill_pads_with_stretched_edges(size, horizontal):
    im = bands(*size, horizontal)
    out = np.asarray(resize_image(2, im, 64, 64)).astype(int)
    # fitted at 64 x 32 (or 32 x 64), centred at offset 16, the bands filled from the edge rows/columns
    fit = np.asarray(im.resize((64, 32) if not horizontal else (32, 64), LANCZOS)).astype(int)
    if not horizontal:
        assert np.array_equal(out[16:48], fit)
        assert np.abs(out[:16] - fit[0]).max() <= 1 and np.abs(out[48:] - fit[-1]).max() <= 1
    else:
        assert np.array_equal(out[:, 16:48], fit)
        assert np.abs(out[:, :16] - fit[:, :1]).max() <= 1 and np.abs(out[:, 48:] - fit[:, -1:]).max() <= 1
    # red fills the first band, blue the last
    first, last = (out[0, 32], out[63, 32]) if not horizontal else (out[32, 0], out[32, 63])
    assert first.argmax() == 0 and last.argmax() == 2


@pytest.mark.parametrize("src, dst", [((7, 13), (8, 8)), ((8, 8), (16, 24)), ((16, 12), (5, 9))])
def test_latent_upscale_matches_torch_bilinear(src, dst):
    z = np.random.default_rng(0).standard_normal((2, 4, *src)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(z), size=dst, mode="bilinear").numpy()
    np.testing.assert_allclose(resize_latents(z, *dst), expected, atol=2e-6)


def test_latent_upscale_mode_encodes_at_the_image_size(pipe):
    img = init_image(48, 80)
    plan = pipe.plan(Img2imgParams(PROMPT, steps=4, init_images=[img], resize_mode=3, sampler_name="Euler"))
    assert plan.init_images[0].size == (48, 80)  # not resized before encoding
    z = pipe.init_latents(plan)
    assert z.shape == (1, *plan.latent_shape)
    encoded = pipe.encode([img])
    assert encoded.shape[2:] != z.shape[2:]
    np.testing.assert_array_equal(z, resize_latents(encoded, *plan.latent_shape[1:]))


# ---- against the PyTorch reference ---------------------------------------------------------------

def reference_init_latent(ref, image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    return ref.vae.encode(x).latent_dist.mean * ref.scale


@pytest.mark.parametrize("strength", [0.5, 0.75])
@pytest.mark.parametrize("name", ["Euler", "Euler a", "DDIM"])
def test_matches_torch_reference(pipe, ref, kd, monkeypatch, name, strength):
    img = init_image(64, 64)
    p = Img2imgParams(PROMPT, NEGATIVE, steps=STEPS, sampler_name=name, seed=SEED, cfg_scale=CFG,
                      init_images=[img], denoising_strength=strength)
    plan = pipe.plan(p)
    cond, uncond = pipe.conditioning(plan)
    image_rt = to_uint8(pipe.decode_float(pipe.sample(plan, plan.batches[0], cond, uncond))[0])

    t_enc = int(strength * STEPS)  # the webui's, by hand
    init = reference_init_latent(ref, plan.init_images[0])
    gens = Generators(plan.latent_shape, SEED)
    r_cond, r_uncond = ref.encode(PROMPT, 1, 1), ref.encode(NEGATIVE, 1, 1)
    if name == "DDIM":
        from diffusers import DDIMScheduler

        sch = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
        sch.set_timesteps(STEPS)
        start = 1 + (1000 // STEPS) * t_enc  # the webui's timesteps[t_enc]
        a = sch.alphas_cumprod[start]
        x = init * a.sqrt() + gens.first * (1 - a).sqrt()
        for t in sch.timesteps[STEPS - t_enc:-1]:  # timesteps[t_enc - 1] down to timesteps[1]
            out = ref.unet(torch.cat([x, x]), t.reshape(1).expand(2), torch.cat([r_cond, r_uncond])).sample
            x = sch.step(out[1:] + (out[:1] - out[1:]) * CFG, t, x, eta=0.0).prev_sample
    else:
        sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=plan.sampler)
        sched = torch.from_numpy(sigmas[STEPS - t_enc - 1:].astype(np.float32))
        x = init + gens.first * sched[0]

        def model(x, sigma, **kwargs):
            return ref.denoise(x, float(sigma.reshape(-1)[0]), r_cond, r_uncond, CFG)

        monkeypatch.setattr(kd, "torch", TorchShim(type("S", (), {"torch_next": gens.next})()))
        fn = kd.sample_euler if name == "Euler" else kd.sample_euler_ancestral
        x = fn(model, x, sched, disable=True)
    image_ref = to_uint8(ref.decode(x.float())[0])
    score = psnr(image_ref, image_rt, peak=255.0)
    assert score >= 60, f"{name} at {strength}: PSNR {score:.1f} dB"


def test_fixed_steps_at_strength_zero_keeps_the_init_latents(pipe):
    img = init_image(64, 64)
    for name in ("Euler", "DDIM"):
        plan = pipe.plan(Img2imgParams(PROMPT, steps=8, init_images=[img], denoising_strength=0.0, sampler_name=name,
                                       img2img_fix_steps=True))
        cond, uncond = pipe.conditioning(plan)
        assert np.array_equal(pipe.sample(plan, plan.batches[0], cond, uncond), pipe.encode(plan.init_images))


# ---- batches, infotext, the API's fields -----------------------------------------------------------

def test_batches_of_init_images(pipe):
    a, b = init_image(64, 64, 0), init_image(64, 64, 5)
    # several images set the batch size to their count; the seeds run on over the batches as the webui's
    plan = pipe.plan(Img2imgParams(PROMPT, steps=2, seed=100, batch_size=4, n_iter=2, init_images=[a, b]))
    assert [b_.seeds for b_ in plan.batches] == [(100, 101), (102, 103)]
    out = pipe.generate(Img2imgParams(PROMPT, steps=2, seed=100, batch_size=2, init_images=[a, b],
                                      denoising_strength=0.2, sampler_name="Euler"))
    assert [r.seed for r in out] == [100, 101]
    # each image starts from its own init image: generated alone, each gives the same picture
    alone = pipe.generate(Img2imgParams(PROMPT, steps=2, seed=101, init_images=[b], denoising_strength=0.2,
                                        sampler_name="Euler"))
    assert psnr(np.asarray(alone[0].image), np.asarray(out[1].image), peak=255.0) > 40
    assert psnr(np.asarray(out[0].image), np.asarray(out[1].image), peak=255.0) < 25  # not the same start
    # one image serves the whole batch
    plan = pipe.plan(Img2imgParams(PROMPT, steps=2, batch_size=3, init_images=[a]))
    assert len(plan.batches[0].seeds) == 3 and len(plan.init_images) == 1


def test_infotext_has_denoising_strength_in_webui_order(pipe):
    img = init_image(64, 64)
    out = pipe.img2img(PROMPT, init_images=[img], steps=3, seed=7, denoising_strength=0.75, sampler_name="Euler",
                       clip_skip=2, initial_noise_multiplier=1.1, seed_resize_from_w=64, seed_resize_from_h=64)
    text = out[0].infotext
    assert "Denoising strength: 0.75" in text and "Noise multiplier: 1.1" in text
    order = [text.index(k) for k in ("Seed resize from:", "Denoising strength:", "Clip skip:", "Noise multiplier:",
                                     "Version:")]
    assert order == sorted(order)


def test_txt2img_takes_denoising_strength_for_hires_fix_only(tiny_pipeline):
    p = GenerationParams.from_webui({"prompt": "x", "denoising_strength": 0.3, "override_settings":
                                     {"img2img_fix_steps": True}})
    assert p.denoising_strength == 0.3 and not p.enable_hr and not hasattr(p, "img2img_fix_steps")
    with pytest.raises(SdrtError, match="unknown generation parameter 'init_images'"):
        GenerationParams.from_webui({"prompt": "x", "init_images": []})
    q = Img2imgParams.from_webui({"prompt": "x", "denoising_strength": 0.3, "mask": None, "inpainting_fill": 1,
                                  "override_settings": {"img2img_fix_steps": True}})
    assert (q.denoising_strength, q.img2img_fix_steps) == (0.3, True)
    assert q.replace(steps=3).denoising_strength == 0.3


# ---- bad input: one line ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"denoising_strength": 1.5}, "denoising_strength must be a number in \\[0, 1\\], got 1.5"),
    ({"denoising_strength": -0.1}, "denoising_strength must be a number in \\[0, 1\\]"),
    ({"denoising_strength": "high"}, "denoising_strength must be a number"),
    ({"resize_mode": 4}, "resize_mode must be one of 0 Just resize"),
    ({"init_images": []}, "needs at least one init image"),
    ({"init_images": ["photo.png"]}, "init images must be PIL images, got str"),
    ({"batch_size": 1, "init_images": [Image.new("RGB", (8, 8))] * 2}, "2 init images for batch size 1"),
    ({"init_images": [Image.new("I;16", (64, 64))]}, "init image mode I;16 \\(16-bit pixels\\) is not supported"),
    ({"sampler_name": "UniPC"}, "'UniPC' does not support img2img"),
    ({"mask": Image.new("L", (8, 8)), "inpainting_fill": 4}, "inpainting_fill must be one of 0 fill"),
    ({"enable_hr": True}, "enable_hr \\(hires fix\\) is a txt2img option"),
])
def test_bad_input_is_one_line(pipe, changes, message):
    base = {"prompt": "x", "steps": 4, "init_images": [init_image(64, 64)]}
    with pytest.raises(SdrtError, match=message) as e:
        pipe.plan(Img2imgParams.from_webui({**base, **changes}))
    assert "\n" not in str(e.value)


def test_image_modes_convert_as_webui():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    flat = np.asarray(flatten(rgba))
    assert flat[0, 0].tolist() == [10, 20, 30] and flat[1, 1].tolist() == [255, 255, 255]  # onto white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))
    assert np.array_equal(np.asarray(flatten(cmyk)), np.asarray(cmyk.convert("RGB")))
    gray = Image.new("L", (4, 4), 77)
    assert flatten(gray).mode == "RGB" and np.asarray(flatten(gray))[0, 0].tolist() == [77, 77, 77]


# ---- the command line ------------------------------------------------------------------------------

def test_cli_img2img_end_to_end(tiny_bundle, pipe, tmp_path):
    src = tmp_path / "init.png"
    init_image(64, 64).save(src)
    r = run_sdrt("img2img", "a red circle", "--model", tiny_bundle, "--init-image", src, "--steps", 4, "--seed", 5,
                 "--sampler", "Euler", "--denoising-strength", 0.75, "--resize-mode", "crop-and-resize",
                 "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    with Image.open(path) as im:
        text = im.text["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert "Denoising strength: 0.75" in text and "Steps: 4" in text and "Seed: 5" in text
    same = pipe.img2img("a red circle", init_images=[Image.open(src)], steps=4, seed=5, sampler_name="Euler",
                        denoising_strength=0.75, resize_mode=1)
    assert np.array_equal(pixels, np.asarray(same[0].image))


def test_cli_bad_inputs(tiny_bundle, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    init_image(64, 64).save(good, pnginfo=PngImagePlugin.PngInfo())
    for args, message in [(["--init-image", junk], "error: cannot read image"),
                          (["--init-image", good, "--denoising-strength", 2], "error: denoising_strength must be")]:
        r = run_sdrt("img2img", "x", "--model", tiny_bundle, "--steps", 2, *args, "-o", tmp_path / "out")
        assert r.returncode == 1 and r.stderr.strip().startswith(message), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_interrupt_and_memory_modes(tiny_bundle):
    low = Img2imgPipeline(tiny_bundle, memory="low")
    p = Img2imgParams(PROMPT, steps=10, n_iter=2, init_images=[init_image(64, 64)], denoising_strength=0.5,
                      sampler_name="Euler")

    def stop(event):
        if event["step"] == 2:
            low.interrupt()

    out = low.generate(p, callback=stop)
    assert len(out) == 1 and out[0].stopped_at == 2  # decoded from the last prediction; batch 2 not started
    assert low.loaded() == []  # the encoder too is loaded only for its stage
    full = low.generate(p)
    assert [r.stopped_at for r in full] == [None, None]
