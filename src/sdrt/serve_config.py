"""The configuration of ``sdrt serve`` from its options: the model catalog (the embedded model, the
bundles and checkpoints under ``--ckpt-dir``), the loader (``sdrt.Pipeline``: checkpoints are
exported into the cache once; ``--embeddings-dir``, ``--lora-dir``, ``--vae-dir``) and the limits.
Shared by the uvicorn server (``sdrt.serve``) and its Ray Serve replicas (``sdrt.serve_ray``), which
build it from the same plain options in their own processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdrt.runtime.errors import SdrtError

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


def parse_auth(value: str | None) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    accounts = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SdrtError("--api-auth takes user:password pairs separated by commas")
        accounts.append((user, password))
    return tuple(accounts)


def check_options(options: dict) -> None:
    """One-line errors for server options that cannot work, before anything loads."""
    for name in ("queue_size", "max_steps", "max_batch", "max_pixels", "max_body"):
        if options[name] < 1:
            raise SdrtError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    parse_auth(options["api_auth"])


def server_config(options: dict):
    """The ``ServeConfig`` of ``sdrt serve``'s options (plain values: a Ray replica builds its own
    from the same dict in its own process)."""
    from sdrt.models import resolve_model
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.networks.apply import Library
    from sdrt.runtime.networks.hypernet import HypernetLibrary
    from sdrt.runtime.networks.vae import choose_vae, vae_files
    from sdrt.runtime.pipeline import Img2imgPipeline, Pipeline
    from sdrt.runtime.serve import ServeConfig

    device, precision = options["device"], options["precision"]
    embeddings = options.get("embeddings_dir")
    lora_dir = Path(options.get("lora_dir") or "models/Lora")
    hypernetwork_dir = Path(options.get("hypernetwork_dir") or "models/hypernetworks")
    vae_dirs = [Path(options.get("vae_dir") or "models/VAE")]

    def vaes() -> list[str]:
        # names relative to the folder: a client never names a path
        return [p.relative_to(vae_dirs[0]).as_posix() for p in vae_files(vae_dirs)]

    def load(entry, vae: str = "Automatic"):
        bundle = open_bundle(resolve_model(entry.filename))
        kind = Img2imgPipeline if bundle.has("vae_encoder") else Pipeline
        folder = embeddings if embeddings and Path(embeddings).is_dir() else None
        if vae not in ("Automatic", "None"):
            vae = str(vae_dirs[0] / vae)  # one of vaes(), checked by the server
        # Automatic: the webui's rule, beside a checkpoint file or by the model's name in --vae-dir
        vae_file = choose_vae(vae, entry.filename, entry.model_name, vae_dirs)
        return kind(bundle, device=device, precision=precision, embeddings_dir=folder, lora_dir=lora_dir,
                    hypernetwork_dir=hypernetwork_dir, vae=vae_file)

    def loras() -> list[dict]:
        return [{"name": e.name, "alias": e.alias, "path": e.path.relative_to(lora_dir).as_posix(),
                 "metadata": e.metadata}
                for name, e in sorted(Library(lora_dir).scan().items()) if name == e.name]

    def hypernetworks() -> list[dict]:
        # the webui's {name, path}; the path relative to the folder, as /loras gives it
        return [{"name": name, "path": path.relative_to(hypernetwork_dir).as_posix()}
                for name, path in HypernetLibrary(hypernetwork_dir).scan().items()]

    folder = Path(options["ckpt_dir"])
    flags = {"api": True, "nowebui": True, **{k: v for k, v in options.items() if k != "model"},
             "api_auth": "<set>" if options["api_auth"] else None}  # the webui shows the credentials; sdrt does not
    return ServeConfig(
        list_models=lambda: catalog(folder),
        load=load,
        model=options["model"], queue_size=options["queue_size"], max_steps=options["max_steps"],
        max_batch=options["max_batch"], max_pixels=options["max_pixels"], max_body_bytes=options["max_body"],
        api_auth=parse_auth(options["api_auth"]),
        cors_allow_origins=tuple(o.strip() for o in (options["cors_allow_origins"] or "").split(",") if o.strip()),
        cmd_flags=flags, list_loras=loras, list_vaes=vaes, list_hypernetworks=hypernetworks)
