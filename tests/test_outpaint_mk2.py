"""The webui's "Outpainting mk2" script against its own arithmetic and a PyTorch reference.

The matched noise: the script's ``get_matched_noise`` written out here as the script has it (per
channel FFT loops, the window built column by column, scikit-image's ``match_histograms``). The run:
the script's canvases, masks and crops written out here, each side's inpainting the webui's
(OpenCV's blur per axis, Pillow, diffusers' VAE and UNet, k-diffusion 0.1.1's Euler with the
CFG denoiser's blend, the seed's torch generator), the results pasted back as the script does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import run_sdrt
from PIL import Image, ImageDraw, ImageOps
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline import outpaint
from sdrt.runtime.pipeline.img2img import Img2imgPipeline
from sdrt.runtime.pipeline.params import GenerationParams, Img2imgParams
from test_img2img import CFG, NEGATIVE, PROMPT, init_image, reference_init_latent
from test_sampler_e2e import Generators
from test_samplers import TorchShim

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
skimage_exposure = pytest.importorskip("skimage.exposure")


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Img2imgPipeline(tiny_bundle)


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """``init_image`` with seeded grain: a picture whose spectrum has no exact zero (the smooth one's
    has, and the script's phase is then NaN everywhere: its noise comes out black)."""
    grain = np.random.default_rng(seed).integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(init_image(width, height)).astype(int) + grain, 0, 255).astype(np.uint8))


# ---- the matched noise ------------------------------------------------------------------------------

def script_matched_noise(src, mask_rgb, noise_q, color_variation):
    """get_matched_noise as the script writes it: channel loops, the window column by column."""
    rows, cols, channels = src.shape

    def fft2(data, inverse=False):
        out = np.zeros(data.shape, dtype=np.complex128)
        f = np.fft.ifft2 if inverse else np.fft.fft2
        for c in range(data.shape[2]):
            out[:, :, c] = np.fft.ifftshift(f(np.fft.fftshift(data[:, :, c]), norm="ortho"))
        return out

    window = np.zeros((rows, cols))
    x = (np.arange(rows) / rows * 2.0 - 1.0) * float(rows / min(rows, cols))
    for y in range(cols):
        fy = (y / cols * 2.0 - 1.0) * float(cols / min(rows, cols))
        window[:, y] = (1 / ((x**2 + 1.0) * (fy**2 + 1.0))) ** (3.14 / 3.14)
    grey = np.sum(mask_rgb, axis=2) / 3.0
    hard = np.zeros((rows, cols, 3))
    for c in range(3):
        hard[:, :, c] = grey
    windowed = src * (1.0 - hard)
    windowed /= np.max(windowed)
    windowed += np.average(src) * mask_rgb
    src_fft = fft2(windowed)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist
    noise = np.random.default_rng(0).random((rows, cols, channels))
    noise_grey = np.sum(noise, axis=2) / 3.0
    noise *= color_variation
    for c in range(channels):
        noise[:, :, c] += (1.0 - color_variation) * noise_grey
    noise_fft = fft2(noise)
    for c in range(channels):
        noise_fft[:, :, c] *= window
    noise = np.real(fft2(noise_fft, inverse=True))
    shaped_fft = fft2(noise)
    shaped_fft[:, :, :] = np.absolute(shaped_fft) ** 2 * (src_dist**noise_q) * src_phase
    shaped = np.real(fft2(shaped_fft, inverse=True))
    shaped -= np.min(shaped)
    shaped /= np.max(shaped)
    shaped[grey > 1e-6, :] = skimage_exposure.match_histograms(shaped[grey > 1e-6, :], src[grey < 1e-3, :],
                                                               channel_axis=1)
    return np.clip(src * (1.0 - mask_rgb) + shaped * mask_rgb, 0.0, 1.0)


def script_noised(canvas, mask, noise_q, color_variation):
    x = script_matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0, noise_q, color_variation)
    return Image.fromarray(np.clip(x * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("size, box, noise_q, color_variation", [
    ((64, 48), (16, 0, 64, 48), 1.0, 0.05),
    ((40, 72), (0, 0, 40, 50), 0.3, 0.0),
    ((96, 64), (0, 8, 70, 64), 2.5, 1.0),
])
def test_matched_noise_is_the_scripts(size, box, noise_q, color_variation):
    w, h = size
    canvas = Image.new("RGB", size)
    canvas.paste(textured(box[2] - box[0], box[3] - box[1], seed=w), box[:2])
    mask = Image.new("RGB", size, "white")
    ImageDraw.Draw(mask).rectangle((box[0] + 3, box[1] + 3, box[2] - 4, box[3] - 4), fill="black")
    src, m = np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0
    got = outpaint.matched_noise(src, m, noise_q, color_variation)
    expected = script_matched_noise(src.copy(), m, noise_q, color_variation)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert got.shape == (h, w, 3) and np.array_equal(got[m == 0], src[m == 0])  # the kept part unchanged
    noised = outpaint._noised(canvas, mask, noise_q, color_variation)
    assert np.abs(np.asarray(noised).astype(int) - np.asarray(script_noised(canvas, mask, noise_q,
                                                                              color_variation))).max() <= 1


# ---- the whole run against the PyTorch reference --------------------------------------------------

def reference_inpaint(ref, kd, monkeypatch, image, mask, latent_mask, blur_x, blur_y, seed, sigmas, strength):
    """The webui's img2img with a mask (whole picture, original content, its latent mask), Euler over
    the end of ``sigmas`` (the schedule's values, shared with the runtime), one image."""
    w, h = image.size
    m = mask.convert("L")
    if blur_x:
        k = 2 * int(2.5 * blur_x + 0.5) + 1
        m = Image.fromarray(cv2.GaussianBlur(np.array(m), (k, 1), blur_x))
    if blur_y:
        k = 2 * int(2.5 * blur_y + 0.5) + 1
        m = Image.fromarray(cv2.GaussianBlur(np.array(m), (1, k), blur_y))
    overlay_mask = Image.fromarray(np.clip(np.array(m).astype(np.float32) * 2, 0, 255).astype(np.uint8))
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    latmask = np.array(latent_mask.convert("RGB").resize((w // 8, h // 8)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.around(latmask))
    keep = 1.0 - nmask
    init = reference_init_latent(ref, image)
    gens = Generators((4, h // 8, w // 8), seed)
    cond, uncond = ref.encode(PROMPT, 1, 1), ref.encode(NEGATIVE, 1, 1)
    steps = len(sigmas) - 1
    t_enc = int(strength * steps)
    sched = torch.from_numpy(sigmas[steps - t_enc - 1:].astype(np.float32))
    x = init + gens.first * sched[0]

    def model(x, sigma, **kwargs):
        return init * keep + ref.denoise(x, float(sigma.reshape(-1)[0]), cond, uncond, CFG) * nmask

    monkeypatch.setattr(kd, "torch", TorchShim(type("S", (), {"torch_next": gens.next})()))
    x = kd.sample_euler(model, x, sched, disable=True)
    x = x * nmask + init * keep
    decoded = Image.fromarray((255.0 * np.moveaxis(ref.decode(x.float())[0], 0, 2)).astype(np.uint8)).convert("RGBA")
    decoded.alpha_composite(overlay.convert("RGBA"))
    return decoded.convert("RGB")


def reference_mk2(ref, kd, monkeypatch, init, process, pixels, mask_blur, direction, noise_q, color_variation, seed,
                  sigmas, strength):
    """The script's run, written out as it stands (one image, one batch)."""
    left, right, up, down = (pixels if d in direction else 0 for d in ("left", "right", "up", "down"))
    bx = mask_blur if left or right else 0
    by = mask_blur if up or down else 0
    target_w = math.ceil((init.width + left + right) / 64) * 64
    target_h = math.ceil((init.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - init.width) // (left + right)
    if right > 0:
        right = target_w - init.width - left
    if up > 0:
        up = up * (target_h - init.height) // (up + down)
    if down > 0:
        down = target_h - init.height - up
    sizes, infos = [], []

    def expand(im, n, is_left=False, is_right=False, is_top=False, is_bottom=False):
        horiz, vert = is_left or is_right, is_top or is_bottom
        ph, pv = (n if horiz else 0), (n if vert else 0)
        res_w, res_h = im.width + ph, im.height + pv
        img = Image.new("RGB", (math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64))
        img.paste(im, (ph if is_left else 0, pv if is_top else 0))
        mask = Image.new("RGB", img.size, "white")
        ImageDraw.Draw(mask).rectangle((n + bx if is_left else 0, n + by if is_top else 0,
                                        mask.width - n - bx if is_right else res_w,
                                        mask.height - n - by if is_bottom else res_h), fill="black")
        out = script_noised(img, mask, noise_q, color_variation)
        tw = min(process[0], im.width + ph) if horiz else img.width
        th = min(process[1], im.height + pv) if vert else img.height
        region = (0 if is_left else out.width - tw, 0 if is_top else out.height - th,
                  tw if is_left else out.width, th if is_top else out.height)
        mask = mask.crop(region)
        latent = Image.new("RGB", (tw, th), "white")
        ImageDraw.Draw(latent).rectangle((n + bx * 2 if is_left else 0, n + by * 2 if is_top else 0,
                                          mask.width - n - bx * 2 if is_right else res_w,
                                          mask.height - n - by * 2 if is_bottom else res_h), fill="black")
        done = reference_inpaint(ref, kd, monkeypatch, out.crop(region), mask, latent, bx * 4, by * 4, seed, sigmas,
                                 strength)
        sizes.append(done.size)
        out.paste(done, (0 if is_left else out.width - done.width, 0 if is_top else out.height - done.height))
        return out.crop((0, 0, res_w, res_h))

    im = init
    if left > 0:
        im = expand(im, left, is_left=True)
    if right > 0:
        im = expand(im, right, is_right=True)
    if up > 0:
        im = expand(im, up, is_top=True)
    if down > 0:
        im = expand(im, down, is_bottom=True)
    return im, sizes


CASES = {  # name: (init size, process size, pixels, mask blur, directions, noise_q, color variation)
    "left-up-cropped": ((64, 48), (64, 64), 16, 4, ["left", "up"], 1.0, 0.05),
    "right-down": ((48, 40), (64, 64), 16, 2, ["right", "down"], 0.5, 0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_reference(pipe, ref, kd, monkeypatch, case):
    size, process, pixels, blur, direction, noise_q, variation = CASES[case]
    steps, strength, seed = 6, 0.8, 33
    img = textured(*size)
    p = Img2imgParams(PROMPT, NEGATIVE, steps=steps, sampler_name="Euler", seed=seed, cfg_scale=CFG,
                      init_images=[img], denoising_strength=strength, width=process[0], height=process[1],
                      script_name="Outpainting mk2", script_args=["", pixels, blur, direction, noise_q, variation])
    out = pipe.generate(p)
    assert len(out) == 1
    plan = pipe.plan(p.replace(script_name=None))
    sigmas = sampling.sigmas_for(plan.schedule, steps, pipe.denoiser.schedule, sampler=plan.sampler)
    expected, sizes = reference_mk2(ref, kd, monkeypatch, img, process, pixels, blur, direction, noise_q, variation,
                                    seed, sigmas, strength)
    got = np.asarray(out[0].image)
    assert got.shape == np.asarray(expected).shape
    score = psnr(np.asarray(expected), got, peak=255.0)
    assert score >= 60, f"{case}: PSNR {score:.1f} dB over the passes {sizes}"
    # one seed for every side; "Mask blur" only when both axes have the same blur (both grow here)
    text = out[0].infotext
    assert out[0].seed == seed and f"Seed: {seed}" in text and "Masked content" not in text
    assert f"Mask blur: {blur * 4}," in text


def test_all_four_sides_batch_and_the_infotext(pipe):
    img = textured(48, 48)
    p = Img2imgParams(PROMPT, steps=2, sampler_name="Euler", seed=7, width=64, height=64, init_images=[img],
                      batch_size=2, n_iter=2, denoising_strength=0.8)
    out = outpaint.outpainting_mk2(pipe, p, pixels=16, mask_blur=1)
    # 48 + 2 * 16 -> 128 on each axis, shared 40 / 40: every image 128 x 128
    assert len(out) == 4 and all(o.image.size == (128, 128) for o in out)
    # one seed per run, the same for every side and every batch (the webui's), so the batches repeat
    assert np.array_equal(np.asarray(out[0].image), np.asarray(out[2].image))
    assert not np.array_equal(np.asarray(out[0].image), np.asarray(out[1].image))
    assert all(o.seed == 7 and o.infotext == out[0].infotext for o in out)
    assert "Mask blur: 4" in out[0].infotext and "Denoising strength: 0.8" in out[0].infotext
    # the centre of the init image (beyond the blur's reach) is kept
    centre = np.asarray(out[0].image)[40 + 20:40 + 28, 40 + 20:40 + 28].astype(int)
    assert np.abs(centre - np.asarray(img)[20:28, 20:28]).max() <= 1


@pytest.mark.parametrize("args, message", [
    (["", 16, 4, []], "outpainting directions must be some of left, right, up, down"),
    (["", 0], "outpainting pixels must be a whole number >= 1"),
    (["", 16, -1], "outpainting mask blur must be a whole number >= 0"),
    (["", 16, 4, ["left"], 5.0], "outpainting fall-off exponent must be a number in \\[0, 4\\]"),
    (["", 16, 4, ["left"], 1.0, 2.0], "outpainting color variation must be a number in \\[0, 1\\]"),
    (["", 16, 4, "left"], "outpainting directions must be a list"),
    (["", 16, 4, ["left"], 1.0, 0.05, 9], "script_args for 'Outpainting mk2' must be a list of at most 6 values"),
    (["", 20, 4, ["left", "right"]], "the left pass's width 94 is not a multiple of 8"),
])
def test_bad_arguments_are_one_line(pipe, args, message):
    # 60 + 2 * 20 -> 128: 34 on each side; the left pass inpaints all of 60 + 34 (less than 128)
    p = Img2imgParams(PROMPT, steps=2, width=128, height=64, init_images=[init_image(60, 48)],
                      script_name="Outpainting mk2", script_args=args)
    with pytest.raises(SdrtError, match=message) as e:
        pipe.generate(pipe.plan(p))
    assert "\n" not in str(e.value)


def test_other_scripts_and_txt2img_are_refused(pipe):
    with pytest.raises(SdrtError, match="script_name 'SD upscale': sdrt runs the img2img scripts"):
        pipe.plan(Img2imgParams(PROMPT, init_images=[init_image(64, 48)], script_name="SD upscale"))
    with pytest.raises(SdrtError, match="script_name='Outpainting mk2' is not supported"):
        GenerationParams.from_webui({"prompt": "x", "script_name": "Outpainting mk2"})


def test_poor_mans_outpainting_by_name(pipe):
    img = init_image(64, 48)
    p = Img2imgParams(PROMPT, steps=2, seed=3, sampler_name="Euler", width=64, height=64, init_images=[img])
    by_name = pipe.generate(p.replace(script_name="Poor man's outpainting", script_args=[16, 4, 1, ["left", "up"]]))
    direct = outpaint.poor_mans_outpainting(pipe, p, pixels=16, mask_blur=4, inpainting_fill=1,
                                            direction=["left", "up"])
    assert len(by_name) == 1 and np.array_equal(np.asarray(by_name[0].image), np.asarray(direct.image))


def test_cli_outpainting_mk2(tiny_bundle, pipe, tmp_path):
    src = tmp_path / "init.png"
    textured(48, 40).save(src)
    r = run_sdrt("img2img", "a red circle", "--model", tiny_bundle, "--init-image", src, "--steps", 2, "--seed", 5,
                 "--sampler", "Euler", "-W", 64, "-H", 64, "--script", "Outpainting mk2", "--outpaint-pixels", 16,
                 "--outpaint-directions", "right,down", "--outpaint-mask-blur", 2, "--outpaint-falloff", 0.5,
                 "--outpaint-color-variation", 0.3, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        pixels = np.asarray(im.convert("RGB"))
        text = im.info["parameters"]
    p = Img2imgParams("a red circle", steps=2, seed=5, sampler_name="Euler", width=64, height=64,
                      init_images=[Image.open(src)])
    same = outpaint.outpainting_mk2(pipe, p, 16, 2, ["right", "down"], 0.5, 0.3)[0]
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, np.asarray(same.image))
    assert text == same.infotext
    r = run_sdrt("img2img", "x", "--model", tiny_bundle, "--init-image", src, "--script", "Outpainting mk2",
                 "--outpaint-directions", "left,sideways", "-o", tmp_path / "bad")
    assert r.returncode == 1 and r.stderr.startswith("error: outpainting directions must be some of")
    assert r.stderr.count("\n") == 1
