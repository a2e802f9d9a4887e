"""The PyTorch reference: diffusers/transformers modules with the same weights, noise and sampler.

``verify_bundle`` runs it beside the runtime and reports max-abs and PSNR per stage. What is
shared and what is independent:

- independent: the modules (diffusers UNet and VAE, transformers' own ``CLIPTextModel.forward``
  from token ids, not sdrt's exported text graph), the tokenizer (transformers' ``CLIPTokenizer``
  on the bundle's vocabulary), the noise (``torch.Generator`` per image, re-seeded for ENSD as the
  webui does), the denoiser scalings, sigma -> t mapping and CFG (written here in torch);
- shared: the sampler functions of ``sdrt.runtime.sampling.samplers`` (pure arithmetic, run here on torch
  tensors) and the 77-token chunk layout; both are checked against k-diffusion and the webui's
  tables by their own tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdrt.export import convert
from sdrt.export.write import load_checkpoint
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline, to_uint8
from sdrt.runtime.sampling import schedules
from sdrt.runtime.sampling.denoiser import CFGDenoiser
from sdrt.runtime.sampling.noise import ImageRNG
from sdrt.runtime.text.encoder import make_chunks


def _stage(ref, out, peak=None) -> dict:
    ref, out = np.asarray(ref), np.asarray(out)
    return {"max_abs": float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))),
            "psnr": psnr(ref, out, peak)}


class TorchReference:
    """txt2img in torch with the modules built from a checkpoint."""

    def __init__(self, checkpoint: str | Path, tokenizer_dir: Path):
        from transformers import CLIPTokenizer

        configs, components, _ = load_checkpoint(checkpoint)
        self.unet, self.vae, self.text_encoder = convert.build_modules(configs, components)
        self.tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
        sched = configs["scheduler"]
        ac = torch.from_numpy(schedules.alphas_cumprod(sched["num_train_timesteps"], sched["beta_start"],
                                                       sched["beta_end"], sched["beta_schedule"]))
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.prediction_type = sched.get("prediction_type", "epsilon")
        self.scale = configs["vae"].get("scaling_factor", 0.18215)
        self.vae_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        self.latent_channels = configs["vae"]["latent_channels"]

    @torch.no_grad()
    def encode(self, prompt: str, clip_skip: int, chunks: int) -> torch.Tensor:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tok = self.tokenizer
        comma = tok.convert_tokens_to_ids(",</w>")
        rows = [c.tokens for c in make_chunks([(ids, 1.0)], bos=tok.bos_token_id, eos=tok.eos_token_id, comma=comma)]
        rows += [[tok.bos_token_id] + [tok.eos_token_id] * 76] * (chunks - len(rows))
        out = self.text_encoder(torch.tensor(rows), output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers < 5 nests it
            z = text_model.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
        return z.reshape(1, -1, z.shape[-1])

    def sigma_to_t(self, sigma: float) -> torch.Tensor:
        log_sigma = torch.tensor(sigma, dtype=torch.float64).log()
        ls = self.log_sigmas.double()
        dists = log_sigma - ls
        low = dists.ge(0).cumsum(0).argmax().clamp(max=len(ls) - 2)
        high = low + 1
        w = ((ls[low] - log_sigma) / (ls[low] - ls[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).float()

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor,
                cfg_scale: float) -> torch.Tensor:
        n = x.shape[0]
        both = cfg_scale != 1.0
        x_in = torch.cat([x, x]) if both else x
        ctx = torch.cat([cond.expand(n, -1, -1), uncond.expand(n, -1, -1)]) if both else cond.expand(n, -1, -1)
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        t = self.sigma_to_t(sigma).expand(x_in.shape[0])
        out = self.unet(x_in * c_in, t, ctx).sample
        if self.prediction_type == "epsilon":
            den = x_in + out * -sigma
        else:
            den = out * (-sigma / (sigma**2 + 1.0) ** 0.5) + x_in * (1.0 / (sigma**2 + 1.0))
        if not both:
            return den
        return den[n:] + (den[:n] - den[n:]) * cfg_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents / self.scale).sample
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).numpy()


def verify_bundle(bundle: str | Path, checkpoint: str | Path, p: GenerationParams, *, device: str = "cpu",
                  precision: str = "fp32") -> dict:
    """Run the runtime and the torch reference on the same request; max-abs and PSNR per stage.

    Stages: ``noise`` (initial latent noise), ``text_encoder`` (cond and uncond conditioning),
    ``unet`` (one guided denoise of the same input at the first sigma), ``vae_decoder`` (decoding
    the reference's final latents, pixels in [0, 1]), ``latents`` (end of sampling) and ``image``
    (the 8-bit outputs, PSNR with peak 255). The runtime runs the bundle's graphs for ``device``
    at ``precision`` (``auto``: its default there); the reference stays fp32 on the CPU.
    """
    torch.set_grad_enabled(False)
    pipe = Pipeline(bundle, device=device, precision=precision)
    plan = pipe.plan(p)
    info, schedule, width, height = plan.sampler, plan.schedule, plan.width, plan.height
    ref = TorchReference(checkpoint, pipe.bundle.path / "tokenizer")
    seed = max(p.seed, 0)
    f = pipe.bundle.vae_scale_factor
    shape = (pipe.bundle.latent_channels, height // f, width // f)
    if info.family != "sigma" or info.brownian or info.fixed_schedule:
        # The shared-sampler reference runs sigma-space samplers with generator noise; the others are
        # checked against k-diffusion / diffusers / torchsde by tests/test_sampler_e2e.py
        raise SdrtError(f"verify does not support sampler {info.name!r} yet; use one of: "
                        + ", ".join(n for n, i in sampling.SAMPLERS.items()
                                    if i.family == "sigma" and not i.brownian and not i.fixed_schedule))
    sigmas = sampling.sigmas_for(schedule, p.steps, pipe.denoiser.schedule, sampler=info,
                                 arch=pipe.bundle.architecture)

    # Runtime: the pipeline's own stages
    cond, uncond = pipe.conditioning(plan)
    lat_rt = pipe.sample(plan, [seed], cond, uncond)
    image_rt = to_uint8(pipe.decode_float(lat_rt)[0])

    # Reference: torch modules, torch generators (re-seeded for ENSD after the first draw, as the webui)
    chunks = cond.tokens // 77
    r_cond, r_uncond = ref.encode(p.prompt, p.clip_skip, chunks), ref.encode(p.negative_prompt, p.clip_skip, chunks)
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=gen)[None]
    if p.ensd:
        gen = torch.Generator().manual_seed(seed + p.ensd)

    def r_denoise(x, sigma):
        return ref.denoise(x, sigma, r_cond, r_uncond, p.cfg_scale)

    x0 = first * float(sigmas[0])
    lat_ref = info.fn(r_denoise, x0, sigmas, noise=lambda s, sn: torch.randn(shape, generator=gen)[None],
                      **info.options)
    image_ref_f = ref.decode(lat_ref)

    # Single stages on identical inputs
    noise_rt = ImageRNG(shape, [seed], source=p.rng, ensd=p.ensd).next()
    unet_rt = CFGDenoiser(pipe.denoiser, cond, uncond, p.cfg_scale)(x0.numpy(), float(sigmas[0]))
    vae_rt = pipe.decode_float(lat_ref.numpy())
    return {
        "request": {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps,
                    "sampler": info.name, "schedule": schedule, "cfg_scale": p.cfg_scale, "seed": seed,
                    "size": f"{width}x{height}", "rng": p.rng, "clip_skip": p.clip_skip,
                    "device": device, "precision": pipe.precision},
        "stages": {
            "noise": _stage(first.numpy(), noise_rt),
            "text_encoder": _stage(torch.cat([r_cond, r_uncond]).numpy(),
                                   np.concatenate([cond.stacked(0), uncond.at(0)[None]])),
            "unet": _stage(r_denoise(x0, float(sigmas[0])).numpy(), unet_rt),
            "vae_decoder": _stage(image_ref_f, vae_rt, peak=1.0),
            "latents": _stage(lat_ref.numpy(), lat_rt),
            "image": _stage(to_uint8(image_ref_f[0]), image_rt, peak=255.0),
        },
    }
