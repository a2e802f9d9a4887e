"""Inpainting checkpoints (a 9-channel UNet: the latents, the mask and the masked image's latents):
exported from a single file, and sampled with the webui's image conditioning, against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdrt.export.reference import TorchReference
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline import GenerationParams, Img2imgParams
from sdrt.runtime.pipeline.img2img import Img2imgPipeline
from sdrt.runtime.pipeline.txt2img import to_uint8
from test_img2img import init_image

PROMPT, SEED, STEPS = "a red circle on a blue background", 11, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_configs):
    from sdrt.export import convert
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import export_checkpoint, save_checkpoint

    configs = {**tiny_configs, "unet": {**tiny_configs["unet"], "in_channels": 9}}
    unet, vae, te = random_modules(configs, seed=3)
    d = tmp_path_factory.mktemp("inpaint_model")
    ldm = convert.diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(),
                                    "text_encoder": te.state_dict()}, configs)
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    ckpt = save_checkpoint(ldm, configs, d / "tiny-inpainting.safetensors")
    bundle = export_checkpoint(ckpt, d / "bundle")
    torch.set_grad_enabled(False)
    return Img2imgPipeline(bundle), TorchReference(ckpt, bundle / "tokenizer")


def _euler(ref, x, sigmas, cond, uncond, image_cond):
    for i in range(len(sigmas) - 1):
        d = (x - ref.denoise(x, float(sigmas[i]), cond, uncond, 7.0, image_cond)) / float(sigmas[i])
        x = x + d * float(sigmas[i + 1] - sigmas[i])  # Euler method
    return x


def test_txt2img_conditions_on_an_all_masked_grey_image(model):
    """The webui's txt2img_image_conditioning: a mask of ones and the latents of a mid-grey image."""
    pipe, ref = model
    assert pipe.denoiser.image_channels == 5
    p = GenerationParams(PROMPT, negative_prompt="blurry", sampler_name="Euler", steps=STEPS, seed=SEED, width=64,
                         height=48)
    plan = pipe.plan(p)
    (got,) = pipe.generate(plan)
    from sdrt.runtime import sampling

    sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=plan.sampler,
                                 arch=pipe.bundle.architecture)
    h, w = plan.latent_shape[1:]
    image_cond = torch.cat([torch.ones(1, 1, h, w), ref.encode_image(torch.zeros(1, 3, 48, 64))], dim=1)
    x = torch.randn(plan.latent_shape, generator=torch.Generator().manual_seed(SEED))[None] * float(sigmas[0])
    x = _euler(ref, x, sigmas, ref.encode(PROMPT, 1, 1), ref.encode("blurry", 1, 1), image_cond)
    assert psnr(to_uint8(ref.decode(x)[0]), np.asarray(got.image), 255.0) >= 60


def test_img2img_conditioning_is_the_masked_image(model):
    """The webui's inpainting_image_conditioning: the rounded mask brought to the latent size by
    nearest sampling, and the source with the masked part set to 0 encoded."""
    pipe, ref = model
    image = init_image(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(200, (8, 16, 40, 56))  # rounds to 1
    mask.paste(100, (40, 0, 64, 8))  # rounds to 0
    p = Img2imgParams(PROMPT, init_images=[image], mask=mask, mask_blur=0, inpaint_full_res=False,
                      inpainting_fill=1, sampler_name="Euler", steps=STEPS, seed=SEED, denoising_strength=0.8)
    plan = pipe.plan(p)
    got = pipe.image_conditioning(plan, 2, plan.init_images, plan.inpaint.image_mask)
    m = torch.round(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))[None, None]
    src = torch.from_numpy(np.asarray(plan.init_images[0], dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    want = torch.cat([torch.nn.functional.interpolate(m, size=(8, 8)), ref.encode_image(src * (1 - m))], dim=1)
    assert got.shape == (2, 5, 8, 8)
    np.testing.assert_allclose(got[1], want[0].numpy(), atol=1e-5)
    # the whole request runs, and the kept part is the init image (the webui pastes it back)
    (out,) = pipe.img2img(PROMPT, init_images=[image], mask=mask, mask_blur=0, inpaint_full_res=False,
                          inpainting_fill=1, sampler_name="Euler", steps=STEPS, seed=SEED, denoising_strength=0.8)
    kept = np.asarray(mask) == 0  # (partly masked pixels are blended, as the webui's overlay)
    assert np.array_equal(np.asarray(out.image)[kept], np.asarray(image)[kept])


def test_conditioning_mask_weight_lerps_the_source(model):
    """The webui's "inpainting conditioning mask strength": lerp(source, source * (1 - mask), w) is
    encoded (with or without a mask), and the infotext carries ``Conditional mask weight``."""
    pipe, ref = model
    image = init_image(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 16, 40, 56))
    src = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    for m_image, m in ((mask, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]),
                       (None, torch.ones(1, 1, 64, 64))):
        masking = {"mask": m_image, "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1} if m_image else {}
        p = Img2imgParams(PROMPT, init_images=[image], sampler_name="Euler", steps=STEPS, seed=SEED,
                          denoising_strength=0.8, inpainting_mask_weight=0.25, **masking)
        plan = pipe.plan(p)
        got = pipe.image_conditioning(plan, 1, plan.init_images, plan.inpaint.image_mask if m_image else None)
        want = ref.encode_image(torch.lerp(src, src * (1 - m), 0.25))
        np.testing.assert_allclose(got[0, 1:], want[0].numpy(), atol=1e-5)
        assert not np.allclose(got[0, 1:], pipe.image_conditioning(pipe.plan(
            Img2imgParams(PROMPT, init_images=[image], sampler_name="Euler", steps=STEPS, seed=SEED,
                          denoising_strength=0.8, **masking)), 1, plan.init_images,
            plan.inpaint.image_mask if m_image else None)[0, 1:], atol=1e-3)
    (out,) = pipe.img2img(PROMPT, init_images=[image], mask=mask, mask_blur=0, inpaint_full_res=False,
                          inpainting_fill=1, sampler_name="Euler", steps=STEPS, seed=SEED, denoising_strength=0.8,
                          inpainting_mask_weight=0.25)
    assert "Denoising strength: 0.8, Conditional mask weight: 0.25," in out.infotext
    with pytest.raises(SdrtError, match="inpainting_mask_weight must be a number in"):
        pipe.plan(Img2imgParams(PROMPT, init_images=[image], inpainting_mask_weight=1.5))
