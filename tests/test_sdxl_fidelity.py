"""SD 2.x (eps and v) and SDXL end to end against a PyTorch reference of the webui.

Tiny models from the real configs scaled down (``sdrt.export.tiny``), exported with
``export_modules``; the reference (``sdrt.export.reference.FamilyReference``) runs the same
transformers / diffusers modules with the webui's conditioning written in torch (OpenCLIP's
padding, the layer each embedder reads, the pooled projection, emphasis per encoder, the
concatenation, the zeroed empty negative prompt, the size conditioning), k-diffusion 0.1.1's
samplers and torch generators seeded as the webui seeds them. Shared with the runtime: the
prompt parsers, sdrt's chunker (token ids, multipliers) and the sigma values of the
"Automatic" schedule (checked against k-diffusion in test_schedules.py; Karras sigmas come from
k-diffusion here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.export.reference import FamilyReference
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline.img2img import Img2imgPipeline, img2img_steps
from sdrt.runtime.pipeline.params import GenerationParams, Img2imgParams
from sdrt.runtime.pipeline.txt2img import to_uint8
from sdrt.runtime.sampling.denoiser import CFGDenoiser
from sdrt.runtime.text.encoder import CondSchedule, MultiCond

from test_samplers import load_k_diffusion_sampling

LONG = ", ".join(f"a small (red:1.2) circle number {i} on a [blue] background" for i in range(9))
SDXL_EMB = {"clip_l": 32, "clip_g": 48}  # the tiny SDXL configs' encoder widths


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


def _model(tmp_path_factory, configs, name, emb_dir=None, bundle=None):
    """The pipeline and reference of ``random_modules(configs, seed=3)``: exported here, or
    ``bundle``, a session fixture's export of the same modules."""
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import export_modules

    torch.set_grad_enabled(False)
    unet, vae, text_encoder, *rest = random_modules(configs, seed=3)
    text_encoder_2 = rest[0] if rest else None
    if bundle is None:
        source = {"name": f"tiny-{name}", "kind": "random", "sha256": None, "hash": None}
        bundle = export_modules(unet, vae, text_encoder, configs, tmp_path_factory.mktemp("fam") / name,
                                source=source, text_encoder_2=text_encoder_2)
    pipe = Img2imgPipeline(bundle, embeddings_dir=emb_dir)
    te = pipe.text_encoder
    encoders = getattr(te, "encoders", [te])
    modules = [m for m in (text_encoder, text_encoder_2) if m is not None]
    vectors = {}
    if emb_dir is not None:
        from safetensors.torch import load_file

        vectors = {p.stem: load_file(str(p)) for p in emb_dir.glob("*.safetensors")}
    ref = FamilyReference(pipe.bundle.architecture, unet, vae, modules, [e.chunks for e in encoders],
                          configs["scheduler"], pipe.bundle.latent_scale_factor, vectors)
    return pipe, ref


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    d = tmp_path_factory.mktemp("sdxl_embeddings")
    save_file({k: 0.05 * torch.randn(3, w, generator=g) for k, w in SDXL_EMB.items()}, str(d / "xlstyle.safetensors"))
    return d


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    from sdrt.export.tiny import scaled_sd2_configs

    return _model(tmp_path_factory, scaled_sd2_configs(), "sd2")


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory, sd2v_bundle):
    configs, bundle = sd2v_bundle
    return _model(tmp_path_factory, configs, "sd2v", bundle=bundle)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, emb_dir, sdxl_bundle):
    configs, bundle = sdxl_bundle
    return _model(tmp_path_factory, configs, "sdxl", emb_dir, bundle=bundle)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    from sdrt.export.tiny import scaled_sdxl_configs

    return _model(tmp_path_factory, scaled_sdxl_configs(refiner=True), "refiner")


class Generators:
    """The webui's per-image torch generator: the latent noise first, then the sampler's draws."""

    def __init__(self, shape, seed):
        self.shape = shape
        self.gen = torch.Generator().manual_seed(seed)
        self.first = torch.randn(shape, generator=self.gen)[None]

    def next(self, *args):
        return torch.randn(self.shape, generator=self.gen)[None]


def reference_sigmas(kd, pipe, plan, steps, sdrt_sigmas):
    """Karras from k-diffusion over the model's sigma range (as the webui calls it); the others sdrt's."""
    if plan.schedule != "Karras":
        return sdrt_sigmas
    sig = pipe.denoiser.sigmas
    out = kd.get_sigmas_karras(steps, float(sig.min()), float(sig.max())).numpy()
    assert np.allclose(out, sdrt_sigmas, rtol=1e-5, atol=1e-6)
    return out


def kd_sample(kd, info, denoise, x, sigmas, gens):
    def model(x, sigma, **kwargs):
        return denoise(x, float(sigma.reshape(-1)[0]))

    t = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    fn = {"Euler a": kd.sample_euler_ancestral, "Euler": kd.sample_euler, "DPM++ 2M": kd.sample_dpmpp_2m,
          "Heun": kd.sample_heun}[info.name]
    kwargs = {"noise_sampler": gens.next} if info.name == "Euler a" else {}
    return fn(model, x, t, disable=True, **kwargs)


def compare_text(pipe, ref, plan, cond, uncond):
    """PSNR of the runtime's conditioning (states, pooled, time ids) against the reference's, every step."""
    p = plan.params
    parts, uncond_ref = ref.conditioning(p.prompt, p.negative_prompt, plan.condition_steps, plan.width, plan.height)
    worst = np.inf
    for step in range(plan.condition_steps):
        rt = [(c, a) for (c, _), a in zip(cond.at(step), cond.added_at(step))] + [(uncond.at(step),
                                                                                  uncond.added_at(step))]
        rf = [ref.pick(s, step) for s, _ in parts] + [ref.pick(uncond_ref, step)]
        for (c, added), r in zip(rt, rf):
            want = r["crossattn"].numpy()
            assert c.shape[1] == want.shape[1]
            worst = min(worst, psnr(want, c[:len(want)]))
            assert (added is None) == ("text_embeds" not in r)
            if added is not None:
                worst = min(worst, psnr(r["text_embeds"].numpy(), added["text_embeds"]))
                assert np.array_equal(added["time_ids"], r["time_ids"].numpy())
    return worst, parts, uncond_ref


def compare(kd, model, p: GenerationParams) -> dict:
    pipe, ref = model
    plan = pipe.plan(p)
    info = plan.sampler
    cond, uncond = pipe.conditioning(plan)
    text_psnr, parts, uncond_ref = compare_text(pipe, ref, plan, cond, uncond)
    sigmas = []
    lat_rt = pipe.sample(plan, [p.seed], cond, uncond, callback=lambda e: sigmas.append(e["sigma"]))
    sigmas = reference_sigmas(kd, pipe, plan, p.steps, np.array(sigmas + [0.0]))
    gens = Generators(plan.latent_shape, p.seed)
    denoise = ref.denoiser(parts, uncond_ref, p.cfg_scale, plan.width, plan.height, p.pad_conds)
    lat_ref = kd_sample(kd, info, denoise, gens.first * float(sigmas[0]), sigmas, gens)
    image_rt = to_uint8(pipe.decode_float(lat_rt)[0])
    image_ref = to_uint8(ref.decode(lat_ref)[0])
    return {"text_psnr": text_psnr, "latents_max_abs": float(np.abs(lat_ref.numpy() - lat_rt).max()),
            "latents_psnr": psnr(lat_ref.numpy(), lat_rt), "image_psnr": psnr(image_ref, image_rt, peak=255.0),
            "image_std": float(image_rt.std())}


def check(r):
    assert r["text_psnr"] >= 90 and r["latents_max_abs"] < 1e-3 and r["image_psnr"] >= 60, r
    assert r["image_std"] > 1, r  # a real image, not a flat one that any model would match


SD2_CASES = {
    "weighted": GenerationParams("a (red:1.4) circle on a [[blue]] background, ((sharp))", negative_prompt="",
                                 sampler_name="Euler a"),
    "two_chunks": GenerationParams(LONG, negative_prompt="blurry, (ugly:1.2)", sampler_name="DPM++ 2M",
                                   scheduler="Karras"),
}


@pytest.mark.parametrize("case", list(SD2_CASES))
@pytest.mark.parametrize("family", ["sd2", "sd2v"])
def test_sd2_matches_the_webui_reference(kd, request, family, case):
    model = request.getfixturevalue(family)
    assert model[0].bundle.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    p = SD2_CASES[case].replace(steps=6, seed=11, width=64, height=64)
    check(compare(kd, model, p))


SDXL_CASES = {
    # an empty negative prompt: zero states and zero pooled vector
    "weighted_empty_negative": GenerationParams("a (red:1.4) circle on a [[blue]] background", negative_prompt="",
                                                sampler_name="Euler a"),
    "two_chunks_negative": GenerationParams(LONG + " BREAK (a green square:0.8)", negative_prompt="blurry, (ugly:1.2)",
                                            sampler_name="DPM++ 2M", scheduler="Karras"),
    # edits change the pooled vector along the schedule; [:ugly:3] schedules "" first (not zeroed)
    "edited_and": GenerationParams("a [red:blue:0.5] circle, [cat|dog] AND a square:0.7", negative_prompt="[:ugly:3]",
                                   sampler_name="Euler"),
    "embedding": GenerationParams("a xlstyle cat, (xlstyle:1.3)", negative_prompt="", sampler_name="Euler a"),
    "unpadded_wide": GenerationParams(LONG, negative_prompt="blurry", pad_conds=False, sampler_name="Euler",
                                      width=96, height=64),
}


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_matches_the_webui_reference(kd, sdxl, case):
    p = SDXL_CASES[case]
    p = p.replace(steps=6, seed=7, width=p.width or 64, height=p.height or 64)
    check(compare(kd, sdxl, p))


def test_sdxl_conditioning_as_the_webui_builds_it(sdxl):
    pipe, _ = sdxl
    plan = pipe.plan(GenerationParams("a cat", negative_prompt="", width=96, height=64, steps=4))
    cond, uncond = pipe.conditioning(plan)
    schedule = cond.parts[0][0]
    assert schedule.conds[0].shape == (77, 32 + 48)  # CLIP-L and bigG side by side
    assert schedule.pooled[0].shape == (40,)  # bigG's projection
    assert schedule.time_ids.tolist() == [64, 96, 0, 0, 64, 96]  # (h, w) original, crop, (h, w) target
    assert not uncond.conds[0].any() and not uncond.pooled[0].any()
    # a negative prompt that is only a space is text, encoded
    _, spaced = pipe.conditioning(plan.params.replace(negative_prompt=" "))
    assert spaced.conds[0].any() and spaced.pooled[0].any()
    assert pipe.bundle.default_size == (64, 64) and plan.width == 96


def test_sdxl_crop_and_aesthetic_settings(kd, sdxl, refiner):
    """The webui's sdxl_crop_top / sdxl_crop_left and the refiner's aesthetic scores (override_settings)."""
    pipe, ref = sdxl
    p = GenerationParams.from_webui({"prompt": "a (red:1.2) cat", "negative_prompt": "ugly", "steps": 4, "seed": 2,
                                     "sampler_name": "Euler", "width": 64, "height": 64,
                                     "override_settings": {"sdxl_crop_top": 16, "sdxl_crop_left": 8}})
    cond, uncond = pipe.conditioning(p)
    assert cond.parts[0][0].time_ids.tolist() == [64, 64, 16, 8, 64, 64] == uncond.time_ids.tolist()
    ref.crop = (16, 8)
    try:
        check(compare(kd, sdxl, p))
    finally:
        ref.crop = (0, 0)
    cond, uncond = refiner[0].conditioning(p.replace(override_settings={"sdxl_refiner_high_aesthetic_score": 7.0,
                                                                        "sdxl_refiner_low_aesthetic_score": 1.5}))
    assert cond.parts[0][0].time_ids.tolist() == [64, 64, 16, 8, 7.0] and uncond.time_ids.tolist()[-1] == 1.5
    with pytest.raises(SdrtError, match="sdxl_crop_top"):
        pipe.plan(p.replace(sdxl_crop_top=1.5))


def test_sdxl_clip_skip_is_ignored_with_a_warning(sdxl, caplog):
    pipe, _ = sdxl
    p = GenerationParams("a cat", steps=3)
    a, _ = pipe.conditioning(p)
    b, _ = pipe.conditioning(p.replace(clip_skip=2))
    assert np.array_equal(a.parts[0][0].conds[0], b.parts[0][0].conds[0])
    assert "clip skip 2 is ignored" in caplog.text


def test_sdxl_ti_hashes_list_each_embedding_once_per_encoder(sdxl):
    """Each of the webui's two embedders writes its embeddings before those already written
    (SDXL infotexts read "negativeXL_D: fff5d51ab655, negativeXL_D: fff5d51ab655")."""
    from sdrt.runtime.text.encoder import ti_hashes

    pipe, _ = sdxl
    cond, uncond = pipe.conditioning(GenerationParams("a xlstyle cat", steps=3))
    short = pipe.text_encoder.library.get("xlstyle").shorthash
    assert ti_hashes(cond, uncond) == f"xlstyle: {short}, xlstyle: {short}"
    assert pipe.text_encoder.encoders[1].library.get("xlstyle").vectors.shape == (3, 48)  # clip_g


def test_sd1_embedding_refused_by_sdxl(tmp_path, sdxl):
    from safetensors.numpy import save_file

    from sdrt.runtime.text.embeddings import EmbeddingLibrary

    save_file({"emb_params": np.zeros((2, 32), np.float32)}, str(tmp_path / "old.safetensors"))
    lib = EmbeddingLibrary(tmp_path, sdxl[0].text_encoder.tokenizer, 32, key="clip_l")
    with pytest.raises(SdrtError, match="SDXL embeddings"):
        lib.get("old")


def test_sdxl_batch_rows_carry_their_added_conditioning():
    """Two images, two AND parts: each UNet row gets its part's pooled vector and the size ids."""
    def schedule(value, pooled):
        return CondSchedule((9,), (np.full((77, 4), value, np.float32),), pooled=(np.full(3, pooled, np.float32),),
                            time_ids=np.arange(6, dtype=np.float32))

    seen = {}

    def model(x, sigma, context):
        seen.update(context)
        # the prediction: each row's states and pooled value, broadcast
        return (x * 0 + context["encoder_hidden_states"][:, :1, :1, None] + context["text_embeds"][:, :1, None, None])

    cond = MultiCond(((schedule(1.0, 10.0), 1.0), (schedule(2.0, 20.0), 0.5)))
    out = CFGDenoiser(model, cond, schedule(-1.0, -10.0), 2.0)(np.zeros((2, 1, 2, 2), np.float32), 1.0)
    assert seen["text_embeds"][:, 0].tolist() == [10, 20, 10, 20, -10, -10]
    assert seen["encoder_hidden_states"][:, 0, 0].tolist() == [1, 2, 1, 2, -1, -1]
    assert seen["time_ids"].shape == (6, 6) and (seen["time_ids"] == np.arange(6)).all()
    # uncond + (c1 - u) * 2 + (c2 - u) * 1 = -11 + 22 * 2 + 33
    assert np.allclose(out, -11 + 44 + 33)


def test_sdxl_img2img_matches_the_reference(kd, sdxl):
    from PIL import Image

    pipe, ref = sdxl
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    p = Img2imgParams("a (red:1.2) circle", negative_prompt="blurry", init_images=[image], denoising_strength=0.6,
                      steps=6, seed=5, width=64, height=64, sampler_name="Euler a")
    plan = pipe.plan(p)
    cond, uncond = pipe.conditioning(plan)
    lat_rt = pipe.sample(plan, [p.seed], cond, uncond)
    _, parts, uncond_ref = compare_text(pipe, ref, plan, cond, uncond)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    init = ref.encode(pixels)
    steps, t_enc = img2img_steps(p.steps, p.denoising_strength)
    sigmas = sampling.sigmas_for(plan.schedule, steps, pipe.denoiser.schedule, sampler=plan.sampler)
    sigma_sched = sigmas[steps - t_enc - 1:]
    gens = Generators(plan.latent_shape, p.seed)
    denoise = ref.denoiser(parts, uncond_ref, p.cfg_scale, 64, 64)
    lat_ref = kd_sample(kd, plan.sampler, denoise, init + gens.first * float(sigma_sched[0]), sigma_sched, gens)
    assert float(np.abs(lat_ref.numpy() - lat_rt).max()) < 1e-3
    assert psnr(to_uint8(ref.decode(lat_ref)[0]), to_uint8(pipe.decode_float(lat_rt)[0]), peak=255.0) >= 60


def test_refiner_conditions_on_bigg_and_the_aesthetic_score(kd, refiner):
    pipe, _ = refiner
    p = GenerationParams("a (red:1.2) circle", negative_prompt="blurry", steps=5, seed=3, width=64, height=64,
                         sampler_name="Euler")
    cond, uncond = pipe.conditioning(pipe.plan(p))
    assert cond.parts[0][0].conds[0].shape == (77, 48)
    assert cond.parts[0][0].time_ids.tolist() == [64, 64, 0, 0, 6.0]
    assert uncond.time_ids.tolist() == [64, 64, 0, 0, 2.5]
    check(compare(kd, refiner, p))


def test_verify_takes_sdxl_bundles(tmp_path, sdxl):
    """``sdrt verify``'s report for an SDXL bundle against its diffusers folder (the same weights)."""
    import json

    from sdrt.export.reference import verify_bundle
    from sdrt.export.tiny import scaled_sdxl_configs

    pipe, ref = sdxl
    folder = tmp_path / "diffusers"
    for name, module in zip(("unet", "vae", "text_encoder", "text_encoder_2"), (ref.unet, ref.vae, *ref.text_encoders)):
        module.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scaled_sdxl_configs()["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    report = verify_bundle(pipe.bundle.path, folder, GenerationParams("a (red:1.2) cat AND [dog|bird]:0.5", steps=4,
                                                                      seed=3, negative_prompt=""))
    stages = {k: v["psnr"] for k, v in report["stages"].items()}
    assert min(stages[k] for k in ("text_encoder", "unet", "vae_decoder", "latents")) >= 90, stages
    assert stages["image"] >= 60, stages


def test_refiner_switch_matches_the_webui_reference(kd, sdxl, refiner):
    """Base to refiner at the webui's switch: the first call whose sigma's nearest training timestep t
    has (999 - t) / 1000 >= refiner_switch_at; the refiner's own conditioning (bigG, aesthetic
    score), the step counter going on (prompt editing), the refiner's VAE, its infotext."""
    pipe, base_ref = sdxl
    refiner_pipe, refiner_ref = refiner
    pipe.set_refiner(refiner_pipe)
    try:
        p = GenerationParams("a [red:blue:0.3] circle", negative_prompt="blurry", steps=8, seed=9, width=64,
                             height=64, sampler_name="Euler a", refiner_checkpoint=refiner_pipe.bundle.name,
                             refiner_switch_at=0.5)
        plan = pipe.plan(p)
        sigmas = []
        images = pipe.generate(plan, callback=lambda e: sigmas.append(e["sigma"]))
        lat_rt = pipe.sample(plan, [p.seed], *pipe.conditioning(plan))
        sigmas = np.array(sigmas + [0.0])
        model_sigmas = torch.from_numpy(np.asarray(pipe.denoiser.sigmas, np.float32))
        base = base_ref.denoiser(*base_ref.conditioning(p.prompt, p.negative_prompt, 8, 64, 64), p.cfg_scale, 64, 64)
        state = {"calls": 0, "switched_at": None, "denoise": base}

        def denoise(x, sigma):
            t = int(torch.argmin(torch.abs(model_sigmas - torch.tensor(sigma, dtype=torch.float32))))
            if state["switched_at"] is None and (999 - t) / 1000 >= p.refiner_switch_at:
                state["switched_at"] = state["calls"]
                parts, uncond = refiner_ref.conditioning(p.prompt, p.negative_prompt, 8, 64, 64)
                state["denoise"] = refiner_ref.denoiser(parts, uncond, p.cfg_scale, 64, 64,
                                                        first_step=state["calls"])
            state["calls"] += 1
            return state["denoise"](x, sigma)

        gens = Generators(plan.latent_shape, p.seed)
        lat_ref = kd_sample(kd, plan.sampler, denoise, gens.first * float(sigmas[0]), sigmas, gens)
        assert 0 < state["switched_at"] < 8
        assert float(np.abs(lat_ref.numpy() - lat_rt).max()) < 1e-3
        image_ref = to_uint8(refiner_ref.decode(lat_ref)[0])
        assert psnr(image_ref, np.asarray(images[0].image), peak=255.0) >= 60
        assert "Refiner: tiny-refiner, Refiner switch at: 0.5, Version" in images[0].infotext
        # a switch the sampling never reaches writes nothing
        late = pipe(**{**p.__dict__, "refiner_switch_at": 1.0})[0]
        assert "Refiner" not in late.infotext
        with pytest.raises(SdrtError, match="not the refiner loaded"):
            pipe.plan(p.replace(refiner_checkpoint="other-model"))
    finally:
        pipe.set_refiner(None)
    with pytest.raises(SdrtError, match="no refiner model is loaded"):
        pipe.plan(p)


def test_public_pipeline_takes_a_refiner(sdxl, refiner):
    import sdrt

    pipe = sdrt.Pipeline(sdxl[0].bundle.path, refiner=refiner[0].bundle.path)
    assert pipe.refiner.bundle.architecture == "sdxl-refiner"
    image = pipe("a cat", steps=4, seed=1, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)[0]
    assert "Refiner: tiny-refiner, Refiner switch at: 0.5" in image.infotext
