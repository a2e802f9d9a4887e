"""Hires fix and the upscalers against the webui's rules and a PyTorch reference (tiny model).

The reference: k-diffusion 0.1.1's samplers (diffusers' DDIM scheduler) on diffusers' UNet for both
passes, the first pass's latents upscaled by ``torch.nn.functional.interpolate`` in the webui's
latent mode, or decoded by diffusers' VAE, resized with Pillow as the webui's ``resize_image``
and encoded again; the second pass's noise from a new torch generator of the seed at the larger
size, its schedule by ``setup_img2img_steps`` with the steps given. Shared with the runtime: the
sigma schedule values and the Pillow resize of the pixel upscalers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_sdrt
from PIL import Image
from sdrt.runtime import png, sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline import hires, upscale
from sdrt.runtime.pipeline.img2img import Img2imgPipeline
from sdrt.runtime.pipeline.params import GenerationParams
from sdrt.runtime.pipeline.txt2img import to_uint8
from test_img2img import CFG, NEGATIVE, PROMPT, SEED, init_image, reference_init_latent
from test_sampler_e2e import Generators
from test_samplers import SD_SCHEDULER, TorchShim

torch = pytest.importorskip("torch")

LANCZOS = Image.Resampling.LANCZOS


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Img2imgPipeline(tiny_bundle)


# ---- the latent modes: torch's interpolate, reimplemented -----------------------------------------

@pytest.mark.parametrize("name", list(upscale.LATENT_MODES))
@pytest.mark.parametrize("src, dst", [((8, 8), (16, 16)), ((7, 13), (16, 24)), ((8, 12), (12, 18)),
                                      ((16, 12), (5, 9)), ((9, 11), (9, 30)), ((64, 64), (128, 128))])
def test_latent_modes_match_torch_interpolate(name, src, dst):
    mode, antialias = upscale.LATENT_MODES[name]
    z = np.random.default_rng(1).standard_normal((2, 4, *src)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(z), size=dst, mode=mode, antialias=antialias).numpy()
    got = upscale.upscale_latents(z, *dst, name)
    assert got.shape == expected.shape and got.dtype == np.float32
    if mode.startswith("nearest"):
        np.testing.assert_array_equal(got, expected)
    else:  # the same arithmetic; torch's compiled kernels round a few ulps differently (fused multiply-adds)
        np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)


# ---- the pixel upscalers: modules/upscaler.py -----------------------------------------------------

def test_pixel_upscalers_as_the_webui():
    im = init_image(50, 30)
    # 4x: Lanczos / Nearest once to 200 x 120 (multiples of 8: no final resize)
    assert np.array_equal(np.asarray(upscale.upscale(im, 4, "Lanczos")), np.asarray(im.resize((200, 120), LANCZOS)))
    nearest = upscale.upscale(im, 4, "Nearest")
    assert np.array_equal(np.asarray(nearest), np.asarray(im.resize((200, 120), Image.Resampling.NEAREST)))
    # 1.3x: the upscaler to 65 x 39, then Lanczos down to the multiple of 8 below, 64 x 32
    expected = im.resize((65, 39), Image.Resampling.NEAREST).resize((64, 32), LANCZOS)
    assert np.array_equal(np.asarray(upscale.upscale(im, 1.3, "Nearest")), np.asarray(expected))
    # None: only the final Lanczos resize
    assert np.array_equal(np.asarray(upscale.upscale(im, 2, "None")), np.asarray(im.resize((96, 56), LANCZOS)))
    # images.resize_image with an upscaler: upscaled, then Lanczos to the exact size
    out = upscale.resize_image(0, im, 130, 70, "Nearest")
    up = im.resize((int(50 * 2.6), int(30 * 2.6)), Image.Resampling.NEAREST).resize((128, 72), LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(up.resize((130, 70), LANCZOS)))


def test_unknown_upscaler_is_one_line():
    with pytest.raises(SdrtError, match="unknown upscaler 'R-ESRGAN 4x\\+' \\(ESRGAN / Real-ESRGAN models are not "
                                        "supported by sdrt yet\\); choose one of Latent, "):
        upscale.check_upscaler("R-ESRGAN 4x+")


# ---- the target size ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, changes, expected", [
    ((512, 512), {"hr_scale": 2}, (1024, 1024, 0, 0)),
    ((512, 768), {"hr_scale": 1.5}, (768, 1152, 0, 0)),
    ((512, 512), {"hr_scale": 1.3}, (665, 665, 0, 0)),  # int(), as the webui
    ((512, 768), {"hr_resize_x": 1024}, (1024, 1536, 0, 0)),
    ((512, 768), {"hr_resize_y": 1000}, (666, 1000, 0, 0)),
    # both: cover 1024 x 1024 from 512 x 768 -> 1024 x 1536, cropped by (1536 - 1024) // 8 latent rows
    ((512, 768), {"hr_resize_x": 1024, "hr_resize_y": 1024}, (1024, 1536, 0, 64)),
    ((768, 512), {"hr_resize_x": 1000, "hr_resize_y": 1000}, (1500, 1000, 62, 0)),
])
def test_target_resolution_as_the_webui(size, changes, expected):
    p = GenerationParams("x", **changes)
    assert hires.target_resolution(*size, p) == expected


@pytest.mark.parametrize("steps, strength, expected", [(20, 0.5, (40, 19)), (10, 0.7, (14, 9)), (8, 1.0, (8, 7)),
                                                       (10, 0.0, (0, 9))])
def test_second_pass_steps(steps, strength, expected):
    assert hires.hires_steps(steps, strength) == expected


# ---- against the PyTorch reference ---------------------------------------------------------------

def k_sample(kd, monkeypatch, ref, name, x, sched, gens, cond, uncond):
    def model(x, sigma, **kwargs):
        return ref.denoise(x, float(sigma.reshape(-1)[0]), cond, uncond, CFG)

    monkeypatch.setattr(kd, "torch", TorchShim(type("S", (), {"torch_next": gens.next})()))
    fn = {"Euler": kd.sample_euler, "Euler a": kd.sample_euler_ancestral}[name]
    return fn(model, x, sched, disable=True)


CASES = {  # name: (sampler, hr sampler, upscaler, request changes)
    "latent-euler": ("Euler", None, None, {"hr_scale": 2}),
    "bicubic-aa-euler-a": ("Euler", "Euler a", "Latent (bicubic antialiased)", {"hr_scale": 1.5,
                                                                                "hr_second_pass_steps": 6}),
    "lanczos-ddim-resize": ("Euler a", "DDIM", "Lanczos", {"hr_resize_x": 96, "hr_resize_y": 80}),
    "nearest-exact-crop": ("Euler", None, "Latent (nearest-exact)", {"hr_resize_x": 64, "hr_resize_y": 112}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_reference(pipe, ref, kd, monkeypatch, case):
    name, hr_name, upscaler, changes = CASES[case]
    steps, strength = 8, 0.6
    p = GenerationParams.from_webui({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": steps, "seed": SEED,
                                     "cfg_scale": CFG, "sampler_name": name, "width": 64, "height": 64,
                                     "enable_hr": True, "denoising_strength": strength, "hr_upscaler": upscaler,
                                     "hr_sampler_name": hr_name, **changes})
    out = pipe.generate(p)[0]
    plan = pipe.plan(p)

    # ---- the reference: the webui's txt2img, upscale and second pass, by hand
    r_cond, r_uncond = ref.encode(PROMPT, 1, 1), ref.encode(NEGATIVE, 1, 1)
    sigmas = sampling.sigmas_for(plan.schedule, steps, pipe.denoiser.schedule, sampler=plan.sampler)
    gens = Generators((4, 8, 8), SEED)
    x = k_sample(kd, monkeypatch, ref, name, gens.first * float(sigmas[0]), torch.from_numpy(sigmas.astype(np.float32)),
                 gens, r_cond, r_uncond)
    tx, ty = plan.upscale_to
    if upscaler is None or upscaler.startswith("Latent"):
        mode, aa = upscale.LATENT_MODES[upscaler or "Latent"]
        z = torch.nn.functional.interpolate(x, size=(ty // 8, tx // 8), mode=mode, antialias=aa)
    else:
        low = Image.fromarray((255.0 * np.moveaxis(ref.decode(x.float())[0], 0, 2)).astype(np.uint8))
        z = reference_init_latent(ref, upscale.resize_image(0, low, tx, ty, upscaler))
    cx, cy = plan.truncate
    z = z[:, :, cy // 2:z.shape[2] - (cy + 1) // 2, cx // 2:z.shape[3] - (cx + 1) // 2]
    hr_steps = changes.get("hr_second_pass_steps") or steps
    total, t_enc = int(hr_steps / strength), hr_steps - 1  # setup_img2img_steps with the steps given
    hr_gens = Generators(tuple(z.shape[1:]), SEED)  # a new generator of the seed at the new size
    second = hr_name or name
    if second == "DDIM":
        from diffusers import DDIMScheduler

        sch = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
        sch.set_timesteps(total)
        a = sch.alphas_cumprod[1 + (1000 // total) * t_enc]
        x = z * a.sqrt() + hr_gens.first * (1 - a).sqrt()
        for t in sch.timesteps[total - t_enc:-1]:
            o = ref.unet(torch.cat([x, x]), t.reshape(1).expand(2), torch.cat([r_cond, r_uncond])).sample
            x = sch.step(o[1:] + (o[:1] - o[1:]) * CFG, t, x, eta=0.0).prev_sample
    else:
        sig = sampling.sigmas_for(plan.hr_schedule, total, pipe.denoiser.schedule, sampler=sampling.resolve(second)[0])
        sched = torch.from_numpy(sig[total - t_enc - 1:].astype(np.float32))
        x = k_sample(kd, monkeypatch, ref, second, z + hr_gens.first * sched[0], sched, hr_gens, r_cond, r_uncond)
    expected = to_uint8(ref.decode(x.float())[0])

    got = np.asarray(out.image)
    assert got.shape == expected.shape == (plan.hr_size[1], plan.hr_size[0], 3)
    score = psnr(expected, got, peak=255.0)
    d = np.abs(expected.astype(int) - got)
    assert score >= 60, f"{case}: PSNR {score:.1f} dB, max {d.max()}/255, {(d > 0).sum()} values differ"


# ---- hires checkpoint: the second pass on another model ---------------------------------------------

@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, tiny_configs):
    """A second tiny model (other random weights, the same latent space), as a checkpoint."""
    from sdrt.export import convert
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import save_checkpoint

    unet, vae, text_encoder = random_modules(tiny_configs, seed=1)
    ldm = convert.diffusers_to_ldm(
        {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()},
        tiny_configs)
    return save_checkpoint(ldm, tiny_configs, tmp_path_factory.mktemp("ckpt2") / "other-sd1.safetensors")


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory, other_checkpoint):
    from sdrt.export.write import export_checkpoint

    return export_checkpoint(other_checkpoint, tmp_path_factory.mktemp("bundles2") / "other")


@pytest.mark.parametrize("upscaler", ["Lanczos", None])
def test_hires_checkpoint_matches_torch_reference(tiny_bundle, other_bundle, ref, other_checkpoint, kd, monkeypatch,
                                                  upscaler):
    from sdrt.export.reference import TorchReference

    pipe = Img2imgPipeline(tiny_bundle)
    other = Img2imgPipeline(other_bundle)
    pipe.set_hires_checkpoint(other)
    steps, strength = 6, 0.6
    p = GenerationParams.from_webui({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": steps, "seed": SEED,
                                     "cfg_scale": CFG, "sampler_name": "Euler", "width": 64, "height": 64,
                                     "enable_hr": True, "denoising_strength": strength, "hr_upscaler": upscaler,
                                     "hr_scale": 1.5, "hr_checkpoint_name": other.bundle.name})
    out = pipe.generate(p)[0]
    plan = pipe.plan(p)
    title = f"{other.bundle.name} [{other.bundle.model_hash}]"
    assert plan.hr_checkpoint == title and f"Hires checkpoint: {title}, Hires upscale: 1.5" in out.infotext
    assert f"Model: {pipe.bundle.name}," in out.infotext  # the first model's, as the webui's

    # ---- the reference: the first pass on the first model, the second (and the VAE after it) on the other
    second = TorchReference(other_checkpoint, other_bundle / "tokenizer")
    cond, uncond = ref.encode(PROMPT, 1, 1), ref.encode(NEGATIVE, 1, 1)
    sigmas = sampling.sigmas_for(plan.schedule, steps, pipe.denoiser.schedule, sampler=plan.sampler)
    gens = Generators((4, 8, 8), SEED)
    x = k_sample(kd, monkeypatch, ref, "Euler", gens.first * float(sigmas[0]),
                 torch.from_numpy(sigmas.astype(np.float32)), gens, cond, uncond)
    tx, ty = plan.upscale_to
    if upscaler is None:
        mode, aa = upscale.LATENT_MODES["Latent"]
        z = torch.nn.functional.interpolate(x, size=(ty // 8, tx // 8), mode=mode, antialias=aa)
    else:  # decoded by the first model's VAE, encoded by the second's
        low = Image.fromarray((255.0 * np.moveaxis(ref.decode(x.float())[0], 0, 2)).astype(np.uint8))
        z = reference_init_latent(second, upscale.resize_image(0, low, tx, ty, upscaler))
    total, t_enc = int(steps / strength), steps - 1
    hr_gens = Generators(tuple(z.shape[1:]), SEED)
    sig = sampling.sigmas_for(plan.hr_schedule, total, other.denoiser.schedule, sampler=plan.hr_sampler)
    sched = torch.from_numpy(sig[total - t_enc - 1:].astype(np.float32))
    x = k_sample(kd, monkeypatch, second, "Euler", z + hr_gens.first * sched[0], sched, hr_gens,
                 second.encode(PROMPT, 1, 1), second.encode(NEGATIVE, 1, 1))
    expected = to_uint8(second.decode(x.float())[0])
    got = np.asarray(out.image)
    assert got.shape == expected.shape == (96, 96, 3)
    score = psnr(expected, got, peak=255.0)
    assert score >= 60, f"hires checkpoint, {upscaler}: PSNR {score:.1f} dB"
    # the same request on one model differs (the second model did run)
    same = pipe.generate(p.replace(hr_checkpoint_name="Use same checkpoint"))[0]
    assert "Hires checkpoint" not in same.infotext and psnr(np.asarray(same.image), got, peak=255.0) < 40


def test_hires_checkpoint_names_and_latent_space(tiny_bundle, pipe, tmp_path):
    p = GenerationParams("x", steps=2, width=64, height=64, enable_hr=True, hr_checkpoint_name="nope [0123456789]")
    with pytest.raises(SdrtError, match="hr_checkpoint_name 'nope \\[0123456789\\]' is not a model loaded here: "
                                        "none is attached \\(sdrt generate --hr-checkpoint MODEL"):
        pipe.plan(p)
    # the model itself by name: run on it, named in the infotext as the webui does
    title = f"{pipe.bundle.name} [{pipe.bundle.model_hash}]"
    assert pipe.plan(p.replace(hr_checkpoint_name=title)).hr_checkpoint == title
    assert pipe.plan(p.replace(enable_hr=False, hr_checkpoint_name="nope")).params  # ignored without hires fix
    # a model of another latent space (the tiny bundle's manifest with SDXL's VAE scaling factor)
    shifted = tmp_path / "shifted"
    shutil.copytree(tiny_bundle, shifted)
    manifest = json.loads((shifted / "sdrt.json").read_text())
    manifest["latent_scale_factor"] = 0.13025
    (shifted / "sdrt.json").write_text(json.dumps(manifest))
    with pytest.raises(SdrtError, match="hires checkpoint tiny-sd1 has another latent space than tiny-sd1 "
                                        "\\(sd1: 4 channels x 0.13025 vs sd1: 4 x 0.18215\\)"):
        pipe.set_hires_checkpoint(Img2imgPipeline(shifted))
    assert pipe.hires_checkpoint is None


def test_cli_hires_checkpoint(tiny_bundle, other_bundle, tmp_path):
    r = run_sdrt("generate", "a red circle", "--model", tiny_bundle, "--steps", 2, "--seed", 5, "--sampler", "Euler",
                 "-W", 64, "-H", 64, "--enable-hr", "--hr-scale", 1.5, "--hr-checkpoint", other_bundle,
                 "--denoising-strength", 0.5, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        text, pixels = im.text["parameters"], np.asarray(im.convert("RGB"))
    pipe = Img2imgPipeline(tiny_bundle)
    other = Img2imgPipeline(other_bundle)
    pipe.set_hires_checkpoint(other)
    same = pipe("a red circle", steps=2, seed=5, sampler_name="Euler", width=64, height=64, enable_hr=True,
                hr_scale=1.5, denoising_strength=0.5, hr_checkpoint_name=other.bundle.name)[0]
    assert np.array_equal(pixels, np.asarray(same.image)) and text == same.infotext
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "--steps", 2, "--hr-checkpoint", other_bundle,
                 "-o", tmp_path / "bad")
    assert r.returncode == 1 and r.stderr == "error: --hr-checkpoint is a hires fix option: give --enable-hr\n"


# ---- infotext, API names, bad input, the command line ---------------------------------------------

def test_infotext_as_the_webui(pipe):
    out = pipe(PROMPT, steps=3, seed=2, sampler_name="Euler", width=64, height=64, enable_hr=True, hr_scale=1.5,
               hr_upscaler="Latent (nearest)", hr_second_pass_steps=2, denoising_strength=0.55,
               hr_sampler_name="DPM++ 2M", hr_scheduler="Karras", hr_prompt="a blue square",
               seed_resize_from_w=64, seed_resize_from_h=64)[0]
    assert out.image.size == (96, 96)
    prompt, _, fields = png.parse_infotext(out.infotext)
    assert prompt == PROMPT and fields["Size"] == "64x64"  # the first pass's size, as the webui
    assert {k: fields[k] for k in ("Denoising strength", "Hires sampler", "Hires prompt", "Hires schedule type",
                                   "Hires upscale", "Hires steps", "Hires upscaler")} == {
        "Denoising strength": "0.55", "Hires sampler": "DPM++ 2M", "Hires prompt": "a blue square",
        "Hires schedule type": "Karras", "Hires upscale": "1.5", "Hires steps": "2", "Hires upscaler": "Latent (nearest)"}
    keys = list(fields)
    order = ["Seed resize from", "Denoising strength", "Hires sampler", "Hires prompt", "Hires schedule type",
             "Hires upscale", "Hires steps", "Hires upscaler", "Version"]
    assert [keys.index(k) for k in order] == sorted(keys.index(k) for k in order)
    plain = pipe(PROMPT, steps=3, seed=2, sampler_name="Euler", width=64, height=64, enable_hr=True,
                 hr_resize_x=96, hr_resize_y=64)[0]
    assert plain.image.size == (96, 64)
    fields = png.parse_infotext(plain.infotext)[2]
    assert fields["Hires resize"] == "96x64" and not any(
        k in fields for k in ("Hires upscale", "Hires sampler", "Hires steps", "Hires upscaler", "Hires prompt"))


def test_progress_counts_both_passes(pipe):
    events = []
    pipe.generate(GenerationParams(PROMPT, steps=4, seed=1, sampler_name="Euler", width=64, height=64,
                                   enable_hr=True, denoising_strength=0.5), callback=events.append)
    # 4 first-pass steps, then the second pass's last 4 of int(4 / 0.5) = 8
    assert [e["step"] for e in events] == list(range(1, 9)) and {e["steps"] for e in events} == {8}


def test_low_memory_batches_and_interrupt(tiny_bundle):
    low = Img2imgPipeline(tiny_bundle, memory="low")
    p = GenerationParams("x", steps=3, seed=1, sampler_name="Euler", width=64, height=64, enable_hr=True,
                         hr_upscaler="Lanczos", batch_size=2, n_iter=2)
    out = low.generate(p)
    assert [r.seed for r in out] == [1, 2, 3, 4] and {r.image.size for r in out} == {(128, 128)}
    assert low.loaded() == []  # the encoder and decoder used between the passes are released too
    # each image as its own seed's hires render
    alone = low.generate(p.replace(seed=4, batch_size=1, n_iter=1))[0]
    assert np.array_equal(np.asarray(alone.image), np.asarray(out[3].image))

    def stop(event):
        if event["step"] == 5:  # the second pass's second step
            low.interrupt()

    out = low.generate(p.replace(n_iter=1, batch_size=1), callback=stop)
    assert len(out) == 1 and out[0].stopped_at == 5 and out[0].image.size == (128, 128)


def test_from_webui_accepts_the_hires_fields():
    p = GenerationParams.from_webui({"prompt": "x", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos",
                                     "hr_second_pass_steps": 5, "hr_resize_x": 0, "hr_resize_y": 0,
                                     "denoising_strength": 0.4, "hr_sampler_name": "Use same sampler",
                                     "hr_scheduler": "Use same scheduler", "hr_prompt": "", "hr_negative_prompt": "",
                                     "hr_checkpoint_name": "Use same checkpoint", "firstphase_width": 0})
    assert (p.enable_hr, p.hr_upscaler, p.hr_second_pass_steps, p.denoising_strength) == (True, "Lanczos", 5, 0.4)
    assert GenerationParams.from_webui({"prompt": "x", "hr_checkpoint_name": "other.safetensors"}).hr_checkpoint_name \
        == "other.safetensors"


@pytest.mark.parametrize("changes, message", [
    ({"denoising_strength": 1.5}, "denoising_strength must be a number in \\[0, 1\\], got 1.5"),
    ({"denoising_strength": -0.2}, "denoising_strength must be a number in \\[0, 1\\]"),
    ({"hr_upscaler": "4x-UltraSharp"}, "unknown upscaler '4x-UltraSharp' \\(ESRGAN"),
    ({"hr_scale": 0}, "hr_scale must be a number above 0"),
    ({"hr_second_pass_steps": -1}, "hr_second_pass_steps must be a whole number >= 0"),
    ({"hr_sampler_name": "UniPC"}, "hires fix: sampler 'UniPC' does not support img2img"),
    ({"hr_sampler_name": "Euler z"}, "unknown sampler"),
    ({"hr_scale": 0.05}, "hires fix target 3x3 from 64x64 is too small"),
])
def test_bad_input_is_one_line(pipe, changes, message):
    with pytest.raises(SdrtError, match=message) as e:
        pipe.plan(GenerationParams.from_webui({"prompt": "x", "steps": 4, "width": 64, "height": 64,
                                               "enable_hr": True, **changes}))
    assert "\n" not in str(e.value)


def test_plain_pipeline_refuses_hires_by_name(tiny_pipeline):
    with pytest.raises(SdrtError, match="hires fix \\(enable_hr\\) needs the VAE encoder's pipeline"):
        tiny_pipeline.plan(GenerationParams("x", enable_hr=True))


def test_cli_generate_hires(tiny_bundle, pipe, tmp_path):
    r = run_sdrt("generate", "a red circle", "--model", tiny_bundle, "--steps", 3, "--seed", 5, "--sampler", "Euler",
                 "-W", 64, "-H", 64, "--enable-hr", "--hr-scale", 1.5, "--hr-upscaler", "Lanczos",
                 "--hr-second-pass-steps", 2, "--denoising-strength", 0.5, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        text, pixels = im.text["parameters"], np.asarray(im.convert("RGB"))
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in text and "Denoising strength: 0.5" in text
    same = pipe("a red circle", steps=3, seed=5, sampler_name="Euler", width=64, height=64, enable_hr=True,
                hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=2, denoising_strength=0.5)
    assert np.array_equal(pixels, np.asarray(same[0].image))
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "--steps", 2, "--enable-hr", "--hr-upscaler", "SwinIR 4x",
                 "-o", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: hr_upscaler: unknown upscaler 'SwinIR 4x': neither one of Latent, ") and r.stderr.count("\n") == 1


def test_esrgan_upscaler_for_hires_fix(tiny_bundle, tmp_path):
    """An ESRGAN file named as hr_upscaler: the first pass decoded, the network (tiled), Lanczos to the target."""
    from sdrt.export.esrgan import build, export_esrgan
    from test_esrgan import Reference, webui_tiled

    torch.manual_seed(1)
    net = Reference().eval()
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "4x-tiny.pth")
    export_esrgan(tmp_path / "4x-tiny.pth", tmp_path / "up.onnx")
    model = upscale.ModelUpscaler("4x-tiny", tmp_path / "up.onnx", 4)
    pipe = Img2imgPipeline(tiny_bundle, upscalers={"4x-tiny": model})
    p = GenerationParams("x", steps=3, seed=3, sampler_name="Euler", width=64, height=64, enable_hr=True,
                         hr_upscaler="4x-tiny", denoising_strength=0.0, hr_second_pass_steps=2)
    out = pipe.generate(p)[0]
    assert out.image.size == (128, 128) and "Hires upscaler: 4x-tiny" in out.infotext
    # at strength 0 the second pass keeps its start latents: the upscaled first pass, encoded and decoded
    low = pipe.generate(GenerationParams("x", steps=3, seed=3, sampler_name="Euler", width=64, height=64))[0].image
    big = webui_tiled(build(tmp_path / "4x-tiny.pth"), low, 192, 8).resize((128, 128), LANCZOS)
    again = pipe.decode(pipe.encode([big]))[0]
    assert psnr(np.asarray(again), np.asarray(out.image), peak=255.0) > 40
    with pytest.raises(SdrtError, match="hr_upscaler: unknown upscaler '4x-other'"):
        pipe.plan(p.replace(hr_upscaler="4x-other"))


def test_cli_upscale(tmp_path):
    src = tmp_path / "in.png"
    info = png.PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler, Seed: 1")
    init_image(50, 30).save(src, pnginfo=info)
    r = run_sdrt("upscale", src, "--upscaler", "Nearest", "--scale", 4, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path.endswith("00000.png")
    with Image.open(path) as im:
        assert im.size == (200, 120)
        assert im.text["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: Nearest"
        assert im.text["parameters"].startswith("a cat")  # the source's generation parameters kept
        expected = init_image(50, 30).resize((200, 120), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
    for args, message in [(["--upscaler", "ESRGAN_4x"], "error: upscaler: unknown upscaler 'ESRGAN_4x'"),
                          (["--scale", 0], "error: scale must be a number above 0")]:
        r = run_sdrt("upscale", src, *args, "-o", tmp_path / "out")
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    wide = tmp_path / "wide.png"
    Image.new("I;16", (8, 8), 300).save(wide)
    r = run_sdrt("upscale", wide, "-o", tmp_path / "out")
    assert r.returncode == 1 and "mode I;16 (16-bit pixels) is not supported" in r.stderr
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(cmyk)
    assert run_sdrt("upscale", cmyk, "--scale", 2, "-o", tmp_path / "out").returncode == 0
