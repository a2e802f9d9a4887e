"""The PyTorch peers of ``sdrt bench`` and its random-weight workloads.

A peer runs the measurements of sdrt's runtime peer (``sdrt.benchmarks.runtime_peer``: text encoder, guided
UNet step, VAE decode, end to end) with the diffusers / transformers modules built from the same
checkpoint the bundle was exported from:

- attention ``eager``: diffusers' classic ``AttnProcessor`` (explicit matmul + softmax) and
  transformers' ``"eager"``; ``sdpa``: ``AttnProcessor2_0`` and ``"sdpa"``
  (``torch.nn.functional.scaled_dot_product_attention``, diffusers' default);
- precision fp32, or fp16 (CUDA only) with the sampler's arithmetic kept in fp32;
- ``compile``: ``torch.compile`` of the UNet (its first call, the compilation, is the record's
  ``timing.first_s``, outside the median).

The noise is drawn from ``torch.Generator`` on the CPU with the request's seed, as the webui's CPU
RNG and sdrt's runtime draw it, and the sampler is the same function of ``sdrt.runtime.sampling.samplers``.

SD 1.x: the modules of ``sdrt.export.reference.TorchReference``, the conditioning written here.
SD 2.x and SDXL (and its refiner): those of ``FamilyReference`` (``sdrt verify``'s), whose text stage is
the webui's (OpenCLIP's padding; SDXL's two encoders, pooled vector, zeroed empty negative prompt and
size conditioning); SDXL's UNet takes the pooled vector and ``time_ids`` as diffusers'
``added_cond_kwargs``. Its chunkers (token ids and emphasis) are the runtime's, as ``sdrt verify``
shares them: the worker opens the bundle's pipeline with ``memory="low"`` for them (its text
encoders' sessions released after loading).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sdrt.benchmarks.worker import worker_main
from sdrt.export import convert, tiny
from sdrt.export.configs import sd1_configs
from sdrt.export.reference import FamilyReference, TorchReference
from sdrt.export.write import save_checkpoint
from sdrt.runtime import sampling
from sdrt.runtime.bundle import open_bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling import schedules
from sdrt.runtime.text.encoder import make_chunks

RANDOM_CONFIGS = {"sd15-random": sd1_configs, "tiny-random": tiny.scaled_sd1_configs}


def random_workload(name: str, cache: Path, *, seed: int = 0,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a seeded random-weight model: built and saved as an LDM checkpoint
    once per configs, seed and library versions, then exported by sdrt (the bundle cache is keyed
    by the checkpoint's sha256 and sdrt's version)."""
    import diffusers
    import transformers

    from sdrt.models import resolve_model

    configs = RANDOM_CONFIGS[name]()
    # keyed by everything that decides the weights: configs, seed, the initialiser's code, library versions
    key = hashlib.sha256(json.dumps({"configs": configs, "seed": seed, "init": inspect.getsource(tiny),
                                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                                     "transformers": transformers.__version__}, sort_keys=True).encode()).hexdigest()
    checkpoint = Path(cache) / f"{name}-seed{seed}-{key[:12]}.safetensors"
    if not checkpoint.exists():
        if progress:
            progress(f"building {name} (seed {seed})", 0, 1)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        unet, vae, text_encoder = tiny.random_modules(configs, seed=seed)
        ldm = convert.diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(),
                                        "text_encoder": text_encoder.state_dict()}, configs)
        del unet, vae, text_encoder
        save_checkpoint(ldm, configs, checkpoint)
        del ldm
        if progress:
            progress(f"building {name} (seed {seed})", 1, 1)
    return checkpoint, Path(resolve_model(checkpoint, progress=progress))


class TorchPeer:
    """diffusers eager / SDPA / compiled, fp32 / fp16, on the CPU or a CUDA device."""

    def __init__(self, job: dict):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        torch.set_grad_enabled(False)
        threads = int(os.environ.get("SDRT_THREADS") or 0)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        options = job["options"]
        self.device = torch.device(job["device"])
        self.cuda = self.device.type == "cuda"
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[job["precision"]]
        if self.dtype == torch.float16 and not self.cuda:
            raise SdrtError("fp16 runs on CUDA only")
        if self.cuda and not torch.cuda.is_available():
            raise SdrtError("torch sees no CUDA device")
        self.bundle = open_bundle(job["bundle"])
        self.family = self.bundle.architecture != "sd1"  # SD 2.x and SDXL: sdrt verify's FamilyReference
        if self.family:
            from sdrt.runtime.pipeline.txt2img import Pipeline

            ref = FamilyReference.from_checkpoint(job["checkpoint"], Pipeline(self.bundle, memory="low"))
            encoders = ref.text_encoders
        else:
            ref = TorchReference(job["checkpoint"], self.bundle.path / "tokenizer")
            encoders = [ref.text_encoder]
            tok = ref.tokenizer
            self.bos, self.eos, self.comma = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids(",</w>")
        eager = options.get("attention") == "eager"
        for module in (ref.unet, ref.vae):
            module.set_attn_processor(AttnProcessor() if eager else AttnProcessor2_0())
        for module in encoders:
            module.set_attn_implementation("eager" if eager else "sdpa")
        for module in (ref.unet, ref.vae, *encoders):
            module.to(self.device, self.dtype)
        self.ref = ref
        self.unet = torch.compile(ref.unet) if options.get("compile") else ref.unet
        self.sigmas = schedules.model_sigmas(schedules.alphas_cumprod(**self.bundle.scheduler))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def device_memory_start(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def device_memory_peak(self) -> tuple[float | None, str | None]:
        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"

    # conditioning: the prompt and the negative prompt in 77-token chunks, padded to the same count
    def _rows(self, prompt: str) -> list[list[int]]:
        ids = self.ref.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return [c.tokens for c in make_chunks([(ids, 1.0)], bos=self.bos, eos=self.eos, comma=self.comma)]

    def _conditioning(self, p) -> tuple[torch.Tensor, dict | None]:
        """([cond, uncond] states [2, tokens, width], SDXL's {name: [cond, uncond] rows} or None)."""
        if self.family:
            return self._family_conditioning(p)
        rows = [self._rows(p.prompt), self._rows(p.negative_prompt)]
        n = max(len(r) for r in rows)
        empty = [self.bos] + [self.eos] * 76
        ids = torch.tensor([r + [empty] * (n - len(r)) for r in rows], device=self.device).reshape(-1, 77)
        z = self.ref.text_encoder(ids).last_hidden_state
        return z.reshape(2, n * 77, z.shape[-1]), None  # [cond, uncond]

    def _family_conditioning(self, p) -> tuple[torch.Tensor, dict | None]:
        """The webui's ``get_learned_conditioning`` of the prompt and the negative prompt, the shorter
        padded with the empty prompt's states (its "pad prompt/negative prompt to be same length");
        SDXL's added conditioning beside them."""
        w, h = p.width, p.height
        sides = [self.ref.learned([p.prompt], w, h)[0], self.ref.learned([p.negative_prompt], w, h, negative=True)[0]]
        n = max(c["crossattn"].shape[0] for c in sides)
        if any(c["crossattn"].shape[0] != n for c in sides):
            empty = self.ref.learned([""], w, h)[0]["crossattn"]
            for c in sides:
                c["crossattn"] = torch.cat([c["crossattn"], empty.repeat((n - c["crossattn"].shape[0]) // 77, 1)])
        context = torch.stack([c["crossattn"] for c in sides])
        if "text_embeds" not in sides[0]:
            return context, None
        added = {name: torch.stack([c[name] for c in sides]).to(self.device) for name in ("text_embeds", "time_ids")}
        return context, added

    def _denoise(self, x: torch.Tensor, sigma: float, context: torch.Tensor, cfg_scale: float,
                 added: dict | None = None) -> torch.Tensor:
        """CFG over one UNet run; ``context`` and ``added`` (SDXL's ``added_cond_kwargs``) hold the
        cond row, then the uncond row."""
        n = x.shape[0]
        both = cfg_scale != 1.0
        x_in = torch.cat([x, x]) if both else x

        def rows(v):
            return v.repeat_interleave(n, 0) if both else v[:1].expand(n, *v.shape[1:])

        ctx = rows(context)
        kwargs = {}
        if added is not None:
            kwargs["added_cond_kwargs"] = {name: rows(v).to(self.device, self.dtype) for name, v in added.items()}
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        t = self.ref.sigma_to_t(sigma).to(self.device).expand(x_in.shape[0])
        out = self.unet((x_in * c_in).to(self.dtype), t, ctx, **kwargs).sample.float()
        if self.ref.prediction_type == "epsilon":
            den = x_in + out * -sigma
        else:
            den = out * (-sigma / (sigma**2 + 1.0) ** 0.5) + x_in * (1.0 / (sigma**2 + 1.0))
        return den[n:] + (den[:n] - den[n:]) * cfg_scale if both else den

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.ref.vae.decode((latents / self.ref.scale).to(self.dtype)).sample.float()
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)

    # the measurements
    def text_encoder(self, p) -> np.ndarray:
        """[cond, uncond] states; SDXL: raveled, then the pooled vectors raveled (the runtime peer's layout)."""
        context, added = self._conditioning(p)
        states = context.float().cpu().numpy()
        if added is None:
            return states
        return np.concatenate([states.ravel(), added["text_embeds"].float().cpu().numpy().ravel()])

    def unet_step(self, x, sigma, cond, uncond, cfg_scale, added=None) -> np.ndarray:
        context = torch.from_numpy(np.concatenate([cond, uncond])).to(self.device, self.dtype)
        if added is not None:  # SDXL: the same random pooled vectors and size conditioning, cond then uncond
            added = {name: torch.from_numpy(np.stack([added["cond"][name], added["uncond"][name]]))
                     for name in added["cond"]}
        return self._denoise(torch.from_numpy(x).to(self.device), sigma, context, cfg_scale, added).cpu().numpy()

    def vae_decode(self, latents) -> np.ndarray:
        return self._decode(torch.from_numpy(latents).to(self.device)).cpu().numpy()

    def generate(self, p) -> tuple[np.ndarray, float]:
        info, schedule = sampling.resolve(p.sampler_name, p.scheduler)
        if info.family != "sigma" or info.fixed_schedule or info.brownian:
            raise SdrtError(f"the torch peers run the k-diffusion samplers over a sigma schedule; {info.name} is not one")
        sigmas = sampling.sigmas_for(schedule, p.steps, self.sigmas, sampler=info, arch=self.bundle.architecture)
        f = self.bundle.vae_scale_factor
        shape = (self.bundle.latent_channels, p.height // f, p.width // f)
        context, added = self._conditioning(p)
        context = context.to(self.dtype)
        gen = torch.Generator().manual_seed(p.seed)

        def noise(sigma, sigma_next):
            return torch.randn(shape, generator=gen)[None].to(self.device)

        t0 = time.perf_counter()
        x = noise(None, None) * float(sigmas[0])
        latents = info.fn(lambda x, s: self._denoise(x, s, context, p.cfg_scale, added), x, sigmas, noise=noise,
                          **sampling.sampler_options(info))
        self.sync()
        sampling_s = time.perf_counter() - t0
        return self._decode(latents)[0].cpu().numpy(), sampling_s


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    try:
        sys.exit(worker_main(TorchPeer))
    except KeyboardInterrupt:
        sys.exit(130)
