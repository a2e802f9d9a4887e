"""``sdrt serve``: the webui's HTTP API (``sdrt.runtime.serve``) on uvicorn.

This module gives the server its model catalog (the embedded model, and the bundles and
checkpoints under ``--ckpt-dir``) and its loader (``sdrt.Pipeline``: checkpoints are exported into
the cache once); FastAPI and uvicorn are imported only when the command runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import PRECISIONS

log = logging.getLogger(__name__)


def catalog(ckpt_dir: Path) -> list:
    """The embedded model first, then every bundle and checkpoint file under ``ckpt_dir``."""
    from sdrt.models import CHECKPOINT_SUFFIXES, default_model_path, is_bundle
    from sdrt.runtime.serve import ModelEntry

    def bundle_entry(path: Path, name: str):
        from sdrt.runtime.bundle import open_bundle

        try:
            b = open_bundle(path)
        except SdrtError as e:
            log.warning("not listed: %s", e)
            return None
        title = f"{name} [{b.model_hash}]" if b.model_hash else name
        return ModelEntry(title, name, str(path), b.model_hash, b.schema.source.sha256)

    entries = []
    if is_bundle(default_model_path()):
        entries.append(bundle_entry(default_model_path(), "sdrt-default"))
    for root, dirs, files in os.walk(ckpt_dir) if ckpt_dir.is_dir() else ():
        here = Path(root)
        dirs.sort()
        for d in list(dirs):
            if is_bundle(here / d):
                dirs.remove(d)  # a bundle is one model: its files are not listed
                entries.append(bundle_entry(here / d, (here / d).relative_to(ckpt_dir).as_posix()))
        for f in sorted(files):
            if f.lower().endswith(CHECKPOINT_SUFFIXES):
                rel = (here / f).relative_to(ckpt_dir).as_posix()
                # The webui's title holds the short hash once it is known; sdrt hashes on first load
                entries.append(ModelEntry(rel, rel.rsplit(".", 1)[0], str(here / f)))
    return [e for e in entries if e is not None]


def _auth(value: str | None) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    accounts = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SdrtError("--api-auth takes user:password pairs separated by commas")
        accounts.append((user, password))
    return tuple(accounts)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--listen", is_flag=True, help="Listen on all interfaces (0.0.0.0), as the webui's flag.")
@click.option("--api-auth", default=None, help="user:password[,user2:password2]: HTTP Basic auth on every route.")
@click.option("--cors-allow-origins", default=None, help="Origins allowed by CORS, comma-separated (default: none).")
@click.option("--ckpt-dir", default="models/Stable-diffusion", show_default=True, type=click.Path(file_okay=False),
              help="Bundles and checkpoints clients may select (the embedded model is always listed).")
@click.option("--model", default=None, help="The model to start with: a title or name from /sdapi/v1/sd-models.")
@click.option("--queue-size", default=16, show_default=True, type=int, help="Jobs that may wait; more get 503.")
@click.option("--max-steps", default=150, show_default=True, type=int)
@click.option("--max-batch", default=8, show_default=True, type=int, help="Most images per request (batch x count).")
@click.option("--max-pixels", default=2048 * 2048, show_default=True, type=int, help="Most width x height.")
@click.option("--max-body", default=32 << 20, show_default=True, type=int, help="Most bytes in a request body.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N], trt[:N], ... (as sdrt generate).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", *PRECISIONS]))
def serve(host, port, listen, api_auth, cors_allow_origins, ckpt_dir, model, queue_size, max_steps, max_batch,
          max_pixels, max_body, device, precision):
    """Serve the webui's HTTP API (/sdapi/v1/*, docs at /docs) on 127.0.0.1:7860."""
    try:
        _serve(host, port, listen, api_auth, cors_allow_origins, ckpt_dir, model, queue_size, max_steps, max_batch,
               max_pixels, max_body, device, precision)
    except SdrtError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def _serve(host, port, listen, api_auth, cors_allow_origins, ckpt_dir, model, queue_size, max_steps, max_batch,
           max_pixels, max_body, device, precision):
    try:
        import uvicorn

        from sdrt.runtime.serve import ServeConfig, create_app
    except ImportError as e:
        raise SdrtError(f"sdrt serve needs the serve extra (missing {e.name}): pip install 'sdrt[serve]'") from None
    from sdrt.models import resolve_model
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.pipeline import Img2imgPipeline, Pipeline

    def load(entry):
        bundle = open_bundle(resolve_model(entry.filename))
        kind = Img2imgPipeline if bundle.has("vae_encoder") else Pipeline
        return kind(bundle, device=device, precision=precision)

    for name, value in (("--queue-size", queue_size), ("--max-steps", max_steps), ("--max-batch", max_batch),
                        ("--max-pixels", max_pixels), ("--max-body", max_body)):
        if value < 1:
            raise SdrtError(f"{name} must be at least 1, got {value}")
    folder = Path(ckpt_dir)
    flags = {"api": True, "nowebui": True, "listen": listen, "host": host, "port": port,
             "api_auth": "<set>" if api_auth else None,  # the webui shows the credentials; sdrt does not
             "cors_allow_origins": cors_allow_origins, "ckpt_dir": str(folder), "queue_size": queue_size,
             "max_steps": max_steps, "max_batch": max_batch, "max_pixels": max_pixels, "max_body": max_body,
             "device": device, "precision": precision}
    config = ServeConfig(
        list_models=lambda: catalog(folder),
        load=load,
        model=model, queue_size=queue_size, max_steps=max_steps, max_batch=max_batch, max_pixels=max_pixels,
        max_body_bytes=max_body, api_auth=_auth(api_auth),
        cors_allow_origins=tuple(o.strip() for o in (cors_allow_origins or "").split(",") if o.strip()),
        cmd_flags=flags)
    app = create_app(config)
    uvicorn.run(app, host="0.0.0.0" if listen else host, port=port, log_level="info")
