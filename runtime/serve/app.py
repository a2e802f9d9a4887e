"""The FastAPI application: the webui's ``/sdapi/v1`` routes, payloads and responses.

Field names, response shapes and route names follow the AUTOMATIC1111 webui 1.10's API
(``modules/api/api.py``, ``models.py``). Deliberate differences, each for safety or because sdrt
lacks the feature: a wrong payload is a 422 naming the field (the webui often answers 500);
``img2img`` (inpainting with ``mask``) answers 501 for a bundle without a VAE encoder;
options are only the settings sdrt acts on (others are a 422 naming them); ``cmd-flags`` never
shows the ``--api-auth`` credentials; ``/progress`` adds the queue (``queue_pending``, and
``queue_position`` for ``?id_task=``); the body size is capped (413); a NaN, Infinity or an
integer beyond 64 bits anywhere in a payload is a 422.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin
from sdrt.runtime import __version__, png
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import GenerationParams, Img2imgParams, Pipeline, Plan
from sdrt.runtime.pipeline.outpaint import SCRIPTS, grown_size
from sdrt.runtime.pipeline.txt2img import GeneratedImage, short_title
from sdrt.runtime.pipeline.upscale import LATENT_MODES, PIXEL_UPSCALERS
from sdrt.runtime.sampling import SAMPLERS, SCHEDULES
from sdrt.runtime.serve.schema import openapi_body, request_schema
from sdrt.runtime.serve.worker import Job, QueueFull, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One ``/sd-models`` item, named as the webui's (``title`` is what options select)."""

    title: str
    model_name: str
    filename: str
    hash: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RequestModels:
    """The models a request names besides the server's own (``Server.request_models``)."""

    refiner: Pipeline | None = None  # refiner_checkpoint
    hires: Pipeline | None = None  # hr_checkpoint_name: hires fix's second pass


@dataclass
class ServeConfig:
    # Every model a client may select (the configured folders only; a client never names a path)
    list_models: Callable[[], list[ModelEntry]]
    # The pipeline for an entry and an sd_vae choice ("Automatic", "None" or a name list_vaes gives),
    # exporting a checkpoint into the cache on first use
    load: Callable[[ModelEntry, str], Pipeline]
    model: str | None = None  # the title or name to start with; None: the first listed
    queue_size: int = 16
    max_steps: int = 150
    max_batch: int = 8  # images per request: batch_size x n_iter
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 20000
    max_body_bytes: int = 32 << 20
    api_auth: tuple[tuple[str, str], ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    cmd_flags: dict = field(default_factory=dict)
    # The webui's /loras items ({"name", "alias", "path", "metadata"}) and /sd-vae names
    list_loras: Callable[[], list[dict]] = list
    list_hypernetworks: Callable[[], list[dict]] = list
    list_vaes: Callable[[], list[str]] = list


# The webui settings sdrt acts on, with its defaults (GenerationParams: override_settings);
# sdrt's noise source default is the CPU generator (the webui's is GPU)
_SETTINGS = {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "randn_source": "CPU",
             "pad_cond_uncond": True, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
# The webui's live preview settings (its defaults): a preview of the running job's current
# prediction every n steps, decoded with the model's own VAE (the webui's "Full" preview method; its
# default "Approx NN" is a separate network sdrt does not ship), the batch's first image only
_PREVIEW = {"live_previews_enable": True, "show_progress_every_n_steps": 10}
_VAE_CHOICES = ("Automatic", "None")  # and the names of --vae-dir's files
_NO_ENCODER = "img2img needs a VAE encoder, which this model's bundle lacks"
# Request fields whose JSON form differs from the parameter dataclasses' (images come as base64)
_BASE64 = {"type": "string", "contentEncoding": "base64"}
_IMG2IMG_FIELDS = {"init_images": {"type": "array", "items": _BASE64, "minItems": 1},
                   "mask": {"type": ["string", "null"], "contentEncoding": "base64"}}
_OPENAI_FIELDS = {"n": {"type": "integer", "default": 1}, "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
                  "response_format": {"enum": ["b64_json"]}, "model": {"type": "string"}, "user": {"type": "string"}}


def _error(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    # The webui's error body: {"error", "detail", "body", "errors"}
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": detail}, status, headers=headers)


def _encode_png(image: GeneratedImage) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.infotext)
    buffer = io.BytesIO()
    image.image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_image(data, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """A base64 image (a ``data:`` URL too). With ``max_pixels`` its pixels are decoded, once its
    header says it is not larger; without, only the header and the chunks before the pixels are
    read (the parameters text), so a small body never expands into a huge image in memory."""
    if not isinstance(data, str) or not data:
        raise SdrtError(f"{what} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SdrtError(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - any undecodable image is the client's error
        raise SdrtError(f"{what} is not a readable image (PNG, JPEG, WebP)") from None
    if max_pixels is not None:
        if image.width * image.height > max_pixels:
            raise SdrtError(f"{what} is {image.width}x{image.height}, over {max_pixels} pixels")
        try:
            image.load()
        except Exception:  # noqa: BLE001
            raise SdrtError(f"{what} is a damaged image") from None
    return image


def _check_numbers(payload) -> None:
    """Refuse NaN / Infinity (Python's JSON reads them; the JSON standard has no such numbers) and
    integers beyond 64 bits, anywhere in a payload, naming the field."""
    todo = [("", payload)]
    while todo:  # a loop, not recursion: a deeply nested body is no stack overflow
        where, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise SdrtError(f"{where}: NaN and Infinity are not JSON numbers")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise SdrtError(f"{where}: {value} is out of range")
        if isinstance(value, dict):
            todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return user, password


def _authorized(header: str | None, accounts: tuple[tuple[str, str], ...]) -> bool:
    """HTTP Basic credentials checked against every account in constant time (hmac.compare_digest)."""
    given = _basic_credentials(header)
    if given is None:
        return False
    ok = False
    for user, password in accounts:  # every account compared, so the time does not tell which matched
        same_user = hmac.compare_digest(given[0], user.encode())
        same_password = hmac.compare_digest(given[1], password.encode())
        ok |= same_user & same_password
    return ok


class Server:
    """The state behind the routes: the model catalog, the options, the worker."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.settings = dict(_SETTINGS)
        self.preview = dict(_PREVIEW)
        self.sd_vae = "Automatic"
        self._kept: dict[str, tuple[ModelEntry, str, Pipeline]] = {}  # field -> (entry, sd_vae, pipeline)
        self.model = self.find_model(config.model) if config.model else self._first_model()
        self.worker = Worker(config.load(self.model, self.sd_vae), config.queue_size)

    def _first_model(self) -> ModelEntry:
        models = self.config.list_models()
        if not models:
            raise SdrtError("no model to serve: the checkpoint folder is empty and the embedded model is missing")
        return models[0]

    def find_model(self, name, field: str = "sd_model_checkpoint") -> ModelEntry:
        """The catalog entry a client names (in ``field``) by title, name, or title without its hash."""
        if not isinstance(name, str):
            raise SdrtError(f"{field} must be a model title, got {name!r}")
        models = self.config.list_models()
        for m in models:
            if name in (m.title, m.model_name, m.title.split(" [")[0]):
                return m
        raise SdrtError(f"{field}: unknown model {name!r}; GET /sdapi/v1/sd-models lists them")

    # -- the models a request names besides the server's own --

    async def request_models(self, payload: dict) -> RequestModels:
        """The pipelines of the models a request names in ``refiner_checkpoint`` (the webui's Refiner)
        and ``hr_checkpoint_name`` (hires fix's second pass): checkpoints of the catalog, resolved as
        the webui resolves them among its checkpoints; the server's own model is its pipeline."""
        return RequestModels(await self._second_model(payload, "refiner_checkpoint", "None"),
                             await self._second_model(payload, "hr_checkpoint_name", self.sd_vae))

    async def _second_model(self, payload: dict, field: str, vae: str) -> Pipeline | None:
        """Loaded in the worker between jobs (exporting a checkpoint on first use); one model is kept
        per field, as the webui keeps one model besides the main one. The refiner decodes with its own
        VAE (as ``sdrt generate --refiner``); the hires checkpoint gets the server's ``sd_vae``, which
        the webui applies to every model it loads."""
        name = payload.get(field)
        if name in (None, "", "None", "none", "Use same checkpoint"):
            return None
        entry = self.find_model(name, field)
        if entry == self.model:
            return self.worker.pipeline
        kept = self._kept.get(field)
        if kept is not None and kept[:2] == (entry, vae):
            return kept[2]

        def load(pipe, job):
            self._kept.pop(field, None)  # the old one goes before the new one loads
            loaded = self.config.load(entry, vae)
            self._kept[field] = (entry, vae, loaded)
            return loaded

        return await self.run(f"load {entry.title} ({field})", load)

    # -- generation --

    def params(self, payload: dict, kind: type[GenerationParams] = GenerationParams,
               models: RequestModels = RequestModels()) -> GenerationParams:
        """A webui txt2img (or img2img: ``kind``) payload over the server's options, checked against the
        limits; ``models``: the pipelines its ``refiner_checkpoint`` and ``hr_checkpoint_name`` name
        (``Server.request_models``), which the request is checked against and then names by title."""
        _check_numbers(payload)
        payload = dict(payload)
        if payload.get("sampler_name") and "sampler_index" in payload:
            del payload["sampler_index"]  # the webui: sampler_name wins over the deprecated sampler_index
        payload.pop("force_task_id", None)
        overrides = payload.pop("override_settings", None) or {}
        if not isinstance(overrides, dict):
            raise SdrtError(f"override_settings must be a mapping, got {type(overrides).__name__}")
        overrides = dict(overrides)
        model = overrides.pop("sd_model_checkpoint", None)
        if model is not None and self.find_model(model) != self.model:
            raise SdrtError("override_settings: sd_model_checkpoint: sdrt serve switches models through "
                            "POST /sdapi/v1/options, not per request")
        vae = overrides.pop("sd_vae", None)
        self._check_vae(vae)
        if vae is not None and vae != self.sd_vae:
            raise SdrtError("override_settings: sd_vae: sdrt serve switches VAEs through POST /sdapi/v1/options, "
                            "not per request")
        base = kind.from_webui({"override_settings": self.settings})
        params = base.replace(**payload, override_settings=overrides)
        c = self.config
        limits = (("steps", params.steps, c.max_steps, "--max-steps"),
                  ("batch_size", params.batch_size, c.max_batch, "--max-batch"),
                  ("n_iter", params.n_iter, c.max_batch, "--max-batch"))
        for name, value, most, flag in limits:
            if isinstance(value, int) and value > most:
                raise SdrtError(f"{name} must be at most {most} ({flag}), got {value}")
        for name in ("width", "height"):
            value = getattr(params, name)
            if isinstance(value, int) and value * 8 > c.max_pixels:
                raise SdrtError(f"{name} {value} is too large for {c.max_pixels} pixels (--max-pixels)")
        pipe = self.worker.pipeline
        refiner, hires = models.refiner, models.hires
        checked = params
        if refiner is pipe:  # the webui does not switch to the model it is running (apply_refiner)
            params = checked = params.replace(refiner_checkpoint=None)
        elif refiner is not None:  # named as the infotext writes it: the catalog's name may be a file's
            params = params.replace(refiner_checkpoint=short_title(refiner))
            pipe.check_refiner(params, refiner)
            checked = checked.replace(refiner_checkpoint=None)
        if hires is not None:
            if not hasattr(pipe, "set_hires_checkpoint"):
                raise SdrtError(f"hr_checkpoint_name: {pipe.bundle.name} has no VAE encoder, which hires fix needs")
            params = params.replace(hr_checkpoint_name=short_title(hires))
            checked = params if hires is pipe else checked.replace(hr_checkpoint_name=None)
        # every check of the runtime, before queueing (the job attaches the models checked above)
        plan = pipe.plan(checked)
        if params.batch_size * params.n_iter > c.max_batch:
            raise SdrtError(f"batch_size x n_iter must be at most {c.max_batch} (--max-batch), "
                            f"got {params.batch_size} x {params.n_iter}")
        if plan.width * plan.height > c.max_pixels:
            raise SdrtError(f"width x height must be at most {c.max_pixels} pixels (--max-pixels), "
                            f"got {plan.width}x{plan.height}")
        if getattr(params, "script_name", None):  # an outpainting script: its passes are at most its image
            w, h = grown_size(params)
            if w * h > c.max_pixels:
                raise SdrtError(f"script_args: the outpainted image ({w}x{h}) must be at most {c.max_pixels} pixels "
                                "(--max-pixels)")
        hr_w, hr_h = getattr(plan, "hr_size", (0, 0))  # hires fix's second pass
        if hr_w * hr_h > c.max_pixels:
            raise SdrtError(f"hr_scale: the hires fix size must be at most {c.max_pixels} pixels (--max-pixels), "
                            f"got {hr_w}x{hr_h}")
        if len(params.prompt) + len(params.negative_prompt) > c.max_prompt_chars:
            raise SdrtError(f"prompt and negative_prompt must hold at most {c.max_prompt_chars} characters together")
        return params

    def _check_vae(self, vae) -> None:
        if vae is None:
            return
        choices = (*_VAE_CHOICES, *self.config.list_vaes())
        if vae not in choices:
            raise SdrtError(f"sd_vae: choose one of {', '.join(choices)} (GET /sdapi/v1/sd-vae), got {vae!r}")

    def generate(self, pipe: Pipeline, job: Job, params: GenerationParams,
                 models: RequestModels = RequestModels()) -> tuple[Plan, list[GeneratedImage]]:
        # in the worker thread: the models the request names, for this job
        if models.refiner not in (None, pipe):
            pipe.set_refiner(models.refiner)
        if models.hires not in (None, pipe):
            pipe.set_hires_checkpoint(models.hires)
        plan = pipe.plan(params)

        def on_step(event):  # in the worker thread, between two steps: the pipeline is free
            job.on_step(event)
            every = self.preview["show_progress_every_n_steps"]
            if (job.preview_wanted and self.preview["live_previews_enable"] and every > 0
                    and job.step - job.preview_step >= every):
                job.preview_wanted = False
                job.preview, job.preview_step = pipe.decode(event["denoised"][:1])[0], job.step

        return plan, pipe.generate(plan, callback=on_step)

    def info(self, pipe: Pipeline, job: Job, plan: Plan, images: list[GeneratedImage]) -> dict:
        """The webui's ``Processed.js()`` fields."""
        p, n = plan.params, plan.images
        seeds = [s for b in plan.batches for s in b.seeds]
        subseeds = [s for b in plan.batches for s in b.subseeds]
        return {
            "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * n, "seed": plan.seed, "all_seeds": seeds,
            "subseed": plan.subseed, "all_subseeds": subseeds, "subseed_strength": p.subseed_strength,
            "width": plan.width, "height": plan.height, "sampler_name": plan.sampler.name,
            "scheduler": plan.schedule, "cfg_scale": p.cfg_scale, "steps": p.steps, "batch_size": p.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": pipe.bundle.name,
            "sd_model_hash": pipe.bundle.model_hash,
            "sd_vae_name": pipe.vae.path.name if getattr(pipe, "vae", None) else None,
            "sd_vae_hash": pipe.vae.sha256[:10] if getattr(pipe, "vae", None) else None,
            "seed_resize_from_w": p.seed_resize_from_w, "seed_resize_from_h": p.seed_resize_from_h,
            "denoising_strength": getattr(plan, "denoising_strength", None), "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": [im.infotext for im in images], "styles": [], "job_timestamp": job.timestamp,
            "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": False, "version": f"sdrt {__version__}",
        }

    async def run(self, label: str, run: Callable, task_id=None, request: Request | None = None):
        """Queue ``run(pipeline, job)`` and wait for it. A client that goes away (``request``
        disconnected) or a cancelled wait drops the job, or stops it at its next step."""
        if task_id is not None and (not isinstance(task_id, str) or len(task_id) > 100):
            raise SdrtError("force_task_id must be text of at most 100 characters")
        job = self.worker.submit(label, run, task_id)
        done = asyncio.wrap_future(job.future)
        try:
            while request is not None and not done.done():
                await asyncio.wait({done}, timeout=0.25)
                if not done.done() and await request.is_disconnected():
                    self.worker.cancel(job)
                    return _error(499, "ClientClosedRequest", "the client closed the connection")
            return await done
        except asyncio.CancelledError:
            self.worker.cancel(job)
            raise

    # -- options --

    def options(self) -> dict:
        return {"sd_model_checkpoint": self.model.title, "sd_checkpoint_hash": self.model.sha256,
                "sd_vae": self.sd_vae, **self.settings, **self.preview}

    async def set_options(self, changes: dict) -> None:
        _check_numbers(changes)
        unknown = sorted(set(changes) - {"sd_model_checkpoint", "sd_vae", *_SETTINGS, *_PREVIEW})
        if unknown:
            raise SdrtError(f"options not supported by sdrt: {', '.join(unknown)}")
        settings = {**self.settings, **{k: v for k, v in changes.items() if k in _SETTINGS}}
        self.worker.pipeline.plan(GenerationParams.from_webui({"override_settings": settings}))  # checks them
        self._check_vae(changes.get("sd_vae"))
        preview = {**self.preview, **{k: v for k, v in changes.items() if k in _PREVIEW}}
        if not isinstance(preview["live_previews_enable"], bool):
            raise SdrtError("live_previews_enable must be true or false")
        every = preview["show_progress_every_n_steps"]
        if not isinstance(every, int) or isinstance(every, bool) or not -1 <= every <= 1000:
            raise SdrtError(f"show_progress_every_n_steps must be an integer from -1 to 1000, got {every!r}")
        model = self.find_model(changes["sd_model_checkpoint"]) if "sd_model_checkpoint" in changes else self.model
        vae = changes.get("sd_vae", self.sd_vae)
        if model != self.model or vae != self.sd_vae:
            label = model.title if model != self.model else f"VAE {vae}"
            await self.run(f"load {label}", lambda pipe, job: self._switch(model, vae))
        self.settings = settings
        self.preview = preview

    def _switch(self, model: ModelEntry, vae: str) -> None:
        # In the worker thread, between jobs: the old pipeline serves until the new one is loaded
        self.worker.pipeline = self.config.load(model, vae)
        self.model, self.sd_vae = model, vae

    # -- progress --

    def progress(self, id_task: str | None, skip_current_image: bool = False) -> dict:
        """The webui's ``/progress``. Asking for the current image (not ``skip_current_image``) has the
        worker decode a preview at its next step once ``show_progress_every_n_steps`` steps passed
        since the last (the webui decodes during the request instead); the reply carries the latest."""
        job, pending = self.worker.state()
        current_image = None
        if job is not None and not skip_current_image:
            job.preview_wanted = True
            if job.preview is not None:
                current_image = _encode_preview(job.preview)
        progress, eta = 0.0, None
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is not None:
            state.update(skipped=job.skipped, interrupted=job.interrupted, job=job.label, job_count=job.batches,
                         job_timestamp=job.timestamp, job_no=job.batch, sampling_step=job.step,
                         sampling_steps=job.steps)
            # the webui's estimate: 0.01, plus the batches done, plus the part of this batch's steps
            progress = 0.01
            if job.batches:
                progress += job.batch / job.batches + (job.step / job.steps if job.steps else 0) / job.batches
            progress = min(progress, 1.0)
            elapsed = time.monotonic() - (job.started or time.monotonic())
            eta = elapsed / progress - elapsed
        reply = {"progress": progress, "eta_relative": eta or 0.0, "state": state, "current_image": current_image,
                 "textinfo": None, "queue_pending": pending}
        if id_task is not None:
            reply["queue_position"] = self.worker.position(id_task)
        return reply


def _embeddings(pipe: Pipeline) -> dict:
    """The webui's ``/embeddings``: every embedding file of ``--embeddings-dir``, ``loaded`` when it fits
    the model's text encoders (SDXL: both), else ``skipped`` (the webui skips files whose vector width
    is another model's); ``shape`` is the vector width, ``vectors`` their number. A file that cannot
    be read at all is left out and logged, as the webui does."""
    from sdrt.runtime.text.embeddings import load_embedding

    encoders = getattr(pipe.text_encoder, "encoders", None) or [pipe.text_encoder]
    libraries = [e.library for e in encoders if getattr(e, "library", None) is not None]
    loaded, skipped = {}, {}
    for name in sorted({n for lib in libraries for n in lib.paths}):
        emb, fits = None, True
        for lib in libraries:
            try:
                found = lib.get(name)  # the checks a prompt naming it would meet (loaded once, then kept)
            except (SdrtError, KeyError):
                fits = False
                continue
            if emb is None:
                emb = found
        if emb is None:  # fits no encoder: read it for its shape
            first = next(lib for lib in libraries if name in lib)
            try:
                emb = load_embedding(first.paths[name], name, first.key)
            except SdrtError as e:
                log.warning("embedding %s left out: %s", name, e)
                continue
        entry = {"step": emb.step, "sd_checkpoint": None, "sd_checkpoint_name": None,
                 "shape": int(emb.vectors.shape[1]), "vectors": int(emb.vectors.shape[0])}
        (loaded if fits else skipped)[name] = entry
    return {"loaded": loaded, "skipped": skipped}


def _encode_preview(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _memory() -> dict:
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    ram: dict = {}
    try:
        ram["total"] = os.sysconf("SC_PHYS_PAGES") * page
        ram["free"] = os.sysconf("SC_AVPHYS_PAGES") * page
        with open("/proc/self/statm") as f:
            ram["used"] = int(f.read().split()[1]) * page  # resident set size
    except (ValueError, OSError):
        pass
    return {"ram": ram, "cuda": {"error": "not reported by sdrt serve"}}


class _Guard:
    """ASGI middleware: HTTP Basic auth on every route (when configured) and the body size cap.
    (Plain ASGI rather than ``BaseHTTPMiddleware``, which hides a client's disconnect from the routes.)"""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        c = self.config
        reply = None
        if c.api_auth and not _authorized(headers.get("authorization"), c.api_auth):
            reply = JSONResponse({"detail": "Incorrect username or password"}, 401,
                                 headers={"WWW-Authenticate": "Basic"})
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None and "chunked" in headers.get("transfer-encoding", ""):
                reply = _error(411, "LengthRequired", "send the body with a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > c.max_body_bytes):
                reply = _error(413, "PayloadTooLarge", f"the request body is over {c.max_body_bytes} bytes")
        server = (b"x-sdrt-server", _SERVER_ID)

        async def tagged(message):  # which process answered: one of several replicas behind a proxy
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), server]}
            await send(message)

        if reply is not None:
            return await reply(scope, receive, tagged)
        return await self.app(scope, receive, tagged)


_SERVER_ID = f"sdrt/{__version__} {socket.gethostname()}:{os.getpid()}".encode("latin-1", "replace")


def create_app(config: ServeConfig) -> FastAPI:
    """The application, with the first model loaded and the worker running."""
    from contextlib import asynccontextmanager

    server = Server(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn stops accepting and finishes the requests in flight first (SIGTERM); then this
        await asyncio.to_thread(server.worker.close)

    app = FastAPI(title="sdrt serve", version=__version__, lifespan=lifespan,
                  description="The AUTOMATIC1111 webui's API, served by sdrt.")
    app.state.server = server

    app.add_middleware(_Guard, config=config)

    if config.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return _error(503, "QueueFull", str(e), headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(SdrtError)
    async def sdrt_error(request, e: SdrtError):
        return _error(422, "SdrtError", str(e))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return _error(500, "InternalError", f"{type(e).__name__}; the server's log has the details")

    api = "/sdapi/v1"

    @app.post(f"{api}/txt2img", openapi_extra=openapi_body(request_schema(GenerationParams)))
    async def txt2img(request: Request, payload: Annotated[dict, Body()]):
        models = await server.request_models(payload)
        params = server.params(payload, models=models)

        def run(pipe, job):
            plan, images = server.generate(pipe, job, params, models)
            return {"images": [_encode_png(im) for im in images], "parameters": payload,
                    "info": json.dumps(server.info(pipe, job, plan, images))}

        return await server.run("txt2img", run, payload.get("force_task_id"), request)

    @app.post(f"{api}/img2img", openapi_extra=openapi_body(request_schema(Img2imgParams, _IMG2IMG_FIELDS)))
    async def img2img(request: Request, payload: Annotated[dict, Body()]):
        if not hasattr(server.worker.pipeline, "img2img"):
            return _error(501, "NotImplemented", _NO_ENCODER)
        images = payload.get("init_images")
        if not isinstance(images, list) or not images or len(images) > config.max_batch:
            raise SdrtError(f"init_images must be a list of 1 to {config.max_batch} base64-encoded images")
        decoded = [_decode_image(im, f"init_images[{i}]", 4 * config.max_pixels) for i, im in enumerate(images)]
        mask = payload.get("mask")  # inpainting: a base64 image; None or "" for none, as the webui
        mask = _decode_image(mask, "mask", 4 * config.max_pixels) if mask not in (None, "") else None
        models = await server.request_models(payload)
        params = server.params({**payload, "init_images": decoded, "mask": mask}, Img2imgParams, models)
        # the webui's response leaves the request's images out unless include_init_images
        shown = payload if payload.get("include_init_images") else {**payload, "init_images": None, "mask": None}

        def run(pipe, job):
            plan, images = server.generate(pipe, job, params, models)
            return {"images": [_encode_png(im) for im in images], "parameters": shown,
                    "info": json.dumps(server.info(pipe, job, plan, images))}

        return await server.run("img2img", run, payload.get("force_task_id"), request)

    @app.post("/v1/images/generations", openapi_extra=openapi_body(request_schema(GenerationParams, _OPENAI_FIELDS)))
    async def openai_images(request: Request, payload: Annotated[dict, Body()]):
        """OpenAI-style generation: prompt, n, size "WxH", response_format b64_json; sdrt also takes
        the webui's fields (seed, steps, sampler_name, negative_prompt, cfg_scale, ...)."""
        payload = dict(payload)
        if payload.pop("response_format", "b64_json") != "b64_json":
            raise SdrtError("response_format: sdrt serve answers b64_json only (it hosts no image URLs)")
        model = payload.pop("model", None)
        if model is not None and server.find_model(model) != server.model:
            raise SdrtError("model: sdrt serve switches models through POST /sdapi/v1/options")
        payload.pop("user", None)
        webui = {"batch_size": payload.pop("n", 1)}
        size = payload.pop("size", None)
        if size is not None:
            w, x, h = str(size).partition("x")
            if not (x and w.isdigit() and h.isdigit()):
                raise SdrtError(f"size must be WIDTHxHEIGHT, got {size!r}")
            webui.update(width=int(w), height=int(h))
        models = await server.request_models(payload)
        params = server.params({**payload, **webui}, models=models)

        def run(pipe, job):
            _, images = server.generate(pipe, job, params, models)
            return {"created": int(time.time()),
                    "data": [{"b64_json": _encode_png(im), "revised_prompt": params.prompt} for im in images]}

        return await server.run("txt2img", run, request=request)

    @app.get(f"{api}/options")
    async def get_options():
        return server.options()

    @app.post(f"{api}/options")
    async def set_options(payload: Annotated[dict, Body()]):
        await server.set_options(payload)

    @app.get(f"{api}/cmd-flags")
    async def cmd_flags():
        return config.cmd_flags

    @app.get(f"{api}/sd-models")
    async def sd_models():
        return [{"title": m.title, "model_name": m.model_name, "hash": m.hash, "sha256": m.sha256,
                 "filename": m.filename, "config": None} for m in config.list_models()]

    @app.post(f"{api}/refresh-checkpoints")
    async def refresh_checkpoints():
        config.list_models()  # the catalog is read from the folder on every request

    @app.get(f"{api}/samplers")
    async def samplers():
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS.values()]

    @app.get(f"{api}/schedulers")
    async def schedulers():
        return [{"name": s.lower().replace(" ", "_"), "label": s, "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False} for s in SCHEDULES]

    @app.get(f"{api}/upscalers")
    async def upscalers():  # the webui's built-in pixel upscalers (hires fix's hr_upscaler, extras)
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in PIXEL_UPSCALERS]

    @app.get(f"{api}/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_MODES]

    @app.get(f"{api}/loras")
    async def loras():
        return await asyncio.to_thread(config.list_loras)

    @app.get(f"{api}/refresh-loras")
    async def refresh_loras():
        return None  # the folder is read on every request

    @app.get(f"{api}/sd-vae")
    async def sd_vae():
        return [{"model_name": name, "filename": name} for name in config.list_vaes()]

    @app.get(f"{api}/hypernetworks")
    async def hypernetworks():
        return await asyncio.to_thread(config.list_hypernetworks)

    # Face restoration and styles do not exist in sdrt: their lists are empty; of the webui's
    # scripts, img2img's outpainting scripts (their lower-case titles, as the webui lists them)
    for route in ("face-restorers", "prompt-styles", "script-info"):
        app.get(f"{api}/{route}", name=route)(_empty_list)

    @app.get(f"{api}/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": [name.lower() for name in SCRIPTS]}

    @app.get(f"{api}/embeddings")
    async def embeddings():
        return await asyncio.to_thread(_embeddings, server.worker.pipeline)

    @app.get(f"{api}/progress")
    async def progress(skip_current_image: bool = False, id_task: str | None = None):
        return server.progress(id_task, skip_current_image)

    @app.post(f"{api}/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @app.post(f"{api}/skip")
    async def skip():
        server.worker.skip()
        return {}

    @app.post(f"{api}/png-info")
    async def png_info(payload: Annotated[dict, Body()]):
        unknown = sorted(set(payload) - {"image"})
        if unknown:
            raise SdrtError(f"unknown png-info field {unknown[0]!r}")
        image = _decode_image(payload.get("image"))
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        if not isinstance(text, str):
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, fields = png.parse_infotext(text)
        return {"info": text, "items": items,
                "parameters": {"Prompt": prompt, "Negative prompt": negative, **fields}}

    @app.get(f"{api}/memory")
    async def memory():
        return _memory()

    return app


async def _empty_list():
    return []
