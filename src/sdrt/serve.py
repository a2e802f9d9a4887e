"""``sdrt serve``: the webui's HTTP API (``sdrt.runtime.serve``) on uvicorn, or on Ray Serve (``--ray``).

The command checks its options and hands them to ``sdrt.serve_config`` (the model catalog, the
loader, the limits); FastAPI and uvicorn are imported only when the command runs.
"""

from __future__ import annotations

import sys

import click

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import PRECISIONS
from sdrt.serve_config import check_options, server_config


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--listen", is_flag=True, help="Listen on all interfaces (0.0.0.0), as the webui's flag.")
@click.option("--api-auth", default=None, help="user:password[,user2:password2]: HTTP Basic auth on every route.")
@click.option("--cors-allow-origins", default=None, help="Origins allowed by CORS, comma-separated (default: none).")
@click.option("--ckpt-dir", default="models/Stable-diffusion", show_default=True, type=click.Path(file_okay=False),
              help="Bundles and checkpoints clients may select (the embedded model is always listed).")
@click.option("--model", default=None, help="The model to start with: a title or name from /sdapi/v1/sd-models.")
@click.option("--embeddings-dir", default="embeddings", show_default=True, type=click.Path(file_okay=False),
              help="Textual inversion embeddings prompts may name (used when the folder exists, as the webui's).")
@click.option("--lora-dir", default="models/Lora", show_default=True, type=click.Path(file_okay=False),
              help="LoRA / LyCORIS files <lora:name:...> tags may name.")
@click.option("--hypernetwork-dir", default="models/hypernetworks", show_default=True,
              type=click.Path(file_okay=False), help="Hypernetwork files (.pt) <hypernet:name:...> tags may name.")
@click.option("--vae-dir", default="models/VAE", show_default=True, type=click.Path(file_okay=False),
              help="VAE files the sd_vae option may select (and its Automatic rule searches).")
@click.option("--queue-size", default=16, show_default=True, type=int, help="Jobs that may wait; more get 503.")
@click.option("--max-steps", default=150, show_default=True, type=int)
@click.option("--max-batch", default=8, show_default=True, type=int, help="Most images per request (batch x count).")
@click.option("--max-pixels", default=2048 * 2048, show_default=True, type=int, help="Most width x height.")
@click.option("--max-body", default=32 << 20, show_default=True, type=int, help="Most bytes in a request body.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N], trt[:N], ... (as sdrt generate).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", *PRECISIONS]))
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve on Ray Serve: replicas of this server behind Ray's HTTP proxy (docs/SERVE.md).")
@click.option("--replicas", default=1, show_default=True, type=int,
              help="With --ray: replicas to start (with --max-replicas: the fewest the autoscaler keeps).")
@click.option("--max-replicas", default=None, type=int,
              help="With --ray: autoscale up to this many replicas on the queue length.")
@click.option("--ray-address", default=None,
              help="With --ray: the cluster to join (default: RAY_ADDRESS, else a local one started here).")
def serve(use_ray, replicas, max_replicas, ray_address, **options):
    """Serve the webui's HTTP API (/sdapi/v1/*, docs at /docs) on 127.0.0.1:7860."""
    try:
        _serve(options, use_ray, replicas, max_replicas, ray_address)
    except SdrtError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def _serve(options: dict, ray: bool = False, replicas: int = 1, max_replicas: int | None = None,
           ray_address: str | None = None) -> None:
    try:
        import uvicorn

        from sdrt.runtime.serve import create_app
    except ImportError as e:
        raise SdrtError(f"sdrt serve needs the serve extra (missing {e.name}): pip install 'sdrt[serve]'") from None
    options = {k: str(v) if k.endswith("_dir") else v for k, v in options.items()}
    check_options(options)
    if ray:
        from sdrt.serve_ray import run

        run(options, replicas=replicas, max_replicas=max_replicas, address=ray_address)
        return
    app = create_app(server_config(options))
    uvicorn.run(app, host="0.0.0.0" if options["listen"] else options["host"], port=options["port"], log_level="info")
