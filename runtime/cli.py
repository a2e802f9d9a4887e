"""The ``sdrt`` command line (click). Names and defaults follow the AUTOMATIC1111 webui."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click
from tqdm import tqdm

from sdrt.runtime import __version__
from sdrt.runtime.errors import SdrtError


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
        if self.bar is None:
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
@click.option("--sampler", default="Euler a", show_default=True, help="Sampler name as in the webui.")
@click.option("--scheduler", "--schedule-type", "scheduler", default="Automatic", show_default=True,
              help="Schedule type as in the webui.")
@click.option("--cfg-scale", default=7.0, show_default=True, type=float, help="Classifier-free guidance scale.")
@click.option("--seed", default=-1, show_default=True, type=int, help="Seed; -1 picks one at random.")
@click.option("-W", "--width", default=None, type=int, help="Width in pixels (default: the model's).")
@click.option("-H", "--height", default=None, type=int, help="Height in pixels (default: the model's).")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Images per batch.")
@click.option("--batch-count", default=1, show_default=True, type=int, help="Number of batches.")
@click.option("--clip-skip", default=1, show_default=True, type=int, help="CLIP skip (webui 'Clip skip').")
@click.option("--rng", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu", "nv"]),
              help="Noise source, as the webui's 'Random number generator source'.")
@click.option("--ensd", default=0, show_default=True, type=int, help="Eta noise seed delta.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32"]),
              help="Numeric precision of the graphs.")
@click.option("-o", "--output", default="outputs", show_default=True, type=click.Path(file_okay=False),
              help="Output folder.")
@_friendly
def generate(prompt, negative_prompt, model, steps, sampler, scheduler, cfg_scale, seed, width, height,
             batch_size, batch_count, clip_skip, rng, ensd, device, precision, output):
    """Generate images from PROMPT (txt2img)."""
    from sdrt.runtime.models import resolve_model
    from sdrt.runtime.pipeline import GenerationParams, Pipeline
    from sdrt.runtime.png import save_png

    params = GenerationParams(prompt, negative_prompt, steps, sampler, scheduler, cfg_scale, seed, width, height,
                              batch_size, batch_count, clip_skip, rng, ensd)
    bundle = resolve_model(model, progress=_StageBar("export"))
    pipe = Pipeline(bundle, device=device)
    pipe.check(params)
    total = steps * batch_count
    with tqdm(total=total, desc="sampling", unit="step", file=sys.stderr) as bar:
        images = pipe.generate(params, callback=lambda e: bar.update(1))
    for result in images:
        path = save_png(result.image, output, result.seed, result.infotext)
        click.echo(str(path))


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32"]),
              help="Weight precision of the graphs.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@_friendly
def export_cmd(checkpoint, out_dir, precision, overwrite):
    """Export CHECKPOINT (.safetensors, .ckpt or a diffusers folder) to a bundle in OUT_DIR."""
    export_checkpoint = _export_api().export_checkpoint
    path = export_checkpoint(checkpoint, out_dir, overwrite=overwrite, progress=_StageBar("export"))
    click.echo(str(path))


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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def verify(bundle, reference, prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, as_json):
    """Compare BUNDLE with the PyTorch reference: max abs difference and PSNR per component."""
    try:
        from sdrt.export.reference import verify_bundle
    except ImportError as e:
        raise SdrtError(f"verify runs the PyTorch reference, which needs the export extra (missing {e.name}): "
                        "pip install 'sdrt[export]'") from None
    from sdrt.runtime.pipeline import GenerationParams

    params = GenerationParams(prompt, negative_prompt, steps, sampler, "Automatic", cfg_scale, seed, width, height)
    report = verify_bundle(bundle, reference, params)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'stage':<14}{'max abs':>12}{'PSNR dB':>10}")
    for stage, r in report["stages"].items():
        click.echo(f"{stage:<14}{r['max_abs']:>12.3g}{r['psnr']:>10.1f}")


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

        b = open_bundle(bundle)
        click.echo(json.dumps(b.manifest, indent=2))


def _export_api():
    try:
        from sdrt.export import bundle as export_bundle
    except ImportError as e:
        raise SdrtError(f"export needs the export extra (missing {e.name}): install torch==2.13.0 (CPU) "
                        "first, then pip install 'sdrt[export]'") from None
    return export_bundle


if __name__ == "__main__":
    main()
