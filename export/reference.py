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
                cfg_scale: float, image_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The guided denoiser; ``image_cond``: an inpainting UNet's conditioning [n, 5, h, w],
        concatenated to the scaled latents (the webui's ``c_concat``)."""
        n = x.shape[0]
        both = cfg_scale != 1.0
        x_in = torch.cat([x, x]) if both else x
        ctx = torch.cat([cond.expand(n, -1, -1), uncond.expand(n, -1, -1)]) if both else cond.expand(n, -1, -1)
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        t = self.sigma_to_t(sigma).expand(x_in.shape[0])
        unet_in = x_in * c_in
        if image_cond is not None:
            unet_in = torch.cat([unet_in, torch.cat([image_cond, image_cond]) if both else image_cond], dim=1)
        out = self.unet(unet_in, t, ctx).sample
        if self.prediction_type == "epsilon":
            den = x_in + out * -sigma
        else:
            den = out * (-sigma / (sigma**2 + 1.0) ** 0.5) + x_in * (1.0 / (sigma**2 + 1.0))
        if not both:
            return den
        return den[n:] + (den[:n] - den[n:]) * cfg_scale

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [n, 3, H, W] in [-1, 1] -> the posterior's mean times the latent scale factor."""
        return self.vae.encode(pixels).latent_dist.mean * self.scale

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
    at ``precision`` (``auto``: its default there); the reference stays fp32 on the CPU. SD 2.x and
    SDXL bundles are checked against :class:`FamilyReference` (SDXL's ``text_encoder`` stage
    includes the pooled vectors).
    """
    torch.set_grad_enabled(False)
    pipe = Pipeline(bundle, device=device, precision=precision)
    plan = pipe.plan(p)
    info, schedule, width, height = plan.sampler, plan.schedule, plan.width, plan.height
    family = pipe.bundle.architecture != "sd1"
    if family:
        ref = FamilyReference.from_checkpoint(checkpoint, pipe)
    else:
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
    if family:
        parts, r_uncond = ref.conditioning(p.prompt, p.negative_prompt, plan.condition_steps, width, height)
        r_denoise = ref.denoiser(parts, r_uncond, p.cfg_scale, width, height, p.pad_conds)
        # The first step's states of each AND part and of the negative prompt, then SDXL's pooled vectors
        firsts = [ref.pick(s, 0) for s, _ in parts] + [ref.pick(r_uncond, 0)]
        text_ref = [c["crossattn"].numpy() for c in firsts] + [c["text_embeds"].numpy() for c in firsts
                                                               if "text_embeds" in c]
        text_rt = [c[:len(r)] for (c, _), r in zip(cond.at(0), text_ref)] + [uncond.at(0)]
        text_rt += [a["text_embeds"] for a in cond.added_at(0) + [uncond.added_at(0)] if a is not None]
        text_ref, text_rt = (np.concatenate([a.ravel() for a in t]) for t in (text_ref, text_rt))
    else:
        chunks = cond.tokens // 77
        r_cond = ref.encode(p.prompt, p.clip_skip, chunks)
        r_uncond = ref.encode(p.negative_prompt, p.clip_skip, chunks)
        text_ref = torch.cat([r_cond, r_uncond]).numpy()
        text_rt = np.concatenate([cond.stacked(0), uncond.at(0)[None]])

        def r_denoise(x, sigma):
            return ref.denoise(x, sigma, r_cond, r_uncond, p.cfg_scale)

    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=gen)[None]
    if p.ensd:
        gen = torch.Generator().manual_seed(seed + p.ensd)

    x0 = first * float(sigmas[0])
    lat_ref = info.fn(r_denoise, x0, sigmas, noise=lambda s, sn: torch.randn(shape, generator=gen)[None],
                      **info.options)
    image_ref_f = ref.decode(lat_ref)

    # Single stages on identical inputs
    noise_rt = ImageRNG(shape, [seed], source=p.rng, ensd=p.ensd).next()
    unet_rt = CFGDenoiser(pipe.denoiser, cond, uncond, p.cfg_scale)(x0.numpy(), float(sigmas[0]))
    if family:  # its denoiser counts its calls (prompt editing): a fresh one for the first step
        r_denoise = ref.denoiser(parts, r_uncond, p.cfg_scale, width, height, p.pad_conds)
    vae_rt = pipe.decode_float(lat_ref.numpy())
    return {
        "request": {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps,
                    "sampler": info.name, "schedule": schedule, "cfg_scale": p.cfg_scale, "seed": seed,
                    "size": f"{width}x{height}", "rng": p.rng, "clip_skip": p.clip_skip,
                    "device": device, "precision": pipe.precision},
        "stages": {
            "noise": _stage(first.numpy(), noise_rt),
            "text_encoder": _stage(text_ref, text_rt),
            "unet": _stage(r_denoise(x0, float(sigmas[0])).numpy(), unet_rt),
            "vae_decoder": _stage(image_ref_f, vae_rt, peak=1.0),
            "latents": _stage(lat_ref.numpy(), lat_rt),
            "image": _stage(to_uint8(image_ref_f[0]), image_rt, peak=255.0),
        },
    }


class FamilyReference:
    """The webui's txt2img conditioning and guidance for SD 2.x and SDXL in torch, on transformers
    and diffusers modules (``text_encoders`` in conditioning order: SD 2.x's OpenCLIP-H, SDXL's
    CLIP ViT-L ``CLIPTextModel`` and OpenCLIP bigG ``CLIPTextModelWithProjection``).

    Written here after the webui's embedders and sgm's ``GeneralConditioner``, independently of
    the runtime: OpenCLIP's padding (id 0 after the first end token, ``process_tokens``), the
    state each embedder reads (SD 2.x: the last state of the 23-layer tower; SDXL: transformers'
    ``hidden_states[-2]``), the pooled vector (sgm ``FrozenOpenCLIPEmbedder2.pool``: the final
    normed state at ``argmax`` of the ids times the projection, first chunk, no emphasis),
    emphasis and its mean restoration per encoder and chunk (``EmphasisOriginal``), the
    concatenation, the zeroed all-empty negative prompt and the size conditioning
    (``sd_models_xl.get_learned_conditioning``), ``stack_conds`` / padding with the empty prompt
    and CFG over the UNet's added conditioning (``sd_samplers_cfg_denoiser``), the k-diffusion
    scalings. Shared with the runtime: ``chunkers`` (text -> sdrt's chunks: token ids,
    multipliers, embedding positions) and the prompt parsers. ``vectors``: {embedding name:
    tensor, or SDXL's {"clip_l": tensor, "clip_g": tensor}}."""

    END = 49407  # CLIP's end of text

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, pipe: Pipeline) -> FamilyReference:
        """The modules of ``checkpoint`` (a single file or a diffusers folder), chunked as ``pipe``'s
        text encoders chunk (``pipe``: the runtime pipeline of its bundle)."""
        configs, components, _ = load_checkpoint(checkpoint)
        unet, vae, text_encoder, *rest = convert.build_modules(configs, components)
        modules = [m for m in (text_encoder, *rest) if m is not None]
        encoders = getattr(pipe.text_encoder, "encoders", [pipe.text_encoder])
        return cls(pipe.bundle.architecture, unet, vae, modules, [e.chunks for e in encoders], configs["scheduler"],
                   configs["vae"].get("scaling_factor", pipe.bundle.latent_scale_factor))

    def __init__(self, architecture: str, unet, vae, text_encoders: list, chunkers: list, scheduler: dict,
                 latent_scale_factor: float, vectors: dict | None = None, crop: tuple[int, int] = (0, 0)):
        self.architecture = architecture
        self.sdxl = architecture in ("sdxl", "sdxl-refiner")
        self.unet, self.vae, self.text_encoders, self.chunkers = unet, vae, text_encoders, chunkers
        self.scale = latent_scale_factor
        self.crop = crop
        self.prediction_type = scheduler.get("prediction_type", "epsilon")
        ac = torch.from_numpy(schedules.alphas_cumprod(scheduler["num_train_timesteps"], scheduler["beta_start"],
                                                       scheduler["beta_end"], scheduler["beta_schedule"]))
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log().double()
        self.vectors = vectors or {}
        keys = ["clip_g"] if architecture == "sdxl-refiner" else ["clip_l", "clip_g"]
        self.keys = keys if self.sdxl else [None]
        self.pending = None
        for k, module in enumerate(text_encoders):
            text_model = getattr(module, "text_model", module)
            text_model.embeddings.token_embedding.register_forward_hook(
                lambda m, i, out, key=self.keys[k]: self._fix(out, key))

    def _fix(self, output, key):
        """sd_hijack.EmbeddingsWithFixes: the embedding vectors put over the token embeddings."""
        if not self.pending:
            return output
        output = output.clone()
        for row, fixes in enumerate(self.pending):
            for offset, embedding in fixes:
                v = self.vectors[embedding.name]
                v = v[key] if isinstance(v, dict) else v
                output[row, offset + 1:offset + 1 + len(v)] = v
        return output

    @torch.no_grad()
    def forward(self, k: int, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedder ``k`` over a batch of texts (``FrozenCLIPEmbedderWithCustomWordsBase.forward``):
        (z [B, 77 * chunks, width], pooled [B, projection] or None)."""
        openclip = not self.sdxl or k == len(self.text_encoders) - 1
        module = self.text_encoders[k]
        batch = [self.chunkers[k](t) for t in texts]
        empty = [self.END - 1] + [self.END] * 76
        zs, pooled = [], None
        device = next(module.parameters()).device  # the token ids go where the module is
        for i in range(max(len(c) for c in batch)):
            rows = [c[i].tokens if i < len(c) else empty for c in batch]
            mult = torch.tensor([c[i].multipliers if i < len(c) else [1.0] * 77 for c in batch], device=device)
            tokens = torch.tensor(rows, device=device)
            if openclip:
                for b, row in enumerate(rows):
                    tokens[b, row.index(self.END) + 1:] = 0
            self.pending = [c[i].fixes if i < len(c) else [] for c in batch]
            out = module(tokens, output_hidden_states=True)
            self.pending = None
            z = out.hidden_states[-2] if self.sdxl else out.last_hidden_state
            if i == 0 and hasattr(module, "text_projection"):
                last = out.last_hidden_state
                at_end = last[torch.arange(len(rows), device=device), tokens.argmax(dim=-1)]
                pooled = at_end @ module.text_projection.weight.T
            original_mean = z.mean()
            z = z * mult.reshape(mult.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
            zs.append(z)
        return torch.hstack(zs), pooled

    def time_ids(self, width: int, height: int, negative: bool) -> torch.Tensor:
        if self.architecture == "sdxl-refiner":
            return torch.tensor([height, width, *self.crop, 2.5 if negative else 6.0])
        return torch.tensor([height, width, *self.crop, height, width], dtype=torch.float32)

    def learned(self, texts: list[str], width: int, height: int, negative: bool = False) -> list[dict]:
        """``get_learned_conditioning``: one dict per text (crossattn, and SDXL's vector parts)."""
        if not self.sdxl:
            z, _ = self.forward(0, texts)
            return [{"crossattn": z[i]} for i in range(len(texts))]
        outs = [self.forward(k, texts) for k in range(len(self.text_encoders))]
        crossattn = torch.cat([z for z, _ in outs], dim=2)
        pooled = outs[-1][1]
        if negative and all(t == "" for t in texts):  # force_zero_embeddings=['txt']
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        ids = self.time_ids(width, height, negative)
        return [{"crossattn": crossattn[i], "text_embeds": pooled[i], "time_ids": ids} for i in range(len(texts))]

    def schedule(self, prompt: str, steps: int, width: int, height: int, negative: bool = False) -> list:
        from sdrt.runtime.text.prompt import prompt_schedule

        entries = prompt_schedule(prompt, steps)
        conds = self.learned([t for _, t in entries], width, height, negative)
        return [(end, c) for (end, _), c in zip(entries, conds)]

    def conditioning(self, prompt: str, negative_prompt: str, steps: int, width: int, height: int):
        """(parts [(schedule, weight)], uncond schedule) as ``get_multicond_learned_conditioning``."""
        import re

        from sdrt.runtime.text.prompt import split_and

        uncond = self.schedule(negative_prompt, steps, width, height, negative=True)
        prompt = re.sub(r"<(\w+):([^>]+)>", "", prompt)
        flat = {}
        parts = []
        for text, weight in split_and(prompt):
            if text not in flat:
                flat[text] = self.schedule(text, steps, width, height)
            parts.append((flat[text], weight))
        return parts, uncond

    @staticmethod
    def pick(schedule, step):
        for end, cond in schedule:
            if step <= end:
                return cond
        return schedule[0][1]

    def sigma_to_t(self, sigma: float) -> torch.Tensor:
        """k-diffusion's ``DiscreteSchedule.sigma_to_t``: log-sigma interpolation."""
        log_sigma = torch.tensor(sigma, dtype=torch.float64).log()
        dists = log_sigma - self.log_sigmas
        low = dists.ge(0).cumsum(0).argmax().clamp(max=len(self.log_sigmas) - 2)
        w = ((self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).float()

    def denoiser(self, parts, uncond_schedule, cfg_scale: float, width: int, height: int, pad: bool = True,
                 first_step: int = 0):
        """The webui's ``CFGDenoiser`` over the k-diffusion denoiser: ``denoise(x, sigma)``; its call
        counter (the prompt schedules' step) starts at ``first_step`` (a refiner's: where it took over)."""
        empty = self.learned([""], width, height)[0]["crossattn"]
        calls = [first_step]

        def stack(tensors):  # prompt_parser.stack_conds: the last vector repeated
            longest = max(t.shape[0] for t in tensors)
            return torch.stack([torch.vstack([t, t[-1:].repeat(longest - t.shape[0], 1)]) for t in tensors])

        @torch.no_grad()
        def denoise(x, sigma):
            sigma = float(sigma)
            step = calls[0]
            calls[0] += 1
            picked = [self.pick(s, step) for s, _ in parts]
            tensor = {k: stack([c[k] for c in picked]) if k == "crossattn" else torch.stack([c[k] for c in picked])
                      for k in picked[0]}
            uncond = {k: v[None] for k, v in self.pick(uncond_schedule, step).items()}
            if pad and tensor["crossattn"].shape[1] != uncond["crossattn"].shape[1]:
                repeats = (tensor["crossattn"].shape[1] - uncond["crossattn"].shape[1]) // 77
                if repeats > 0:
                    uncond["crossattn"] = torch.cat([uncond["crossattn"], empty.repeat(1, repeats, 1)], axis=1)
                else:
                    tensor["crossattn"] = torch.cat(
                        [tensor["crossattn"], empty.repeat(len(picked), -repeats, 1)], axis=1)
            k = len(parts)
            x_in = torch.cat([x.repeat(k, 1, 1, 1), x])
            c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
            t = self.sigma_to_t(sigma)

            def unet(xs, cond):
                added = {n: cond[n] for n in ("text_embeds", "time_ids") if n in cond}
                return self.unet(xs * c_in, t.expand(len(xs)), cond["crossattn"],
                                 added_cond_kwargs=added or None).sample

            if tensor["crossattn"].shape[1] == uncond["crossattn"].shape[1]:
                out = unet(x_in, {n: torch.cat([tensor[n], uncond[n]]) for n in tensor})
            else:
                out = torch.cat([unet(x_in[:k], tensor), unet(x_in[k:], uncond)])
            if self.prediction_type == "epsilon":
                den = x_in + out * -sigma
            else:
                den = out * (-sigma / (sigma**2 + 1.0) ** 0.5) + x_in * (1.0 / (sigma**2 + 1.0))
            denoised = den[k:].clone()
            for j, (_, weight) in enumerate(parts):
                denoised += (den[j:j + 1] - den[k:]) * (weight * cfg_scale)
            return denoised

        return denoise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents / self.scale).sample
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).numpy()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] in [-1, 1] -> the posterior's mean times the latent scale (sdrt's img2img init)."""
        return self.vae.encode(pixels).latent_dist.mean * self.scale
