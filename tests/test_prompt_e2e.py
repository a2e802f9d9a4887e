"""Prompts end to end against a PyTorch reference of the webui's conditioning and guidance.

The reference is written here in torch after the webui's ``sd_hijack_clip.py`` (chunks of a batch
of texts encoded chunk index by chunk index, emphasis scaled and the batch mean restored per
chunk), ``sd_hijack.EmbeddingsWithFixes`` (a forward hook puts the embedding vectors, read with
torch and safetensors, into transformers' token embedding output), ``prompt_parser``
(``reconstruct_cond_batch``, ``stack_conds``) and ``sd_samplers_cfg_denoiser`` (a call counter,
one row per ``AND`` part, ``combine_denoised``, padding with the empty prompt). It shares with
the runtime the parsers and the chunk layout (table-tested in test_prompt.py), the name lookup
of embeddings, the sampler arithmetic and the sigmas.
"""

from __future__ import annotations

import re
import time
import tracemalloc

import numpy as np
import pytest
import torch

from sdrt.export.reference import TorchReference, psnr
from sdrt.runtime import sampling
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline, to_uint8
from sdrt.runtime.text.encoder import make_chunks
from sdrt.runtime.text.prompt import parse_emphasis, prompt_schedule, split_and

WIDTH = 32


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    d = tmp_path_factory.mktemp("e2e_embeddings")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": 0.05 * torch.randn(3, WIDTH, generator=g)},
                "name": "mystyle", "step": 100}, d / "mystyle.pt")
    save_file({"emb_params": 0.05 * torch.randn(2, WIDTH, generator=g)}, str(d / "bad-hands.safetensors"))
    torch.save({"<concept>": 0.05 * torch.randn(WIDTH, generator=g)}, d / "concept.bin")
    save_file({"emb_params": (0.05 * torch.randn(2, WIDTH, generator=g)).bfloat16()}, str(d / "negemb.safetensors"))
    return d


def torch_vectors(path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        (v,) = load_file(str(path)).values()
    else:
        data = torch.load(path, weights_only=True)
        v = data["string_to_param"]["*"] if "string_to_param" in data else next(iter(data.values()))
    return v.float().reshape(-1, v.shape[-1])


class WebuiReference:
    """The webui's text conditioning and CFG in torch, on the reference's modules."""

    def __init__(self, ref: TorchReference, library):
        self.ref, self.library = ref, library
        self.tok = ref.tokenizer
        text_model = getattr(ref.text_encoder, "text_model", ref.text_encoder)
        self.final_layer_norm = text_model.final_layer_norm
        self.vectors = {name: torch_vectors(path) for name, path in (library.paths.items() if library else ())}
        self.pending = None
        text_model.embeddings.token_embedding.register_forward_hook(self._fix)

    def _fix(self, module, inputs, output):
        if not self.pending:
            return output
        output = output.clone()
        for row, fixes in enumerate(self.pending):
            for offset, embedding in fixes:
                v = self.vectors[embedding.name]
                output[row, offset + 1:offset + 1 + len(v)] = v
        return output

    def chunks(self, text):
        runs = parse_emphasis(text)
        pieces = [(None if (t == "BREAK" and w == -1) else self.tok(t, add_special_tokens=False)["input_ids"], w)
                  for t, w in runs]
        return make_chunks(pieces, bos=self.tok.bos_token_id, eos=self.tok.eos_token_id,
                           comma=self.tok.convert_tokens_to_ids(",</w>"), embeddings=self.library)

    @torch.no_grad()
    def forward(self, texts, clip_skip):
        batch = [self.chunks(t) for t in texts]
        empty = [self.tok.bos_token_id] + [self.tok.eos_token_id] * 76
        zs = []
        for i in range(max(len(c) for c in batch)):
            tokens = torch.tensor([c[i].tokens if i < len(c) else empty for c in batch])
            mult = torch.tensor([c[i].multipliers if i < len(c) else [1.0] * 77 for c in batch])
            self.pending = [c[i].fixes if i < len(c) else [] for c in batch]
            out = self.ref.text_encoder(tokens, output_hidden_states=clip_skip > 1)
            self.pending = None
            z = self.final_layer_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
            original_mean = z.mean()
            z = z * mult.reshape(mult.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
            zs.append(z)
        return torch.hstack(zs)

    def learned(self, prompt, steps, clip_skip):
        entries = prompt_schedule(prompt, steps)
        z = self.forward([t for _, t in entries], clip_skip)
        return [(end, z[i]) for i, (end, _) in enumerate(entries)]

    def conditioning(self, p: GenerationParams, steps: int):
        uncond = self.learned(p.negative_prompt, steps, p.clip_skip)
        # processing.parse_extra_network_prompts: extra_networks.re_extra_net, on the prompt only
        prompt = re.sub(r"<(\w+):([^>]+)>", "", p.prompt)
        flat = {}
        parts = []
        for text, weight in split_and(prompt):
            if text not in flat:
                flat[text] = self.learned(text, steps, p.clip_skip)
            parts.append((flat[text], weight))
        return parts, uncond

    @staticmethod
    def pick(schedule, step):
        for end, cond in schedule:
            if step <= end:
                return cond
        return schedule[0][1]

    def denoiser(self, p: GenerationParams, parts, uncond_schedule):
        empty = self.forward([""], p.clip_skip)
        calls = [0]

        @torch.no_grad()
        def denoise(x, sigma):
            step = calls[0]
            calls[0] += 1
            tensors = [self.pick(s, step) for s, _ in parts]
            longest = max(t.shape[0] for t in tensors)
            tensor = torch.stack([torch.vstack([t, t[-1:].repeat(longest - t.shape[0], 1)]) for t in tensors])
            uncond = self.pick(uncond_schedule, step)[None]
            if p.pad_conds and tensor.shape[1] != uncond.shape[1]:
                repeats = (tensor.shape[1] - uncond.shape[1]) // 77
                if repeats > 0:
                    uncond = torch.cat([uncond, empty.repeat(1, repeats, 1)], axis=1)
                else:
                    tensor = torch.cat([tensor, empty.repeat(tensor.shape[0], -repeats, 1)], axis=1)
            k = len(parts)
            x_in = torch.cat([x.repeat(k, 1, 1, 1), x])
            c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
            t = self.ref.sigma_to_t(sigma)
            if tensor.shape[1] == uncond.shape[1]:
                out = self.ref.unet(x_in * c_in, t.expand(k + 1), torch.cat([tensor, uncond])).sample
            else:
                out = torch.cat([self.ref.unet(x_in[:k] * c_in, t.expand(k), tensor).sample,
                                 self.ref.unet(x_in[k:] * c_in, t.expand(1), uncond).sample])
            den = x_in + out * -sigma
            denoised = den[k:].clone()
            for j, (_, weight) in enumerate(parts):
                denoised += (den[j:j + 1] - den[k:]) * (weight * p.cfg_scale)
            return denoised

        return denoise


@pytest.fixture(scope="module")
def e2e(tiny_bundle, tiny_checkpoint, emb_dir):
    pipe = Pipeline(tiny_bundle, embeddings_dir=emb_dir)
    ref = WebuiReference(TorchReference(tiny_checkpoint, pipe.bundle.path / "tokenizer"), pipe.text_encoder.library)
    return pipe, ref


def compare(pipe: Pipeline, ref: WebuiReference, p: GenerationParams) -> dict:
    """Runtime and reference on one request: PSNR and max-abs of the conditioning, latents, image."""
    info, _ = sampling.resolve(p.sampler_name, p.scheduler)
    steps = p.steps * 2 if info.second_order else p.steps
    cond, uncond = pipe.conditioning(p)
    parts, uncond_ref = ref.conditioning(p, steps)
    rt_text, ref_text = [], []
    for step in range(steps + 1):
        rt_text += [c for c, _ in cond.at(step)] + [uncond.at(step)]
        ref_text += [ref.pick(s, step).numpy() for s, _ in parts] + [ref.pick(uncond_ref, step).numpy()]
    sigmas = []
    lat_rt = pipe.sample(p, [p.seed], cond, uncond, callback=lambda e: sigmas.append(e["sigma"]))
    gen = torch.Generator().manual_seed(p.seed)
    shape = (pipe.bundle.latent_channels, p.height // 8, p.width // 8)
    x0 = torch.randn(shape, generator=gen)[None] * sigmas[0]
    lat_ref = info.fn(ref.denoiser(p, parts, uncond_ref), x0, sigmas + [0.0])
    image_rt = to_uint8(pipe.decode_float(lat_rt)[0])
    image_ref = to_uint8(ref.ref.decode(lat_ref)[0])
    lat_ref = lat_ref.numpy()
    rt_text = [c[:r.shape[0]] for c, r in zip(rt_text, ref_text)]  # AND parts: the reference stacks per step
    return {
        "text_psnr": min(psnr(r, c) for r, c in zip(ref_text, rt_text)),
        "text_max_abs": max(float(np.abs(r - c).max()) for r, c in zip(ref_text, rt_text)),
        "latents_psnr": psnr(lat_ref, lat_rt), "latents_max_abs": float(np.abs(lat_ref - lat_rt).max()),
        "image_psnr": psnr(image_ref, image_rt, peak=255.0),
    }


LONG = ", ".join(f"a small (red:1.2) circle number {i} on a [blue] background" for i in range(9))
CASES = {
    "weighted": GenerationParams("a (red:1.4) circle on a [[blue]] background, ((sharp)), \\(literal\\), (unclosed",
                                 negative_prompt="blurry, (ugly:1.2)"),
    "long": GenerationParams(LONG + " BREAK (a green square:0.8)", negative_prompt="ugly"),
    "edited": GenerationParams("a [red:blue:0.5] circle [on a:in the:3] [background::0.25], [cat|dog|bird]",
                               negative_prompt="[ugly:blurry:4]"),
    "and": GenerationParams("a red circle AND a blue square:0.7 AND " + LONG + ":-0.3", cfg_scale=5.0),
    "embedding": GenerationParams("a mystyle cat, (bad-hands:1.3), [concept:dog:0.5]", negative_prompt="negemb"),
    "clip_skip": GenerationParams("a (red:1.3) [circle|square]", negative_prompt="(blue:0.8)", clip_skip=2),
    "unpadded": GenerationParams(LONG, negative_prompt="blurry", pad_conds=False),
    "extra_networks": GenerationParams("a <lora:x:0.8>red circle, [<hypernet:h>cat|dog] AND <foo:bar>a square:0.5",
                                       negative_prompt="ugly <lora:neg:1>"),
    "heun_edited": GenerationParams("a [red:blue:0.5] circle, [cat|dog]", negative_prompt="ugly",
                                    sampler_name="Heun", steps=5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_webui_reference(e2e, case):
    pipe, ref = e2e
    p = CASES[case]
    p = GenerationParams(**{**p.__dict__, "sampler_name": p.sampler_name if p.sampler_name != "Euler a" else "Euler",
                            "steps": p.steps if p.sampler_name == "Heun" else 8, "seed": 5, "width": 64, "height": 64})
    r = compare(pipe, ref, p)
    assert r["text_psnr"] >= 90 and r["latents_max_abs"] < 1e-3 and r["image_psnr"] >= 60, r


def test_twenty_thousand_characters_in_bounded_time_and_memory(e2e):
    pipe, _ = e2e
    unit = "a (photo:1.1) of a [cat|dog] on a [red:blue:0.5] mat, "
    prompt = (unit * (20_000 // len(unit) + 1))[:20_000]
    p = GenerationParams(prompt, negative_prompt="ugly, " * 500, steps=2, sampler_name="Euler", seed=1)
    tracemalloc.start()
    start = time.perf_counter()
    cond, uncond = pipe.conditioning(p)
    encoded = time.perf_counter() - start
    (image,) = pipe.generate(p)
    total = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cond.tokens == uncond.tokens and cond.tokens // 77 <= 128
    assert encoded < 30 and total < 90, (encoded, total)
    assert peak < 512 << 20, peak
