"""End to end, every sampler: the runtime's image against the PyTorch reference, 20 steps, tiny model.

The reference is independent of the runtime's sampler code: k-diffusion 0.1.1's sampler functions
(the webui's Restart assembled from its Heun sampler), diffusers' DDIM/PNDM/UniPC schedulers for
the timestep samplers, diffusers' UNet and VAE from the same checkpoint, torch generators per image
(k-diffusion's ``torch.randn_like`` fed from them as the webui's TorchHijack does) and torchsde's
Brownian tree for the SDE samplers. Shared with the runtime: the sigma schedule values (checked
against k-diffusion's schedules in test_schedules.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.export.reference import TorchReference, psnr
from sdrt.runtime import sampling
from sdrt.runtime.pipeline.txt2img import GenerationParams, to_uint8
from sdrt.runtime.sampling import schedules

from test_samplers import (
    TorchShim,
    diffusers_ddim,
    diffusers_plms,
    diffusers_unipc,
    load_k_diffusion_sampling,
    webui_ddim_cfgpp,
    webui_restart_reference,
)

torch = pytest.importorskip("torch")

PROMPT = "a red circle on a blue background"
SEED, CFG, STEPS = 21, 5.0, 20

KD_FUNCS = {
    "DPM++ 2M": "sample_dpmpp_2m", "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 2S a": "sample_dpmpp_2s_ancestral",
    "DPM++ 3M SDE": "sample_dpmpp_3m_sde", "Euler a": "sample_euler_ancestral", "Euler": "sample_euler",
    "LMS": "sample_lms", "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
}


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


@pytest.fixture(scope="module")
def ref(tiny_checkpoint, tiny_bundle):
    torch.set_grad_enabled(False)
    return TorchReference(tiny_checkpoint, tiny_bundle / "tokenizer")


class Generators:
    """The webui's per-image torch generator: first the latent noise, then (ENSD) reseeded."""

    def __init__(self, shape, seed, ensd=0):
        self.shape, self.seed, self.ensd = shape, seed, ensd
        self.gen = torch.Generator().manual_seed(seed)
        self.first = torch.randn(shape, generator=self.gen)[None]
        if ensd:
            self.gen = torch.Generator().manual_seed(seed + ensd)

    def next(self, *args):
        return torch.randn(self.shape, generator=self.gen)[None]


def lcm_reference(ref, x, sigmas, cond, uncond, noise):
    """The webui's LCM sampler and LCM denoiser in torch (its 50 timesteps, boundary scalings), on diffusers' UNet."""
    log_sigmas = ref.sigmas[999 - 20 * torch.arange(50).flip(0)].double().log()

    def denoise(x, sigma):
        t = int((torch.tensor(sigma).log() - log_sigmas).abs().argmin()) * 20 + 19
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        both = ref.unet(torch.cat([x, x]) * c_in, torch.tensor([t, t]), torch.cat([cond, uncond])).sample
        eps = both[1:] + (both[:1] - both[1:]) * CFG
        s = t * 10.0
        return (x - sigma * eps) * (s / (s**2 + 0.25) ** 0.5) + x * (0.25 / (s**2 + 0.25))

    for i in range(len(sigmas) - 1):
        x = denoise(x, float(sigmas[i]))
        if sigmas[i + 1] > 0:
            x = x + float(sigmas[i + 1]) * noise()
    return x


def reference_latents(kd, ref, info, sigmas, gens, cond, uncond, monkeypatch):
    def model(x, sigma, **kwargs):
        return ref.denoise(x, float(sigma.reshape(-1)[0]), cond, uncond, CFG)

    def eps(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(1).expand(2)
        out = ref.unet(torch.cat([x, x]), t, torch.cat([cond, uncond])).sample
        return out[1:] + (out[:1] - out[1:]) * CFG

    options = dict(info.options)
    if info.family == "timesteps":
        x = gens.first.clone()
        if info.name == "DDIM":
            return diffusers_ddim(eps, x, STEPS)
        if info.name == "PLMS":
            return diffusers_plms(eps, x, STEPS)
        if info.name == "DDIM CFG++":
            def eps_parts(x, t):
                t = torch.as_tensor(t, dtype=torch.float32).reshape(1).expand(2)
                out = ref.unet(torch.cat([x, x]), t, torch.cat([cond, uncond])).sample
                return [(out[:1], 1.0)], out[1:]

            return webui_ddim_cfgpp(eps_parts, x, sampling.timesteps_for(info, STEPS), schedules.alphas_cumprod(), CFG)
        return diffusers_unipc(eps, x, STEPS)
    t_sigmas = torch.from_numpy(sigmas.astype(np.float32))  # float32 like the webui's (the values are)
    x = gens.first * float(sigmas[0])
    if info.name == "LCM":
        return lcm_reference(ref, x, sigmas, cond, uncond, gens.next)
    if info.name == "Restart":
        # (k-diffusion's Heun draws churn noise every step; the webui's restart Heun does not)
        return webui_restart_reference(kd, model, x, t_sigmas, gens.next)
    monkeypatch.setattr(kd, "torch", TorchShim(type("S", (), {"torch_next": gens.next})()))
    if info.name in ("DPM fast", "DPM adaptive"):
        smin, smax = float(ref.sigmas[0]), float(ref.sigmas[-1])
        if info.name == "DPM fast":
            return kd.sample_dpm_fast(model, x, smin, smax, STEPS, eta=1.0, disable=True)
        return kd.sample_dpm_adaptive(model, x, smin, smax, eta=1.0, disable=True)
    kwargs = {k: v for k, v in options.items() if k in ("eta", "s_noise", "solver_type")}
    if info.brownian:
        kwargs["noise_sampler"] = kd.BrownianTreeNoiseSampler(x, t_sigmas[t_sigmas > 0].min(), t_sigmas.max(),
                                                              seed=[SEED])
    return getattr(kd, KD_FUNCS[info.name])(model, x, t_sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_sampler_matches_torch_reference(tiny_pipeline, kd, ref, monkeypatch, name):
    pipe = tiny_pipeline
    p = GenerationParams(PROMPT, "blurry", steps=STEPS, sampler_name=name, seed=SEED, cfg_scale=CFG, ensd=31337)
    plan = pipe.plan(p)
    info, schedule, width, height = plan.sampler, plan.schedule, plan.width, plan.height
    f = pipe.bundle.vae_scale_factor
    shape = (pipe.bundle.latent_channels, height // f, width // f)

    cond, uncond = pipe.conditioning(p)
    lat_rt = pipe.sample(p, [SEED], cond, uncond)
    image_rt = to_uint8(pipe.decode_float(lat_rt)[0])

    r_cond, r_uncond = ref.encode(PROMPT, 1, 1), ref.encode("blurry", 1, 1)
    inner = pipe.denoiser.schedule
    sigmas = None
    if info.family != "timesteps":
        from sdrt.runtime.sampling.denoiser import LCMDenoiser

        inner = LCMDenoiser(pipe.denoiser).schedule if info.family == "lcm" else inner
        sigmas = sampling.sigmas_for(schedule, STEPS, inner, sampler=info, arch=pipe.bundle.architecture)
    gens = Generators(shape, SEED, p.ensd)
    lat_ref = reference_latents(kd, ref, info, sigmas, gens, r_cond, r_uncond, monkeypatch)
    image_ref = to_uint8(ref.decode(lat_ref.float())[0])
    score = psnr(image_ref, image_rt, peak=255.0)
    assert score >= 50, f"{name}: PSNR {score:.1f} dB"
