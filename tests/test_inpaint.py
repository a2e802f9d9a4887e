"""Inpainting (regular 4-channel models) against the webui's rules and a PyTorch reference.

The reference: the webui's mask handling written out here with OpenCV's GaussianBlur and Pillow
(as ``StableDiffusionProcessingImg2Img.init``), diffusers' VAE encoder (the posterior's mean),
k-diffusion 0.1.1's samplers with the webui's CFG denoiser blend after denoising (DDIM: diffusers'
scheduler with the blend before the UNet), the final blend, diffusers' VAE decoder and the
webui's ``apply_overlay``; the seed's torch generator for the noise. Shared with the runtime:
the sigma schedule values and the Pillow geometry helpers (crop box, fill, resize).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_sdrt
from PIL import Image, ImageOps
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline import inpaint
from sdrt.runtime.pipeline.img2img import Img2imgPipeline
from sdrt.runtime.pipeline.params import Img2imgParams
from sdrt.runtime.pipeline.upscale import resize_image
from test_img2img import (
    CFG,
    NEGATIVE,
    PROMPT,
    SEED,
    STEPS,
    init_image,
    reference_init_latent,
)
from test_sampler_e2e import Generators
from test_samplers import SD_SCHEDULER, TorchShim

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Img2imgPipeline(tiny_bundle)


def disc_mask(width: int, height: int, cx=0.6, cy=0.4, r=0.22) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    return Image.fromarray((((x - cx) ** 2 + (y - cy) ** 2 < r * r) * 255).astype(np.uint8))


# ---- the mask's pieces ---------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1, 4, 7, 16, 40])
@pytest.mark.parametrize("size", [(64, 64), (37, 90), (1, 50), (130, 3)])
def test_blur_is_opencv_bit_for_bit(sigma, size):
    rng = np.random.default_rng(sigma)
    for a in ((rng.random(size) > 0.7).astype(np.uint8) * 255, rng.integers(0, 256, size).astype(np.uint8)):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        expected = cv2.GaussianBlur(cv2.GaussianBlur(a, (k, 1), sigma), (1, k), sigma)
        got = inpaint.gaussian_blur(inpaint.gaussian_blur(a, sigma, axis=1), sigma, axis=0)
        np.testing.assert_array_equal(got, expected)


def test_binary_mask_modes():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 200))
    rgba.putpixel((2, 2), (0, 0, 0, 100))
    m = np.asarray(inpaint.binary_mask(rgba))
    assert m[1, 1] == 255 and m[2, 2] == 0 and m[0, 0] == 0  # alpha thresholded at 128
    assert np.asarray(inpaint.binary_mask(rgba, round_mask=False))[2, 2] == 100
    opaque = Image.new("RGBA", (4, 4), (255, 255, 255, 255))  # no transparency: its colours, as L
    assert np.asarray(inpaint.binary_mask(opaque)).min() == 255
    wide = Image.new("I;16", (4, 4), 65535)  # 16-bit: converted by Pillow (white)
    assert np.asarray(inpaint.binary_mask(wide)).tolist() == np.asarray(wide.convert("L")).tolist()
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(inpaint.binary_mask(cmyk)).min() == 255


def test_crop_region_grows_to_the_aspect_ratio():
    mask = Image.new("L", (100, 80))
    mask.paste(255, (40, 30, 60, 40))  # a 20 x 10 box
    box = inpaint.crop_region(mask, 4)
    assert box == (36, 26, 64, 44)
    # to a 1:1 processing size: 28 x 18 -> 28 x 28, centred (5 above, 5 below)
    assert inpaint.expand_crop_region(box, 64, 64, 100, 80) == (36, 21, 64, 49)
    # near the edge it is shifted inside the image
    assert inpaint.expand_crop_region((0, 0, 10, 40), 64, 64, 100, 80) == (0, 0, 40, 40)
    assert inpaint.crop_region(Image.new("L", (8, 8))) is None


# ---- against the PyTorch reference ---------------------------------------------------------------

def webui_mask(mask, width, height, blur, full_res, pad, invert):
    """StableDiffusionProcessingImg2Img.init's mask steps: (processing mask, overlay mask, crop box)."""
    m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    if blur:
        k = 2 * int(2.5 * blur + 0.5) + 1
        m = Image.fromarray(cv2.GaussianBlur(cv2.GaussianBlur(np.array(m), (k, 1), blur), (1, k), blur))
    if full_res:
        box = inpaint.expand_crop_region(m.getbbox() if not pad else inpaint.crop_region(m, pad), width, height,
                                         m.width, m.height)
        return resize_image(2, m.crop(box), width, height), m, box
    m = resize_image(0, m, width, height)
    return m, Image.fromarray(np.clip(np.array(m).astype(np.float32) * 2, 0, 255).astype(np.uint8)), None


CASES = {  # name: (sampler, inpainting_fill, inpaint_full_res, padding, invert, blur)
    "original-whole-euler": ("Euler", 1, False, 0, False, 4),
    "fill-only-masked-euler-a": ("Euler a", 0, True, 6, False, 4),
    "latent-noise-whole-ddim": ("DDIM", 2, False, 0, False, 2),
    "latent-nothing-inverted-only-masked": ("Euler", 3, True, 0, True, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_reference(pipe, ref, kd, monkeypatch, case):
    name, fill, full_res, pad, invert, blur = CASES[case]
    strength, w = 0.75, 64
    img, mask = init_image(w, w), disc_mask(w, w)
    p = Img2imgParams(PROMPT, NEGATIVE, steps=STEPS, sampler_name=name, seed=SEED, cfg_scale=CFG, init_images=[img],
                      denoising_strength=strength, mask=mask, mask_blur=blur, inpainting_fill=fill,
                      inpaint_full_res=full_res, inpaint_full_res_padding=pad, inpainting_mask_invert=int(invert))
    out = pipe.generate(p)[0]
    plan = pipe.plan(p)

    # ---- the reference: the webui's img2img with a mask, by hand
    m, overlay_mask, box = webui_mask(mask, w, w, blur, full_res, pad, invert)
    start = img if box is None else resize_image(2, img.crop(box), w, w)
    overlay = Image.new("RGBa", img.size)
    overlay.paste(img.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    overlay = overlay.convert("RGBA")
    if fill != 1:  # the webui fills the pixels for every mode but "original"
        start = inpaint.fill(start, m)
    latmask = np.array(m.convert("RGB").resize((w // 8, w // 8)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.around(latmask))
    keep = 1.0 - nmask
    init = reference_init_latent(ref, start)
    gens = Generators(plan.latent_shape, SEED)
    if fill == 2:
        init = init * keep + Generators(plan.latent_shape, SEED).first * nmask
    elif fill == 3:
        init = init * keep
    r_cond, r_uncond = ref.encode(PROMPT, 1, 1), ref.encode(NEGATIVE, 1, 1)
    t_enc = int(strength * STEPS)
    if name == "DDIM":
        from diffusers import DDIMScheduler

        sch = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
        sch.set_timesteps(STEPS)
        a = sch.alphas_cumprod[1 + (1000 // STEPS) * t_enc]
        x = init * a.sqrt() + gens.first * (1 - a).sqrt()
        for t in sch.timesteps[STEPS - t_enc:-1]:
            x_in = init * keep + x * nmask  # the webui's mask_before_denoising (clean init latents)
            o = ref.unet(torch.cat([x_in, x_in]), t.reshape(1).expand(2), torch.cat([r_cond, r_uncond])).sample
            x = sch.step(o[1:] + (o[:1] - o[1:]) * CFG, t, x, eta=0.0).prev_sample
    else:
        sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=plan.sampler)
        sched = torch.from_numpy(sigmas[STEPS - t_enc - 1:].astype(np.float32))
        x = init + gens.first * sched[0]

        def model(x, sigma, **kwargs):  # the CFG denoiser's blend after denoising
            return init * keep + ref.denoise(x, float(sigma.reshape(-1)[0]), r_cond, r_uncond, CFG) * nmask

        monkeypatch.setattr(kd, "torch", TorchShim(type("S", (), {"torch_next": gens.next})()))
        fn = kd.sample_euler if name == "Euler" else kd.sample_euler_ancestral
        x = fn(model, x, sched, disable=True)
    x = x * nmask + init * keep
    decoded = Image.fromarray((255.0 * np.moveaxis(ref.decode(x.float())[0], 0, 2)).astype(np.uint8))
    if box is not None:  # apply_overlay's uncrop
        base = Image.new("RGBA", img.size)
        base.paste(resize_image(1, decoded, box[2] - box[0], box[3] - box[1]), box[:2])
        decoded = base
    decoded = decoded.convert("RGBA")
    decoded.alpha_composite(overlay)
    expected = np.asarray(decoded.convert("RGB"))

    got = np.asarray(out.image)
    assert got.shape == expected.shape
    score = psnr(expected, got, peak=255.0)
    d = np.abs(expected.astype(int) - got)
    assert score >= 60, f"{case}: PSNR {score:.1f} dB, max {d.max()}/255, {(d > 0).sum()} values differ"
    # outside the (blurred) mask the init image is kept as it was
    outside = np.asarray(overlay_mask.convert("L").resize(img.size)) == 0
    assert np.abs(got[outside].astype(int) - np.asarray(img)[outside]).max() <= 1


# ---- the infotext, sizes, bad input ----------------------------------------------------------------

def test_infotext_fields_in_webui_order(pipe):
    out = pipe.img2img(PROMPT, init_images=[init_image(64, 64)], mask=disc_mask(64, 64), steps=3, seed=3,
                       sampler_name="Euler", mask_blur=4, inpainting_fill=2, inpaint_full_res=True,
                       inpaint_full_res_padding=8, inpainting_mask_invert=1)
    text = out[0].infotext
    for entry in ("Denoising strength: 0.75", "Mask mode: Inpaint not masked", "Mask blur: 4",
                  "Inpaint area: Only masked", "Masked area padding: 8", "Masked content: latent noise"):
        assert entry in text, text
    keys = ["Denoising strength:", "Mask mode:", "Mask blur:", "Inpaint area:", "Masked content:", "Version:"]
    assert [text.index(k) for k in keys] == sorted(text.index(k) for k in keys)
    plain = pipe.img2img(PROMPT, init_images=[init_image(64, 64)], mask=disc_mask(64, 64), steps=3, seed=3,
                         sampler_name="Euler", mask_blur=0, inpainting_fill=1, inpaint_full_res=False)[0].infotext
    assert not any(k in plain for k in ("Mask blur", "Masked content", "Inpaint area", "Mask mode"))


def test_mask_of_another_size_is_resized_as_the_webui(pipe):
    img = init_image(64, 64)

    def plan(mask):
        return pipe.plan(Img2imgParams(PROMPT, steps=3, seed=4, sampler_name="Euler", init_images=[img], mask=mask,
                                       inpaint_full_res=False, mask_blur=0))

    small, big = plan(disc_mask(64, 64)), plan(disc_mask(128, 128))
    # the 128 x 128 mask is resized to the request's 64 x 64 (Lanczos), as the webui: the same latent mask,
    # and a paste-back mask that differs only along the disc's edge
    np.testing.assert_array_equal(small.inpaint.latent_mask, big.inpaint.latent_mask)
    a_small = np.asarray(small.inpaint.overlays[0])[..., 3].astype(int)
    a_big = np.asarray(big.inpaint.overlays[0])[..., 3].astype(int)
    assert a_big.shape == (64, 64) and (np.abs(a_small - a_big) > 64).sum() < 40
    assert pipe.generate(big)[0].image.size == (64, 64)


def test_blank_mask_only_masked_is_plain_img2img(pipe):
    img = init_image(64, 64)
    masked = pipe.img2img(PROMPT, init_images=[img], mask=Image.new("L", (64, 64)), steps=3, seed=5,
                          sampler_name="Euler", inpaint_full_res=True)[0]
    plain = pipe.img2img(PROMPT, init_images=[img], steps=3, seed=5, sampler_name="Euler")[0]
    assert np.array_equal(np.asarray(masked.image), np.asarray(plain.image))


def test_batch_keeps_each_image_outside_the_mask(pipe):
    a, b = init_image(64, 64, 0), init_image(64, 64, 9)
    out = pipe.img2img(PROMPT, init_images=[a, b], batch_size=2, mask=disc_mask(64, 64), mask_blur=0, steps=3,
                       seed=6, sampler_name="Euler", inpaint_full_res=False)
    outside = np.asarray(disc_mask(64, 64)) == 0
    for result, src in zip(out, (a, b)):
        assert np.array_equal(np.asarray(result.image)[outside], np.asarray(src)[outside])
    # one init image for a batch of three: each image pasted back over it
    out = pipe.img2img(PROMPT, init_images=[b], batch_size=3, mask=disc_mask(64, 64), mask_blur=0, steps=3,
                       seed=6, sampler_name="Euler", inpaint_full_res=False)
    assert len(out) == 3
    for result in out:
        assert np.array_equal(np.asarray(result.image)[outside], np.asarray(b)[outside])


@pytest.mark.parametrize("changes, message", [
    ({"inpainting_fill": 7}, "inpainting_fill must be one of 0 fill, 1 original, 2 latent noise, 3 latent nothing"),
    ({"mask_blur": -1}, "mask_blur must be a whole number >= 0"),
    ({"mask_blur_x": 1.5}, "mask_blur_x must be a whole number >= 0"),
    ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding must be a whole number >= 0"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert must be 0 or 1"),
    ({"mask": "mask.png"}, "the mask must be a PIL image, got str"),
    ({"denoising_strength": 1.01}, "denoising_strength must be a number in \\[0, 1\\]"),
    ({"resize_mode": 3, "inpaint_full_res": False, "init_images": [init_image(80, 48)]},
     "resize mode 3 \\(latent upscale\\) with a mask needs the init image at 64x64"),
])
def test_bad_input_is_one_line(pipe, changes, message):
    base = {"prompt": "x", "steps": 4, "init_images": [init_image(64, 64)], "mask": disc_mask(64, 64)}
    with pytest.raises(SdrtError, match=message) as e:
        pipe.plan(Img2imgParams.from_webui({**base, **changes}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["DDIM CFG++", "PLMS", "DPM++ 2M SDE", "LCM", "DPM adaptive"])
def test_every_sampler_family_keeps_the_unmasked_part(pipe, name):
    img, mask = init_image(64, 64), disc_mask(64, 64)
    out = pipe.img2img(PROMPT, init_images=[img], mask=mask, mask_blur=0, steps=6, seed=2, sampler_name=name,
                       inpaint_full_res=False)[0]
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out.image)[outside], np.asarray(img)[outside])
    assert np.abs(np.asarray(out.image)[~outside].astype(int) - np.asarray(img)[~outside]).max() > 10


def test_cli_inpaint(tiny_bundle, pipe, tmp_path):
    src, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_image(64, 64).save(src)
    disc_mask(64, 64).save(mask)
    r = run_sdrt("img2img", "a red circle", "--model", tiny_bundle, "--init-image", src, "--mask", mask, "--steps", 4,
                 "--seed", 5, "--sampler", "Euler", "--mask-blur", 2, "--inpainting-fill", "latent nothing",
                 "--inpaint-full-res", "--inpaint-full-res-padding", 4, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        text, pixels = im.text["parameters"], np.asarray(im.convert("RGB"))
    assert "Masked content: latent nothing" in text and "Inpaint area: Only masked" in text
    same = pipe.img2img("a red circle", init_images=[Image.open(src)], mask=Image.open(mask), steps=4, seed=5,
                        sampler_name="Euler", mask_blur=2, inpainting_fill=3, inpaint_full_res=True,
                        inpaint_full_res_padding=4)
    assert np.array_equal(pixels, np.asarray(same[0].image))
    r = run_sdrt("img2img", "x", "--model", tiny_bundle, "--init-image", src, "--mask", tmp_path / "missing.png",
                 "-o", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read image") and r.stderr.count("\n") == 1


# ---- poor man's outpainting -----------------------------------------------------------------------

def test_poor_mans_outpainting_as_the_script(pipe):
    from PIL import ImageDraw
    from sdrt.runtime.pipeline import outpaint
    from sdrt.runtime.pipeline.upscale import combine_grid, split_grid

    img = init_image(64, 48)
    p = Img2imgParams(PROMPT, steps=2, seed=3, sampler_name="Euler", width=64, height=64, init_images=[img])
    out = outpaint.poor_mans_outpainting(pipe, p, pixels=16, mask_blur=4, inpainting_fill=1, direction=["left", "up"])
    # the canvas: (64 + 16) -> 128 wide, all the growth on the left; (48 + 16) -> 64 high, all of it above
    assert out.image.size == (128, 64)
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(img, (64, 16))
    mask, latent = Image.new("L", (128, 64), "white"), Image.new("L", (128, 64), "white")
    ImageDraw.Draw(mask).rectangle((64 + 8, 16 + 8, 128, 64), fill="black")
    ImageDraw.Draw(latent).rectangle((64 + 2, 16 + 2, 128, 64), fill="black")
    grids = [split_grid(im, 64, 64, 16) for im in (canvas, mask, latent)]
    seed, first = 3, None
    for (y, h, row), (_, _, mrow), (_, _, lrow) in zip(*grids):
        for tile, m, lm in zip(row, mrow, lrow):
            r = pipe.img2img(PROMPT, steps=2, seed=seed, sampler_name="Euler", width=64, height=64,
                             init_images=[tile[2]], mask=m[2], latent_mask=lm[2], mask_blur=8, inpainting_fill=1,
                             inpaint_full_res=False)[0]  # every tile touches the grown left or top side here
            first, seed, tile[2] = first or r, r.seed + 1, r.image
    expected = combine_grid(grids[0], 64, 128, 64, 16)
    assert np.array_equal(np.asarray(out.image), np.asarray(expected))
    assert out.infotext == first.infotext and "Mask blur: 8" in out.infotext
    # the init image's inside, beyond the blurred mask's reach (8 + 20 pixels) and the tiles' overlaps, is kept
    kept = np.asarray(out.image)[16 + 32:, 64 + 36:]
    assert np.abs(kept.astype(int) - np.asarray(img)[32:, 36:]).max() <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"pixels": 0}, "outpainting pixels must be a whole number >= 1"),
    ({"pixels": 64}, "outpainting pixels \\(64\\) must be less than the tile size 64x64"),
    ({"direction": ["sideways"]}, "outpainting directions must be some of left, right, up, down"),
    ({"mask_blur": -2}, "outpainting mask blur must be a whole number >= 0"),
])
def test_poor_mans_outpainting_bad_input(pipe, kwargs, message):
    from sdrt.runtime.pipeline import outpaint

    p = Img2imgParams(PROMPT, steps=2, width=64, height=64, init_images=[init_image(64, 48)])
    with pytest.raises(SdrtError, match=message):
        outpaint.poor_mans_outpainting(pipe, p, **kwargs)


def test_cli_outpaint(tiny_bundle, pipe, tmp_path):
    from sdrt.runtime.pipeline import outpaint

    src = tmp_path / "init.png"
    init_image(64, 48).save(src)
    r = run_sdrt("img2img", "a red circle", "--model", tiny_bundle, "--init-image", src, "--steps", 2, "--seed", 5,
                 "--sampler", "Euler", "-W", 64, "-H", 64, "--outpaint-pixels", 16, "--outpaint-direction", "right",
                 "--inpainting-fill", "fill", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        pixels = np.asarray(im.convert("RGB"))
    p = Img2imgParams("a red circle", steps=2, seed=5, sampler_name="Euler", width=64, height=64,
                      init_images=[Image.open(src)], mask_blur=4)
    same = outpaint.poor_mans_outpainting(pipe, p, 16, 4, 0, ["right"])
    assert pixels.shape == (64, 128, 3) and np.array_equal(pixels, np.asarray(same.image))
