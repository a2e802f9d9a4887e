"""The ``sdrt`` command line (click). Names and defaults follow the AUTOMATIC1111 webui."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click
from tqdm import tqdm

from sdrt.runtime import __version__, png
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import PRECISIONS


def _friendly(fn):
    """Turn SdrtError into one ``error:`` line and exit status 1; never a traceback for the user."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdrtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class _StageBar:
    """A tqdm bar for (stage, done, total) progress callbacks."""

    def __init__(self, desc: str):
        self.bar = None
        self.desc = desc

    def __call__(self, stage: str, done: int, total: int):
        if self.bar is None or self.bar.disable:  # a closed bar: the next stage group gets a new one
            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.set_postfix_str(stage)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrt")
@click.option("-v", "--verbose", is_flag=True, help="Log what sdrt does.")
def main(verbose: bool):
    """sdrt: Stable Diffusion checkpoints as ONNX bundles, sampled without torch."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("prompt")
@click.option("-n", "--negative-prompt", default="", help="Negative prompt.")
@click.option("-m", "--model", default=None, help="Bundle, diffusers folder or .safetensors/.ckpt checkpoint "
              "(default: the embedded model).")
@click.option("--steps", default=20, show_default=True, type=int, help="Sampling steps.")
@click.option("--sampler", "sampler_name", default="Euler a", show_default=True, help="Sampler name as in the webui.")
@click.option("--scheduler", "--schedule-type", "scheduler", default="Automatic", show_default=True,
              help="Schedule type as in the webui.")
@click.option("--cfg-scale", default=7.0, show_default=True, type=float, help="Classifier-free guidance scale.")
@click.option("--seed", default=-1, show_default=True, type=int, help="Seed; -1 picks one at random.")
@click.option("-W", "--width", default=None, type=int, help="Width in pixels (default: the model's).")
@click.option("-H", "--height", default=None, type=int, help="Height in pixels (default: the model's).")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Images per batch.")
@click.option("--batch-count", "n_iter", default=1, show_default=True, type=int, help="Number of batches.")
@click.option("--clip-skip", default=1, show_default=True, type=int, help="CLIP skip (webui 'Clip skip').")
@click.option("--rng", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu", "nv"], case_sensitive=False),
              help="Noise source, as the webui's 'Random number generator source' (CPU / NV as its infotext "
              "writes them are accepted too).")
@click.option("--ensd", default=0, show_default=True, type=int, help="Eta noise seed delta.")
@click.option("--subseed", default=-1, show_default=True, type=int, help="Variation seed; -1 picks one at random.")
@click.option("--subseed-strength", default=0.0, show_default=True, type=float, help="Variation strength (0..1).")
@click.option("--seed-resize-from-w", default=0, show_default=True, type=int, help="Resize seed from width.")
@click.option("--seed-resize-from-h", default=0, show_default=True, type=int, help="Resize seed from height.")
@click.option("--eta", default=None, type=float, help="Sampler eta (default: the webui's, 1 ancestral / 0 DDIM).")
@click.option("--s-noise", default=1.0, show_default=True, type=float, help="Sampler noise multiplier.")
@click.option("--s-churn", default=0.0, show_default=True, type=float,
              help="Sigma churn (Euler, Heun, DPM2: the webui's 'sigma churn').")
@click.option("--s-tmin", default=0.0, show_default=True, type=float, help="Sigma tmin: churn only above it.")
@click.option("--s-tmax", default=0.0, show_default=True, type=float, help="Sigma tmax: churn only below it (0: infinity).")
@click.option("--pad-conds/--no-pad-conds", default=True, show_default=True,
              help="Pad prompt and negative prompt to the same length (one UNet batch).")
@click.option("--embeddings-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of textual inversion embeddings (.pt, .bin, .safetensors), used by file name "
              "in the prompt.")
@click.option("--lora-dir", default="models/Lora", show_default=True, type=click.Path(file_okay=False),
              help="Folder of LoRA / LyCORIS files (subfolders included), named in the prompt as <lora:name:weight>.")
@click.option("--hypernetwork-dir", default="models/hypernetworks", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder of the webui's hypernetwork files (.pt, subfolders included), named in the prompt as "
              "<hypernet:name:multiplier>.")
@click.option("--vae", default="auto", show_default=True,
              help="VAE file to decode (and encode) with: a path or a file name in --vae-dir; auto = the webui's "
              "Automatic (a VAE named like the checkpoint, e.g. nai.vae.pt beside nai.ckpt); none = the model's own.")
@click.option("--vae-dir", default="models/VAE", show_default=True, type=click.Path(file_okay=False),
              help="Folder of VAE files (.pt, .ckpt, .safetensors).")
@click.option("--refiner", default=None,
              help="Refiner model (bundle, diffusers folder or checkpoint; SDXL's refiner), as the webui's Refiner.")
@click.option("--refiner-switch-at", default=0.8, show_default=True, type=float,
              help="The fraction of the denoising after which the refiner takes over.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda[:N] (ONNX Runtime CUDA), tensorrt[:N] (ONNX Runtime's TensorRT EP) or trt[:N] "
              "(engines from `sdrt build`).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", *PRECISIONS]),
              help="Graph precision: auto = the bundle's measured default for the device (an int8 variant on "
              "cpu only when its export measured >= 35 dB against fp32), int8 / int8-static (cpu) or fp16 "
              "(cuda) when exported.")
@click.option("--no-half-vae", is_flag=True, help="Keep the VAE in fp32 at reduced precision (the webui's flag).")
@click.option("-o", "--output", default="outputs", show_default=True, type=click.Path(file_okay=False),
              help="Output folder.")
@click.option("--memory", default=None, type=click.Choice(["normal", "med", "low"]),
              help="Graphs kept loaded: all (normal), the UNet only (med), each only for its stage (low).")
@click.option("--medvram", is_flag=True, help="Same as --memory med (the webui's flag).")
@click.option("--lowvram", is_flag=True, help="Same as --memory low, with VAE tiling (the webui's flag).")
@click.option("--vae-tiling/--no-vae-tiling", default=None,
              help="Decode in overlapping tiles (default: on with --memory low).")
@click.option("--vae-tile-size", default=256, show_default=True, type=int, help="VAE tile side in pixels.")
@click.option("--cuda-graph", is_flag=True, help="Capture CUDA graphs of the UNet (GPU devices, fixed shapes).")
@_friendly
def generate(prompt, model, embeddings_dir, lora_dir, hypernetwork_dir, vae, vae_dir, device, precision, no_half_vae,
             output, memory, medvram, lowvram, vae_tiling, vae_tile_size, cuda_graph, **params):
    """Generate images from PROMPT (txt2img; with --enable-hr, the webui's hires fix)."""
    from sdrt.runtime.pipeline import GenerationParams, Img2imgPipeline, Pipeline

    refiner = params.pop("refiner")
    esrgan_dir = params.pop("esrgan_dir")
    hr_checkpoint = params.pop("hr_checkpoint")
    request = GenerationParams.from_webui({"prompt": prompt, **params})
    if hr_checkpoint is not None and not request.enable_hr:
        raise SdrtError("--hr-checkpoint is a hires fix option: give --enable-hr")
    # hires fix's second pass is img2img (and pixel upscalers encode again): the encoder's pipeline
    kind, extra = (Img2imgPipeline, {"upscalers": _hires_upscalers(request, esrgan_dir, device)}) if request.enable_hr \
        else (Pipeline, {})
    _render(kind, request, model, output, memory, medvram, lowvram, vae_tiling, vae_tile_size, device=device,
            embeddings_dir=embeddings_dir, cuda_graph=cuda_graph, precision=precision, half_vae=not no_half_vae,
            lora_dir=lora_dir, hypernetwork_dir=hypernetwork_dir, vae=(vae, vae_dir), refiner=refiner,
            hr_checkpoint=hr_checkpoint, **extra)


def _hires_upscalers(request, esrgan_dir: str, device: str) -> dict:
    """{name: ModelUpscaler} for an --hr-upscaler that names an ESRGAN file rather than a built-in."""
    from sdrt.runtime.pipeline.upscale import LATENT_MODES, PIXEL_UPSCALERS

    name = request.hr_upscaler
    if name is None or name in LATENT_MODES or name in PIXEL_UPSCALERS:
        return {}
    model = _model_upscaler(name, esrgan_dir, device, 192, 8, field="hr_upscaler")
    return {name: model}


# Hires fix (txt2img only), as the webui's "Hires. fix" options and API names
_HIRES_OPTIONS = [
    click.Option(["--enable-hr"], is_flag=True, help="Hires fix: a second, img2img pass at a larger size."),
    click.Option(["--hr-scale"], default=2.0, show_default=True, type=float, help="Hires fix: upscale by."),
    click.Option(["--hr-resize-x"], default=0, show_default=True, type=int,
                 help="Hires fix: resize width to (0: by --hr-scale, or from --hr-resize-y and the aspect ratio)."),
    click.Option(["--hr-resize-y"], default=0, show_default=True, type=int, help="Hires fix: resize height to."),
    click.Option(["--hr-upscaler"], default=None,
                 help="Hires fix upscaler: Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic "
                      "antialiased), Latent (nearest), Latent (nearest-exact), None, Lanczos, Nearest."),
    click.Option(["--hr-second-pass-steps"], default=0, show_default=True, type=int,
                 help="Hires fix steps (0: the same as --steps)."),
    click.Option(["--denoising-strength"], default=0.75, show_default=True, type=float,
                 help="Hires fix denoising strength."),
    click.Option(["--hr-sampler", "hr_sampler_name"], default=None, help="Hires fix sampler (default: --sampler)."),
    click.Option(["--hr-scheduler"], default=None, help="Hires fix schedule type (default: --scheduler)."),
    click.Option(["--hr-prompt"], default="", help="Hires fix prompt (default: PROMPT)."),
    click.Option(["--hr-negative-prompt"], default="", help="Hires fix negative prompt (default: the negative prompt)."),
    click.Option(["--hr-checkpoint"], default=None,
                 help="Hires fix: run the second pass on this model (bundle, diffusers folder or checkpoint; the "
                      "same latent space), as the webui's 'Hires checkpoint' (default: the same model)."),
    click.Option(["--esrgan-dir"], default="models/ESRGAN", show_default=True, type=click.Path(file_okay=False),
                 help="Folder of ESRGAN / Real-ESRGAN .pth files an --hr-upscaler may name (or give a path)."),
]
_COMMON_OPTIONS = list(generate.params)  # what img2img shares with generate
generate.params.extend(_HIRES_OPTIONS)


def _render(kind, request, model, output, memory, medvram, lowvram, vae_tiling, vae_tile_size, **options):
    """Open the model once, check the request before any work, generate with a progress bar, save."""
    from sdrt.models import resolve_model
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.networks.vae import choose_vae

    bundle = open_bundle(resolve_model(model, progress=_StageBar("export")))
    memory, tiles = _memory_options(memory, medvram, lowvram, vae_tiling, vae_tile_size, bundle)
    vae, vae_dir = options.pop("vae", (None, None))
    options["vae"] = choose_vae(vae, model, bundle.name, [vae_dir] if vae_dir else None)
    refiner = options.pop("refiner", None)
    hr_checkpoint = options.pop("hr_checkpoint", None)
    pipe = kind(bundle, memory=memory, vae_tiling=tiles, **options)
    if hr_checkpoint is not None:  # the hires pass's model: its own VAE, with the same device and memory options
        hr_bundle = open_bundle(resolve_model(hr_checkpoint, progress=_StageBar("export")))
        pipe.set_hires_checkpoint(kind(hr_bundle, memory=memory, vae_tiling=tiles, device=options["device"],
                                       precision=options["precision"], half_vae=options["half_vae"],
                                       embeddings_dir=options["embeddings_dir"], lora_dir=options["lora_dir"]))
        request = request.replace(hr_checkpoint_name=hr_bundle.name)
    if refiner is not None:
        from sdrt.runtime.pipeline import Pipeline

        refiner_bundle = open_bundle(resolve_model(refiner, progress=_StageBar("export")))
        pipe.set_refiner(Pipeline(refiner_bundle, memory=memory, vae_tiling=tiles, device=options["device"],
                                  precision=options["precision"], half_vae=options["half_vae"]))
        request = request.replace(refiner_checkpoint=refiner_bundle.name)
    plan = pipe.plan(request)  # every check before any work
    bar = None  # shown from the first step: an error in the conditioning stays one line

    def on_step(event):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=plan.steps * len(plan.batches), desc="sampling", unit="step", file=sys.stderr)
        bar.update(1)

    try:
        images = pipe.generate(plan, callback=on_step)
    finally:
        if bar is not None:
            bar.close()
    for result in images:
        path = png.save_png(result.image, output, result.seed, result.infotext)
        click.echo(str(path))


_RESIZE_MODES = {"0": 0, "1": 1, "2": 2, "3": 3, "just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2,
                 "latent-upscale": 3}


_FILLS = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3, "0": 0, "1": 1, "2": 2, "3": 3}


# img2img takes every option of generate but hires fix (the same click parameters), plus its own
@main.command("img2img", params=list(_COMMON_OPTIONS))
@click.option("--init-image", "init_images", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Init image (repeat for several: at most --batch-size; one serves the whole batch).")
@click.option("--denoising-strength", default=0.75, show_default=True, type=float,
              help="How much of the init image is repainted: 0 keeps it, 1 ignores it.")
@click.option("--resize-mode", default="0", show_default=True, type=click.Choice(list(_RESIZE_MODES)),
              help="Init image to the output size: 0 just resize, 1 crop and resize, 2 resize and fill, "
                   "3 just resize (latent upscale).")
@click.option("--fix-steps", "img2img_fix_steps", is_flag=True,
              help="Run exactly --steps steps at any strength (the webui's img2img_fix_steps setting).")
@click.option("--mask", default=None, type=click.Path(dir_okay=False),
              help="Inpainting mask: white is repainted (an RGBA mask with transparency: its alpha).")
@click.option("--mask-blur", default=4, show_default=True, type=int, help="Mask blur in pixels.")
@click.option("--inpainting-fill", default="original", show_default=True, type=click.Choice(list(_FILLS)),
              help="Masked content: fill, original, latent noise or latent nothing (or 0..3).")
@click.option("--inpaint-full-res", is_flag=True,
              help="Inpaint area 'only masked': repaint the masked region at the full size, then paste it back "
                   "(default: the whole picture).")
@click.option("--inpaint-full-res-padding", default=32, show_default=True, type=int,
              help="'Only masked' padding in pixels.")
@click.option("--inpainting-mask-invert", is_flag=True, help="Repaint what is not masked.")
@click.option("--inpainting-mask-weight", default=1.0, show_default=True, type=float,
              help="Inpainting models: the conditioning mask strength, 0..1 (the webui's setting).")
@click.option("--script", "script_name", default=None, type=click.Choice(["Poor man's outpainting", "Outpainting mk2"]),
              help="The webui's img2img script to run (--outpaint-pixels alone: poor man's outpainting).")
@click.option("--outpaint-pixels", default=0, show_default=True, type=int,
              help="Outpainting: grow the image by this many pixels (0: off; with --script 'Outpainting mk2' "
                   "0 means its default, 128). Poor man's: tiles of -W x -H, with --mask-blur and "
                   "--inpainting-fill; mk2: the inpainted strips at most -W wide / -H high.")
@click.option("--outpaint-direction", "outpaint_directions", multiple=True,
              type=click.Choice(["left", "right", "up", "down"]), help="Sides to grow (repeat; default: all four).")
@click.option("--outpaint-directions", "outpaint_direction_list", default=None,
              help="Sides to grow as one comma-separated list (left,right,up,down).")
@click.option("--outpaint-mask-blur", default=None, type=int,
              help="Outpainting mask blur (default: --mask-blur for poor man's, 8 for mk2).")
@click.option("--outpaint-falloff", default=1.0, show_default=True, type=float,
              help="Outpainting mk2: fall-off exponent of the matched noise (lower = more detail).")
@click.option("--outpaint-color-variation", default=0.05, show_default=True, type=float,
              help="Outpainting mk2: color variation of the matched noise, 0..1.")
@_friendly
def img2img(prompt, model, embeddings_dir, lora_dir, hypernetwork_dir, vae, vae_dir, device, precision, no_half_vae,
            output, memory, medvram, lowvram, vae_tiling, vae_tile_size, cuda_graph, init_images, resize_mode, mask,
            inpainting_fill, inpainting_mask_invert, script_name, outpaint_pixels, outpaint_directions,
            outpaint_direction_list, outpaint_mask_blur, outpaint_falloff, outpaint_color_variation, **params):
    """Generate images from init images and PROMPT (img2img; inpainting with --mask; the outpainting
    scripts with --script / --outpaint-pixels), as the webui's img2img tab."""
    from sdrt.runtime.pipeline import Img2imgParams, Img2imgPipeline
    from sdrt.runtime.pipeline.img2img import load_image
    from sdrt.runtime.pipeline.outpaint import DIRECTIONS, MK2, POOR_MAN

    images = [load_image(path) for path in init_images]
    inpainting = {"mask": load_image(mask), "inpainting_fill": _FILLS[inpainting_fill],
                  "inpainting_mask_invert": int(inpainting_mask_invert)} if mask is not None else {}
    refiner = params.pop("refiner")
    request = Img2imgParams.from_webui({"prompt": prompt, "init_images": images,
                                        "resize_mode": _RESIZE_MODES[resize_mode], **inpainting, **params})
    if outpaint_pixels and script_name is None:
        script_name = POOR_MAN
    if script_name is not None:
        if mask is not None:
            raise SdrtError("--script / --outpaint-pixels: outpainting draws its own masks: give no --mask")
        sides = list(outpaint_directions)
        if outpaint_direction_list is not None:
            sides += [d.strip() for d in outpaint_direction_list.split(",") if d.strip()]
        sides = sides or list(DIRECTIONS)
        if script_name == MK2:
            args = [None, outpaint_pixels or 128, 8 if outpaint_mask_blur is None else outpaint_mask_blur, sides,
                    outpaint_falloff, outpaint_color_variation]
        else:
            blur = request.mask_blur if outpaint_mask_blur is None else outpaint_mask_blur
            args = [outpaint_pixels or 128, blur, _FILLS[inpainting_fill], sides]
        request = request.replace(script_name=script_name, script_args=args)
    _render(Img2imgPipeline, request, model, output, memory, medvram, lowvram, vae_tiling, vae_tile_size,
            device=device, embeddings_dir=embeddings_dir, cuda_graph=cuda_graph, precision=precision,
            half_vae=not no_half_vae, lora_dir=lora_dir, hypernetwork_dir=hypernetwork_dir, vae=(vae, vae_dir),
            refiner=refiner)


@main.command("upscale")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--upscaler", default="Lanczos", show_default=True,
              help="None, Lanczos, Nearest (the webui's built-ins), or an ESRGAN / Real-ESRGAN file: its name in "
                   "--esrgan-dir or a path (exported to ONNX once; needs the export extra).")
@click.option("--scale", default=4.0, show_default=True, type=float, help="Scale by (the Extras tab's 'Resize').")
@click.option("--esrgan-dir", default="models/ESRGAN", show_default=True, type=click.Path(file_okay=False),
              help="Folder of ESRGAN / Real-ESRGAN .pth files (where webui guides put them).")
@click.option("--tile", default=192, show_default=True, type=int,
              help="ESRGAN tile size in pixels, 0 for none (the webui's ESRGAN_tile).")
@click.option("--tile-overlap", default=8, show_default=True, type=int, help="ESRGAN tile overlap (ESRGAN_tile_overlap).")
@click.option("--device", default="cpu", show_default=True, help="Where an ESRGAN graph runs (cpu, cuda[:N]).")
@click.option("-o", "--output", default="outputs/extras-images", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (NNNNN.png, as the webui's extras).")
@_friendly
def upscale_cmd(image, upscaler, scale, esrgan_dir, tile, tile_overlap, device, output):
    """Upscale IMAGE as the webui's Extras tab (single image, "Scale by")."""
    from sdrt.runtime.pipeline.img2img import load_image
    from sdrt.runtime.pipeline.upscale import PIXEL_UPSCALERS, extras_upscale

    source = load_image(image)
    if upscaler not in PIXEL_UPSCALERS:
        upscaler = _model_upscaler(upscaler, esrgan_dir, device, tile, tile_overlap)
    result, fields = extras_upscale(source, scale, upscaler)
    text = ", ".join(f"{k}: {png.quote(v)}" for k, v in fields.items()) or None
    # the source's generation parameters are kept; the webui writes the step as "postprocessing" and "extras"
    parameters = source.info.get("parameters") if isinstance(source.info.get("parameters"), str) else None
    click.echo(str(png.save_png(result, output, None, parameters, {"postprocessing": text, "extras": text})))


def _model_upscaler(name: str, folder: str, device: str, tile: int, overlap: int, field: str = "upscaler"):
    """An ESRGAN file (a path, or its name in ``folder``) as a ModelUpscaler, its graph exported once
    into the cache (keyed by the file's sha256)."""
    from sdrt.models import cache_dir, content_hash
    from sdrt.runtime.pipeline.upscale import LATENT_MODES, PIXEL_UPSCALERS, ModelUpscaler

    path = Path(name)
    if not path.is_file():
        found = [p for p in sorted(Path(folder).glob(f"{name}.*")) if p.suffix in (".pth", ".pt", ".safetensors")]
        if not found:
            known = (*LATENT_MODES, *PIXEL_UPSCALERS) if field == "hr_upscaler" else PIXEL_UPSCALERS
            raise SdrtError(f"{field}: unknown upscaler {name!r}: neither one of {', '.join(known)} nor an ESRGAN "
                            f"file ({name}.pth in {folder}, or a path)")
        path = found[0]
    if tile < 0 or overlap < 0 or (tile and overlap >= tile):
        raise SdrtError(f"--tile must be 0 or more than --tile-overlap, got {tile} and {overlap}")
    graph = cache_dir() / "upscalers" / f"{content_hash(path)[:16]}-sdrt{__version__}.onnx"
    if not graph.exists():
        try:
            from sdrt.export.esrgan import export_esrgan
        except ImportError as e:
            raise SdrtError(f"ESRGAN files are exported to ONNX once, which needs the export extra (missing {e.name}): "
                            "pip install 'sdrt[export]'") from None
        export_esrgan(path, graph)
    scale = json.loads(graph.with_suffix(".json").read_text())["scale"]
    return ModelUpscaler(path.stem, graph, scale, device, tile, overlap)


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--precision", "precisions", multiple=True, type=click.Choice(list(PRECISIONS)),
              help="Also write reduced-precision graphs (repeatable): int8 = the CPU UNet's MatMuls quantized "
              "dynamically; int8-static = its convolutions and MatMuls, activation ranges calibrated at export; "
              "mixed = per component the fastest of those whose own effect held, int8-static with its least "
              "faithful layers kept in fp32 where whole it did not (searched on the final image); "
              "each measured against fp32 and the CPU default at >= 35 dB; fp16 = every component for --device "
              "cuda. fp32 is always written.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Also write each component's CPU-optimized graph (fused GroupNorm+SiLU, attention, GELU).")
@click.option("--prediction", type=click.Choice(["eps", "v"]), default=None,
              help="The model's prediction type, for files the detection cannot tell (default: SD 2.x files "
              "are probed as the webui does: 512 eps base or 768-v; other models say theirs).")
@_friendly
def export_cmd(checkpoint, out_dir, precisions, overwrite, optimize, prediction):
    """Export CHECKPOINT (.safetensors, .ckpt or a diffusers folder; SD 1.x, SD 2.x, SDXL) to a bundle in OUT_DIR."""
    export_checkpoint = _export_api().export_checkpoint
    path = export_checkpoint(checkpoint, out_dir, overwrite=overwrite, progress=_StageBar("export"),
                             optimize=optimize, precisions=("fp32", *precisions), prediction=prediction)
    click.echo(str(path))
    for kind, records in json.loads((Path(path) / "sdrt.json").read_text()).get("precisions", {}).items():
        for name, r in records.items():
            click.echo(_precision_line(kind, name, r))


def _precision_line(kind: str, name: str, record: dict) -> str:
    """One line on an exported precision: its measured fidelity against fp32 and whether it is the default."""
    f = record.get("fidelity")
    if f is None:
        measured = f"not measured at export (needs the device: sdrt verify --device {kind} --precision {name})"
    else:
        db = "identical" if f["image_psnr"] is None else f"{f['image_psnr']} dB"
        measured = f"final image {db} vs fp32, max abs {f['image_max_abs']}/255"
    use = f"the {kind} default" if record["default"] else f"opt-in (--precision {name})"
    if name == "mixed":  # what each component runs, chosen by its own measured effect
        chosen = ", ".join(f"{c} {v['precision']}" + (f" ({v['layers']['int8']} of {v['layers']['of']} layers in int8)"
                                                      if "layers" in v else "")
                           for c, v in record["components"].items() if v["precision"] != "fp32")
        if not chosen:
            return f"mixed ({kind}): no component's variant held {record['min_default_psnr']} dB alone: fp32"
        return f"mixed ({kind}, {chosen}): {measured}; {use}"
    return f"{name} ({kind}): {measured}; {use}"


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", required=True, type=click.Path(exists=True), help="The source checkpoint.")
@click.option("--prompt", default="a red circle on a blue background", show_default=True)
@click.option("--negative-prompt", default="", help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--sampler", default="Euler a", show_default=True)
@click.option("--cfg-scale", default=7.0, show_default=True, type=float)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("-W", "--width", default=None, type=int)
@click.option("-H", "--height", default=None, type=int)
@click.option("--device", default="cpu", show_default=True, help="Device the bundle's graphs run on.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["auto", *PRECISIONS]),
              help="Precision of the bundle's graphs (the reference stays fp32).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def verify(bundle, reference, prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, device,
           precision, as_json):
    """Compare BUNDLE with the PyTorch reference: max abs difference and PSNR per component."""
    try:
        from sdrt.export.reference import verify_bundle
    except ImportError as e:
        raise SdrtError(f"verify runs the PyTorch reference, which needs the export extra (missing {e.name}): "
                        "pip install 'sdrt[export]'") from None
    from sdrt.runtime.pipeline.txt2img import GenerationParams

    params = GenerationParams(prompt, negative_prompt, steps, sampler, "Automatic", cfg_scale, seed, width, height)
    report = verify_bundle(bundle, reference, params, device=device, precision=precision)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'stage':<14}{'max abs':>12}{'PSNR dB':>10}")
    for stage, r in report["stages"].items():
        click.echo(f"{stage:<14}{r['max_abs']:>12.3g}{r['psnr']:>10.1f}")


@main.command()
@click.option("-m", "--model", "models", multiple=True,
              help="Bundle, diffusers folder or checkpoint to measure (repeatable); default: the built-in workloads.")
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True),
              help="The checkpoint each --model bundle was exported from, for the torch peers (in --model order).")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(["sd15-random", "tiny-random", "embedded"]),
              help="Built-in workloads (repeatable; default without --model: sd15-random and embedded).")
@click.option("--size", default=None, type=int, help="Square image size (default: 512 for sd15-random, else the model's).")
@click.option("--steps", default="20,50", show_default=True, help="End-to-end step counts, comma-separated.")
@click.option("--measure", default="text_encoder,unet_step,vae_decode,end_to_end", show_default=True,
              help="What to measure, comma-separated.")
@click.option("--backends", "backend_names", default=None, help="Backends to run, comma-separated (default: all; see --list).")
@click.option("--repeats", default=3, show_default=True, type=int, help="Timed runs per measurement (the median is kept).")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed runs first.")
@click.option("--e2e-repeats", default=None, type=int, help="Timed end-to-end runs (default: --repeats).")
@click.option("--e2e-warmup", default=None, type=int, help="Untimed end-to-end runs (default: --warmup).")
@click.option("--threads", default=0, show_default=True, type=int, help="CPU threads per backend (0: library default).")
@click.option("--compile/--no-compile", "use_compile", default=True, show_default=True,
              help="Include the torch.compile peer (compiling takes minutes on a CPU).")
@click.option("--sampler", default="Euler a", show_default=True, help="Sampler of the end-to-end runs.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--cfg-scale", default=7.0, show_default=True, type=float)
@click.option("--note", default=None, help="Conditions kept with each record (e.g. 'machine shared with other jobs').")
@click.option("-o", "--results", default=None, type=click.Path(dir_okay=False),
              help="Records file to append to (default: RESULTS_DIR/bench-<device>.jsonl).")
@click.option("--results-dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Where records go and where --report reads them and writes its files.")
@click.option("--list", "list_only", is_flag=True, help="List the backends and whether each runs here.")
@click.option("--report", is_flag=True, help="Render REPORT.md, render_time.png and sampler_steps.png from the records.")
@click.option("--grid/--no-grid", default=True, show_default=True,
              help="With --report: the sampler vs steps grid (embedded model, or the first --model).")
@_friendly
def bench(models, references, workloads, size, steps, measure, backend_names, repeats, warmup, e2e_repeats,
          e2e_warmup, threads, use_compile, sampler, seed, cfg_scale, note, results, results_dir, list_only, report,
          grid):
    """Render times per device and backend against the PyTorch reference (records in RESULTS_DIR)."""
    from sdrt.benchmarks import harness as b
    from sdrt.models import default_model_path, is_bundle, resolve_model

    if report:
        grid_bundle = None
        if grid and models:
            grid_bundle = resolve_model(models[0], progress=_StageBar("export"))
        elif grid and is_bundle(default_model_path()):
            grid_bundle = default_model_path()
        elif grid:
            click.echo("no sampler grid: the embedded model is missing from this installation; pass --model", err=True)
        done = b.write_report(b.read_records([results_dir]), results_dir, grid_bundle=grid_bundle,
                              progress=_StageBar("sampler grid"))
        for path in done["written"]:
            click.echo(str(path))
        for line in done["notes"]:
            click.echo(line, err=True)
        return
    chosen = b.select_backends(b.backends(compile=use_compile), b.parse_list(backend_names))
    if list_only:
        for x in chosen:
            click.echo(f"{x.key:<28}{x.device:<6}{x.note or 'runs here'}")
        return
    settings = b.BenchSettings(measure=tuple(b.parse_list(measure)), steps=tuple(b.parse_list(steps, int)),
                               repeats=repeats, warmup=warmup, e2e_repeats=e2e_repeats, e2e_warmup=e2e_warmup,
                               threads=threads, sampler=sampler, seed=seed, cfg_scale=cfg_scale, note=note)
    settings.tasks()
    names = workloads or (() if models else ("sd15-random", "embedded"))
    chosen_workloads, notes = b.resolve_workloads(names, models, references, size=size,
                                                  progress=_StageBar("preparing"))
    for line in notes:
        click.echo(line, err=True)
    if not chosen_workloads:
        raise SdrtError("no workload to measure")
    writer = b.RecordWriter(results or Path(results_dir) / f"bench-{b.device_slug()}.jsonl")
    bar = tqdm(desc="bench", unit="record", file=sys.stderr)

    def progress(event):
        bar.total = event["total"]
        bar.n = event["done"]
        bar.set_postfix_str(event["label"])
        bar.refresh()

    try:
        written = b.run_bench(chosen_workloads, chosen, settings, writer, progress=progress)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"interrupted: kept the {writer.count} finished records in {writer.path}", err=True)
        sys.exit(130)
    bar.close()
    click.echo(b.render_markdown(written))
    click.echo(f"{writer.count} records appended to {writer.path}")


def _memory_options(memory, medvram, lowvram, vae_tiling, vae_tile_size, bundle):
    """(memory mode, VAE tiles or None) from --memory / --medvram / --lowvram / --vae-tiling."""
    from sdrt.runtime.pipeline.tiling import TileSpec

    chosen = {m for m, on in (("med", medvram), ("low", lowvram), (memory, memory is not None)) if on}
    if len(chosen) > 1:
        raise SdrtError(f"conflicting memory modes: {', '.join(sorted(chosen))} (give one of --memory, --medvram, "
                        "--lowvram)")
    mode = chosen.pop() if chosen else "normal"
    if vae_tiling is None:
        vae_tiling = mode == "low"
    tiles = TileSpec.from_pixels(vae_tile_size, bundle.vae_scale_factor) if vae_tiling else None
    return mode, tiles


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("-W", "--width", default=None, type=int, help="Image width to build for (default: the model's).")
@click.option("-H", "--height", default=None, type=int, help="Image height to build for (default: the model's).")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per batch to build for.")
@click.option("--min-width", default=None, type=int, help="Smallest width (a dynamic range; --width is the optimum).")
@click.option("--max-width", default=None, type=int, help="Largest width.")
@click.option("--min-height", default=None, type=int, help="Smallest height.")
@click.option("--max-height", default=None, type=int, help="Largest height.")
@click.option("--min-batch", default=None, type=int, help="Smallest batch.")
@click.option("--max-batch", default=None, type=int, help="Largest batch.")
@click.option("--prompt-chunks", default=1, show_default=True, type=int,
              help="75-token prompt chunks to build for (the UNet's sequence is 77 per chunk).")
@click.option("--max-prompt-chunks", default=None, type=int, help="Most prompt chunks (a dynamic range).")
@click.option("--vae-tile-size", default=None, type=int,
              help="Build the VAE decoder for tiles of this many pixels (generate --vae-tiling).")
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp16", "fp32"]),
              help="Engine precision.")
@click.option("--device", default="trt", show_default=True,
              help="trt[:N]: sdrt's engines; tensorrt[:N]: ONNX Runtime's TensorRT EP cache.")
@click.option("--components", default=None,
              help="Components to build, comma-separated (default: the bundle's text encoders, UNet and VAE decoder).")
@click.option("--force", is_flag=True, help="Rebuild engines that are valid in the cache.")
@_friendly
def build(bundle, width, height, batch, min_width, max_width, min_height, max_height, min_batch, max_batch,
          prompt_chunks, max_prompt_chunks, vae_tile_size, precision, device, components, force):
    """Build TensorRT engines for BUNDLE into BUNDLE/engines (keyed by GPU, TensorRT, graph, precision, shapes)."""
    from sdrt.runtime.backends import check_device, ort_tensorrt, profiles, tensorrt
    from sdrt.runtime.bundle import open_bundle

    b = open_bundle(bundle)
    kind, index = check_device(device)
    if kind not in ("trt", "tensorrt"):
        raise SdrtError(f"sdrt build makes TensorRT engines: --device trt[:N] or tensorrt[:N], not {device!r}")
    w, h = b.default_size
    shapes = profiles.build_shapes(
        width=profiles.dim_range("width", width if width or min_width or max_width else w, min_width, max_width),
        height=profiles.dim_range("height", height if height or min_height or max_height else h, min_height,
                                 max_height),
        batch=profiles.dim_range("batch", batch, min_batch, max_batch),
        chunks=profiles.dim_range("prompt chunks", prompt_chunks, None, max_prompt_chunks),
        vae_tile=vae_tile_size, vae_scale_factor=b.vae_scale_factor)
    names = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None

    def on_event(event):
        if event["event"] == "waiting":
            click.echo(f"{event['component']}: waiting for another process building it", err=True)
        elif event["event"] == "building":
            click.echo(f"{event['component']}: building (minutes on a large model)", err=True)

    build_fn = tensorrt.build_engines if kind == "trt" else ort_tensorrt.build_ep_engines
    results = build_fn(b, shapes, precision=precision, components=names, force=force, device_id=index,
                       on_event=on_event)
    for r in results:
        why = f" ({r.reason})" if r.reason else ""
        click.echo(f"{r.component:<13}{r.status + why:<12}{r.seconds:8.1f} s  {r.path}")
        for name, (lo, opt, hi) in r.shapes.items():
            click.echo(f"  {name}: min {'x'.join(map(str, lo))}, opt {'x'.join(map(str, opt))}, "
                       f"max {'x'.join(map(str, hi))}")


@main.command()
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False))
@_friendly
def info(bundle):
    """Devices, execution providers, and a bundle's manifest."""
    import onnxruntime as ort

    click.echo(f"sdrt {__version__}, onnxruntime {ort.__version__}")
    click.echo(f"execution providers: {', '.join(ort.get_available_providers())}")
    if bundle:
        from sdrt.runtime.bundle import open_bundle
        from sdrt.runtime.precision import describe, resolve_precision

        b = open_bundle(bundle)
        click.echo(json.dumps(b.manifest, indent=2))
        # what `--precision auto` draws with on this machine's CPU (the PNG text's Precision field)
        click.echo(f"cpu --precision auto: {describe(b, 'cpu', resolve_precision(b, 'cpu', 'auto'))}")


def _export_api():
    try:
        from sdrt.export import write as export_bundle
    except ImportError as e:
        raise SdrtError(f"export needs the export extra (missing {e.name}): install torch==2.13.0 (CPU) "
                        "first, then pip install 'sdrt[export]'") from None
    return export_bundle


from sdrt.serve import serve  # FastAPI loads only when `sdrt serve` runs

main.add_command(serve)

if __name__ == "__main__":
    main()
