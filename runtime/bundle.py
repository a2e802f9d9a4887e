"""Bundles: the ``sdrt.json`` manifest (:class:`Manifest`, the one definition the exporter writes
and the runtime reads) and opening a bundle directory, sdrt's own or one written by
``optimum-cli export onnx`` (its manifest inferred from the component configs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.backends import kernels
from sdrt.runtime.errors import CheckpointError
from sdrt.runtime.precision import MIXED_LAYERS, PRECISION_KINDS, int8_saturates
from sdrt.runtime.spec import ComponentSpec
from sdrt.runtime.text.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID

log = logging.getLogger(__name__)

MANIFEST = "sdrt.json"
FORMAT = "sdrt-bundle"
OPTIMUM_FORMAT = "optimum"  # the format of inferred manifests; never written
# The newest format this sdrt reads. SD 1.x bundles are still written as version 1 (what sdrt read
# before SD 2.x and SDXL); the other families as 2, which an older sdrt refuses instead of running
# them as SD 1.x (eos padding, normed CLIP-skip states, no added conditioning).
FORMAT_VERSION = 2
SD1_FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
REQUIRED = ("text_encoder", "unet", "vae_decoder")  # SD 1.x / 2.x; see required_components
# The text encoders each architecture conditions on (SDXL: CLIP ViT-L and OpenCLIP bigG side by side)
TEXT_ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "sdxl-refiner": ("text_encoder_2",)}
TOKEN_EMBEDDINGS = "text_encoder/token_embeddings.npy"
TOKEN_EMBEDDINGS_2 = "text_encoder_2/token_embeddings.npy"
TEXT_PROJECTION = "text_encoder_2/text_projection.npy"  # float32 [hidden, projection]: pooled = h_eos @ P
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt")  # where the text encoder looks (fixed)
BETA_SCHEDULES = ("scaled_linear", "linear")  # what schedules.alphas_cumprod computes
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the Denoiser converts
# CLIP's special tokens (SD 1.x pads with EOS), defined with the tokenizer
_CLIP_BOS, _CLIP_EOS = BOS_TOKEN_ID, EOS_TOKEN_ID


def text_encoders(architecture: str) -> tuple[str, ...]:
    """The text encoder components an architecture conditions on, in conditioning order."""
    return TEXT_ENCODERS.get(architecture, ("text_encoder",))


def required_components(architecture: str) -> tuple[str, ...]:
    """The components a bundle of ``architecture`` cannot run without (the VAE encoder is optional)."""
    return (*text_encoders(architecture), "unet", "vae_decoder")


def format_version_for(architecture: str) -> int:
    """The format version a bundle of ``architecture`` is written with (see :data:`FORMAT_VERSION`)."""
    return SD1_FORMAT_VERSION if architecture == "sd1" else FORMAT_VERSION


def component_path(name: str) -> str:
    """A component's portable graph, relative to the bundle (the optimum / diffusers layout)."""
    return f"{name}/model.onnx"


# sdrt's text encoder graph (fed with token embeddings) in the bundles it writes; the optimum
# layout's ``model.onnx`` beside it is the same graph fed with token ids (``Component.token_ids``)
EMBEDS_GRAPH = "model.embeds.onnx"


def variant_key(kind: str, precision: str = "fp32") -> str:
    """The key of a component's optimized graph for a device kind and precision: ``cpu`` (fp32,
    fused), ``cpu-int8``, ``cpu-int8-static``, ``cuda-fp16``."""
    return kind if precision == "fp32" else f"{kind}-{precision}"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheduler:
    """The DDPM training schedule: the arguments of ``schedules.alphas_cumprod``."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TextEncoderInfo:
    hidden_size: int
    num_layers: int | None  # None where an optimum config does not say
    token_embeddings: str | None = None  # sdrt bundles: the table the runtime looks tokens up in
    bos_token_id: int = _CLIP_BOS
    eos_token_id: int = _CLIP_EOS
    pad_token_id: int = _CLIP_EOS  # what fills a chunk after its first end token: eos (CLIP), 0 (OpenCLIP)
    projection: str | None = None  # OpenCLIP bigG: the pooled output's projection (TEXT_PROJECTION)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("token_embeddings", "projection"):
            if d[key] is None:
                del d[key]
        return d


@dataclass(frozen=True)
class Variant:
    """An optimized graph of a component for one device kind and precision (see :func:`variant_key`)."""
    path: str
    precision: str = "fp32"  # written only when not fp32
    custom_ops: bool | None = None  # runs only with sdrt's kernels library; None: not recorded (fp16)
    details: dict = field(default_factory=dict)  # the export's record: pass counts, quantized ops...

    def to_json(self) -> dict:
        d = {"path": self.path}
        if self.precision != "fp32":
            d["precision"] = self.precision
        if self.custom_ops is not None:
            d["custom_ops"] = self.custom_ops
        return d | self.details


@dataclass(frozen=True)
class TokenIdsGraph:
    """sdrt's text encoders: the graph optimum's and diffusers' ONNX pipelines run (``input_ids``
    in, transformers' output names out; ``sdrt.export.optimum``). The runtime does not read it."""
    path: str
    spec: ComponentSpec

    def to_json(self) -> dict:
        return {"path": self.path, **self.spec.to_json()}


@dataclass(frozen=True)
class Component:
    path: str  # the portable graph: standard ONNX, what every execution provider runs
    precision: str = "fp32"
    spec: ComponentSpec | None = None  # the graph's I/O (sdrt bundles)
    optimized: dict[str, Variant] = field(default_factory=dict)
    token_ids: TokenIdsGraph | None = None  # text encoders of sdrt bundles since the optimum graph

    def to_json(self) -> dict:
        d = {"path": self.path, "precision": self.precision, **(self.spec.to_json() if self.spec else {})}
        if self.optimized:
            d["optimized"] = {k: v.to_json() for k, v in self.optimized.items()}
        if self.token_ids is not None:
            d["token_ids"] = self.token_ids.to_json()
        return d


@dataclass(frozen=True)
class PrecisionRecord:
    """A reduced precision the export wrote for a device kind, with its measured fidelity."""
    components: dict[str, dict]  # the export's counts per component it changed
    min_default_psnr: float | None = None
    fidelity: dict | None = None  # quantize.measure's record; None while unmeasured
    default: bool = False  # whether the measurement lets ``--precision auto`` pick it
    calibration: dict | None = None  # int8-static: what the calibration ran

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if self.calibration is None:
            del d["calibration"]
        return d


@dataclass(frozen=True)
class Source:
    """The checkpoint a bundle was exported from."""
    name: str | None = None
    kind: str | None = None  # safetensors, ckpt, diffusers
    sha256: str | None = None
    hash: str | None = None  # the webui's short hash (the first 10 hex digits of sha256)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``sdrt.json``. Paths are relative to the bundle directory."""
    architecture: str
    prediction_type: str
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    latent_scale_factor: float  # the VAE's scaling_factor
    default_size: tuple[int, int]  # width, height
    scheduler: Scheduler
    text_encoder: TextEncoderInfo | None  # component text_encoder; None for the SDXL refiner
    components: dict[str, Component]
    text_encoder_2: TextEncoderInfo | None = None  # component text_encoder_2 (SDXL's OpenCLIP bigG)
    source: Source = Source()
    exporter: dict | None = None  # library versions of the export
    # {device kind: {precision: record}}
    precisions: dict[str, dict[str, PrecisionRecord]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int | None = FORMAT_VERSION

    def to_json(self) -> dict:
        d = {"format": self.format}
        if self.format_version is not None:
            d["format_version"] = self.format_version
        d |= {
            "architecture": self.architecture,
            "prediction_type": self.prediction_type,
            "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "latent_scale_factor": self.latent_scale_factor,
            "default_size": list(self.default_size),
            "scheduler": self.scheduler.to_json(),
            **{name: info.to_json() for name, info in self.text_encoder_infos().items()},
            "components": {n: c.to_json() for n, c in self.components.items()},
            "source": self.source.to_json(),
        }
        if self.exporter is not None:
            d["exporter"] = self.exporter
        if self.precisions:
            d["precisions"] = {k: {p: r.to_json() for p, r in rs.items()} for k, rs in self.precisions.items()}
        return d

    @classmethod
    def from_json(cls, d, bundle_path: str | Path) -> Manifest:
        """Read and check the ``sdrt.json`` of the bundle at ``bundle_path``; one-line
        CheckpointError naming the field for a manifest sdrt cannot use, or whose paths leave the bundle."""
        bundle_path = Path(bundle_path)
        where = str(bundle_path / MANIFEST)
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if d.get("format") != FORMAT or not isinstance(version, int):
            raise CheckpointError(f"{where} is not an sdrt bundle manifest")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"bundle {bundle_path} has format version {version}; this sdrt reads up to "
                                  f"{FORMAT_VERSION} (upgrade sdrt or re-export)")
        m = _parse(d, _Fields(where))
        m.check(where)
        m.check_paths(bundle_path, where)
        return m

    def text_encoder_infos(self) -> dict[str, TextEncoderInfo]:
        """``{component: info}`` of the text encoders the manifest describes."""
        infos = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: info for name, info in infos.items() if info is not None}

    def check(self, where: str) -> None:
        """The checks across fields that parsing alone does not make."""
        infos = self.text_encoder_infos()
        for name in text_encoders(self.architecture):
            if name not in infos:
                raise CheckpointError(f"{where}: {name} is missing (a {self.architecture} bundle conditions on it)")
        f = self.vae_scale_factor
        if f & (f - 1):
            raise CheckpointError(f"{where}: vae_scale_factor must be a power of two, got {f}")
        if any(s % f for s in self.default_size):
            raise CheckpointError(f"{where}: default_size {list(self.default_size)} is not a multiple of "
                                  f"vae_scale_factor {f}")
        decoder = self.components.get("vae_decoder")
        if decoder and decoder.spec and decoder.spec.inputs:
            channels = decoder.spec.inputs[0].shape[1]  # latent_sample [batch, channels, height, width]
            if isinstance(channels, int) and channels != self.latent_channels:
                raise CheckpointError(f"{where}: latent_channels {self.latent_channels} disagrees with the "
                                      f"vae_decoder's {channels}-channel latent_sample")

    def paths(self) -> dict[str, str]:
        """Every path the manifest names, by field."""
        out = {}
        for n, c in self.components.items():
            out[f"components.{n}.path"] = c.path
            out |= {f"components.{n}.optimized.{k}.path": v.path for k, v in c.optimized.items()}
            if c.token_ids is not None:
                out[f"components.{n}.token_ids.path"] = c.token_ids.path
        for name, info in self.text_encoder_infos().items():
            for key in ("token_embeddings", "projection"):
                if getattr(info, key) is not None:
                    out[f"{name}.{key}"] = getattr(info, key)
        return out

    def check_paths(self, bundle_path: Path, where: str) -> None:
        """Each path must name a file inside the bundle once symlinks are resolved: a manifest
        cannot make sdrt read another bundle's graphs or any other file. The tokenizer files have
        fixed paths, checked alike."""
        root = bundle_path.resolve()
        for name, rel in {**self.paths(), **{f: f for f in TOKENIZER_FILES}}.items():
            target = (bundle_path / rel).resolve()
            if Path(rel).is_absolute() or target == root or not target.is_relative_to(root):
                raise CheckpointError(f"{where}: {name} {rel!r} is not a file inside the bundle")

    def with_variant(self, component: str, key: str, variant: Variant) -> Manifest:
        """This manifest with an optimized graph added to ``component`` under ``key``."""
        c = self.components[component]
        c = dataclasses.replace(c, optimized={**c.optimized, key: variant})
        return dataclasses.replace(self, components={**self.components, component: c})

    def without_variant(self, component: str, key: str) -> Manifest:
        """This manifest without ``component``'s optimized graph ``key``."""
        c = self.components[component]
        c = dataclasses.replace(c, optimized={k: v for k, v in c.optimized.items() if k != key})
        return dataclasses.replace(self, components={**self.components, component: c})

    def with_precision(self, kind: str, precision: str, record: PrecisionRecord) -> Manifest:
        """This manifest with ``record`` as the export's record of ``precision`` for ``kind``."""
        kinds = {**self.precisions, kind: {**self.precisions.get(kind, {}), precision: record}}
        return dataclasses.replace(self, precisions=kinds)


class _Fields:
    """Typed reads of a manifest's JSON, each failure one line naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {name} {problem}")

    def get(self, d: dict, key: str, prefix: str, kind: type | tuple, what: str, default=...):
        name = f"{prefix}{key}"
        if key not in d:
            if default is ...:
                raise self.fail(name, "is missing")
            return default
        value = d[key]
        if value is None and default is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            got = repr(value)
            raise self.fail(name, f"must be {what}, got {got if len(got) <= 60 else got[:57] + '...'}")
        return value

    def obj(self, d, key, prefix="", default=...) -> dict:
        return self.get(d, key, prefix, dict, "an object", default)

    def string(self, d, key, prefix="", default=...) -> str:
        return self.get(d, key, prefix, str, "a string", default)

    def path(self, d, key, prefix="", default=...) -> str:
        value = self.get(d, key, prefix, str, "a path", default)
        if value == "" or (value is not None and "\0" in value):  # no file is named by a NUL
            raise self.fail(f"{prefix}{key}", f"must be a path, got {value!r}")
        return value

    def integer(self, d, key, prefix="", minimum=1, default=...) -> int:
        value = self.get(d, key, prefix, int, f"an integer >= {minimum}", default)
        if value is not None and value < minimum:
            raise self.fail(f"{prefix}{key}", f"must be an integer >= {minimum}, got {value}")
        return value

    def number(self, d, key, prefix="", default=..., below: float | None = None) -> float:
        bound = f" and below {below}" if below is not None else ""
        value = self.get(d, key, prefix, (int, float), f"a positive number{bound}", default)
        if value is not None and (not value > 0 or (below is not None and value >= below)):
            raise self.fail(f"{prefix}{key}", f"must be a positive number{bound}, got {value}")
        return value

    def choice(self, d, key, choices: tuple[str, ...], prefix="") -> str:
        value = self.string(d, key, prefix)
        if value not in choices:
            raise self.fail(f"{prefix}{key}", f"{value!r} is not one of {', '.join(choices)}")
        return value


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _parse(d: dict, f: _Fields) -> Manifest:
    """The typed manifest of a JSON object (the inverse of :meth:`Manifest.to_json`)."""
    size = f.get(d, "default_size", "", list, "a [width, height] list")
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise f.fail("default_size", f"must be a [width, height] list of positive integers, got {size!r}")

    s = f.obj(d, "scheduler")
    scheduler = Scheduler(f.integer(s, "num_train_timesteps", "scheduler.", minimum=2),
                          f.number(s, "beta_start", "scheduler.", below=1),
                          f.number(s, "beta_end", "scheduler.", below=1),
                          f.choice(s, "beta_schedule", BETA_SCHEDULES, "scheduler."))

    architecture = f.string(d, "architecture")
    needed = text_encoders(architecture)  # the refiner has no text_encoder; SD 1.x / 2.x no text_encoder_2
    text, text_2 = (_text_encoder(f, d, name, default=... if name in needed else None)
                    for name in ("text_encoder", "text_encoder_2"))

    entries = f.obj(d, "components")
    for name in required_components(architecture):
        f.obj(entries, name, "components.")
    components = {name: _component(f, name, entries) for name in entries}

    precisions = {}
    for kind, records in f.obj(d, "precisions", default={}).items():
        f.obj(d["precisions"], kind, "precisions.")
        precisions[kind] = {p: _precision(f, f"precisions.{kind}.", p, records) for p in records}

    source = f.obj(d, "source", default={})
    return Manifest(
        architecture=architecture,
        prediction_type=f.choice(d, "prediction_type", PREDICTION_TYPES),
        latent_channels=f.integer(d, "latent_channels"),
        vae_scale_factor=f.integer(d, "vae_scale_factor"),
        latent_scale_factor=f.number(d, "latent_scale_factor"),
        default_size=(size[0], size[1]),
        scheduler=scheduler,
        text_encoder=text,
        components=components,
        text_encoder_2=text_2,
        source=Source(*(f.string(source, k, "source.", default=None) for k in ("name", "kind", "sha256", "hash"))),
        exporter=f.obj(d, "exporter", default=None),
        precisions=precisions,
        format=d["format"],
        format_version=d.get("format_version"),
    )


def _text_encoder(f: _Fields, d: dict, name: str, default=...) -> TextEncoderInfo | None:
    """A text encoder's manifest entry (``pad_token_id`` null reads as eos, the CLIP default)."""
    t = f.obj(d, name, default=default)
    if t is None:
        return None
    p = f"{name}."
    pad = f.integer(t, "pad_token_id", p, minimum=0, default=None) if "pad_token_id" in t else _CLIP_EOS
    return TextEncoderInfo(f.integer(t, "hidden_size", p), f.integer(t, "num_layers", p, default=None),
                           f.path(t, "token_embeddings", p, default=None),
                           f.integer(t, "bos_token_id", p, minimum=0, default=_CLIP_BOS),
                           f.integer(t, "eos_token_id", p, minimum=0, default=_CLIP_EOS),
                           _CLIP_EOS if pad is None else pad,
                           f.path(t, "projection", p, default=None))


def _component(f: _Fields, name: str, entries: dict) -> Component:
    prefix = f"components.{name}."
    c = f.obj(entries, name, "components.")
    spec = None
    if "inputs" in c:
        try:
            spec = ComponentSpec.from_json(name, c)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise f.fail(f"{prefix}inputs", "is not an I/O spec (inputs/outputs of {name, dtype, shape})") from None
    optimized = {}
    for key in f.obj(c, "optimized", prefix, default={}):
        v = dict(f.obj(c["optimized"], key, f"{prefix}optimized."))
        vp = f"{prefix}optimized.{key}."
        optimized[key] = Variant(f.path(v, "path", vp), f.string(v, "precision", vp, default="fp32"),
                                 f.get(v, "custom_ops", vp, bool, "true or false", default=None),
                                 {k: x for k, x in v.items() if k not in ("path", "precision", "custom_ops")})
    token_ids = None
    if "token_ids" in c:
        t = f.obj(c, "token_ids", prefix)
        try:
            ids_spec = ComponentSpec.from_json(name, t)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise f.fail(f"{prefix}token_ids", "is not an I/O spec (path, inputs/outputs of {name, dtype, shape})") \
                from None
        token_ids = TokenIdsGraph(f.path(t, "path", f"{prefix}token_ids."), ids_spec)
    return Component(f.path(c, "path", prefix), f.string(c, "precision", prefix, default="fp32"), spec, optimized,
                     token_ids)


def _precision(f: _Fields, prefix: str, precision: str, records: dict) -> PrecisionRecord:
    r = f.obj(records, precision, prefix)
    p = f"{prefix}{precision}."
    return PrecisionRecord(f.obj(r, "components", p, default={}),
                           f.number(r, "min_default_psnr", p, default=None),
                           f.obj(r, "fidelity", p, default=None),
                           f.get(r, "default", p, bool, "true or false", default=False),
                           f.obj(r, "calibration", p, default=None))


# --- bundles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    path: Path
    schema: Manifest
    native: bool  # written by sdrt (token-embedding text encoder, CLIP skip states)
    manifest: dict = field(repr=False, compare=False)  # sdrt.json as read; the inferred one's JSON for optimum

    def component(self, name: str) -> Path:
        """The portable graph of a component: standard ONNX, what every execution provider runs."""
        return self.path / self.schema.components[name].path

    def spec(self, name: str) -> ComponentSpec | None:
        """The I/O spec of a component from the manifest (sdrt bundles); None for optimum bundles."""
        c = self.schema.components.get(name)
        return c.spec if c else None

    def graph(self, name: str, device: str = "cpu", precision: str = "fp32") -> Path:
        """The graph to run ``name`` with on ``device`` at ``precision``.

        The export's optimized graphs for that kind of device come first when the bundle has them
        (``sdrt export`` writes ``model.cpu.onnx``, fused for ONNX Runtime's CPU provider and
        sdrt's kernels, and with ``--precision`` ``model.cpu-int8.onnx`` / ``model.cuda-fp16.onnx``;
        they share or mirror the portable graph's weights): the ``precision`` variant, else the
        fp32 one (components a precision leaves alone, such as the int8 variant's text encoder and
        VAE), else the portable graph. ``SDRT_GRAPHS=portable`` forces the portable graphs."""
        kind = device.split(":")[0]
        variants = self.schema.components[name].optimized
        if os.environ.get("SDRT_GRAPHS", "auto") == "portable":
            return self.component(name)
        if precision == "mixed":  # per component, the precision the export's measurement chose
            precision = self.mixed_components(device).get(name, "fp32")
            precision = "mixed" if precision == MIXED_LAYERS else precision  # its own graph, cpu-mixed
        for key in dict.fromkeys((variant_key(kind, precision), variant_key(kind))):
            variant = variants.get(key)
            if not variant:
                continue
            path = self.path / variant.path
            if path.exists() and (not variant.custom_ops or kernels.available()):
                return path
            log.warning("%s: optimized graph %s unusable (%s); running the next one", name, path,
                        "missing" if not path.exists() else "sdrt's kernels library is not built")
        return self.component(name)

    def precisions(self, device: str = "cpu") -> dict[str, dict]:
        """The reduced precisions exported for a device kind: {precision: the export's record,
        with its measured fidelity and whether it may be the default}."""
        kind = device.split(":")[0]
        return {p: r.to_json() for p, r in self.schema.precisions.get(kind, {}).items()}

    def default_precision(self, device: str = "cpu") -> str:
        """What ``--precision auto`` runs on ``device``: an exported reduced precision whose
        measured final-image PSNR against fp32 met the bar (``default`` in its record), else fp32;
        the fastest such one when several did (int8-static, then mixed, then int8)."""
        records = self.schema.precisions.get(device.split(":")[0], {})
        passed = {p for p, r in records.items() if r.default and self._holds_here(p, r)}
        return next((p for p in ("int8-static", "mixed", "int8", "fp16") if p in passed), "fp32")

    def mixed_components(self, device: str = "cpu") -> dict[str, str]:
        """{component: precision} of the ``mixed`` precision (``sdrt export --precision mixed``):
        per component the fastest variant whose measured effect on the final image held; empty
        when the bundle has no such record."""
        record = self.schema.precisions.get(device.split(":")[0], {}).get("mixed")
        if record is None:
            return {}
        # what the manifest names, where it is one of the CPU precisions with graphs (or the
        # component's own per-layer graph); else fp32
        return {k: v.get("precision") if isinstance(v, dict)
                and v.get("precision") in ("int8", "int8-static", MIXED_LAYERS) else "fp32"
                for k, v in record.components.items()}

    @staticmethod
    def _holds_here(precision: str, record: PrecisionRecord) -> bool:
        """Whether an export's measurement of ``precision`` holds on this machine: int8 measured
        where int8 products are exact does not where they saturate (x86 without VNNI)."""
        if PRECISION_KINDS.get(precision) != "cpu" or not int8_saturates():
            return True
        if not (record.fidelity or {}).get("int8_saturates", True):
            log.info("%s: measured on a CPU with VNNI; this one saturates int8 products, so auto runs fp32", precision)
            return False
        return True

    def has(self, name: str) -> bool:
        return name in self.schema.components and self.component(name).exists()

    @property
    def name(self) -> str:
        return self.schema.source.name or self.path.name

    @property
    def model_hash(self) -> str | None:
        return self.schema.source.hash

    @property
    def architecture(self) -> str:
        return self.schema.architecture

    @property
    def prediction_type(self) -> str:
        return self.schema.prediction_type

    @property
    def latent_channels(self) -> int:
        return self.schema.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.schema.vae_scale_factor

    @property
    def latent_scale_factor(self) -> float:
        return self.schema.latent_scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        return self.schema.default_size

    @property
    def scheduler(self) -> dict:
        """The keyword arguments of ``schedules.alphas_cumprod``."""
        return self.schema.scheduler.to_json()

    @property
    def text_encoder(self) -> dict | None:
        """The manifest's ``text_encoder`` entry; None for the SDXL refiner (only ``text_encoder_2``)."""
        info = self.schema.text_encoder
        return info.to_json() if info is not None else None

    @property
    def text_encoder_2(self) -> dict | None:
        """SDXL's second text encoder (OpenCLIP bigG, with ``projection``); None for SD 1.x / 2.x."""
        info = self.schema.text_encoder_2
        return info.to_json() if info is not None else None


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle directory; one-line CheckpointError when it is not a readable bundle."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"not a bundle directory: {path}")
    native = (path / MANIFEST).exists()
    if native:
        raw = _read_json(path / MANIFEST)
        schema = Manifest.from_json(raw, path)
    else:
        schema = _infer_manifest(path)
        raw = schema.to_json()
    missing = [schema.components[n].path for n in required_components(schema.architecture)
               if not (path / schema.components[n].path).exists()]
    if missing:
        raise CheckpointError(f"bundle {path} is incomplete: missing {', '.join(missing)}")
    return Bundle(path, schema, native, raw)


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {p}: {e}") from None


def _infer_manifest(path: Path) -> Manifest:
    """The manifest of an optimum / diffusers ONNX bundle, read off its component configs.

    Its paths are the fixed optimum layout, not checked against symlinks: a Hugging Face hub
    snapshot links every file into the cache's blobs folder."""
    if not (path / "model_index.json").exists() and not (path / "unet" / "model.onnx").exists():
        raise CheckpointError(f"not a bundle: {path} has neither {MANIFEST} nor model_index.json")

    def config(rel: str) -> dict:
        p = path / rel
        d = _read_json(p) if p.exists() else {}
        if not isinstance(d, dict):
            raise CheckpointError(f"{p}: must be a JSON object, got {type(d).__name__}")
        return d

    sched = config("scheduler/scheduler_config.json")
    vae, unet, text = config("vae_decoder/config.json"), config("unet/config.json"), config("text_encoder/config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    sample_size = unet.get("sample_size", 64)
    cross = unet.get("cross_attention_dim", 768)
    # SDXL: a text_encoder_2 folder (the refiner's optimum export has no text_encoder)
    second = (path / "text_encoder_2").is_dir()
    first = (path / "text_encoder").is_dir() or not second
    if second:
        architecture = "sdxl" if first else "sdxl-refiner"
    else:
        architecture = {768: "sd1", 1024: "sd2"}.get(cross, "unknown")
        if text.get("hidden_act") == "gelu":  # OpenCLIP-H's erf GELU (CLIP ViT-L's is quick_gelu)
            architecture = "sd2"

    def text_entry(conf: dict, openclip: bool) -> dict:
        entry = {"hidden_size": conf.get("hidden_size", cross), "num_layers": conf.get("num_hidden_layers")}
        return entry | ({"pad_token_id": 0} if openclip else {})  # OpenCLIP pads with id 0

    texts = {"text_encoder": text_entry(text, architecture == "sd2")} if first else {}
    if second:
        texts["text_encoder_2"] = text_entry(config("text_encoder_2/config.json"), True)
    d = {
        "format": OPTIMUM_FORMAT,
        "architecture": architecture,
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "latent_channels": vae.get("latent_channels", 4),
        "vae_scale_factor": vae_scale,
        "latent_scale_factor": vae.get("scaling_factor", 0.18215),
        "default_size": [sample_size * vae_scale] * 2,
        "scheduler": Scheduler(**{k: sched[k] for k in Scheduler.__dataclass_fields__ if k in sched}).to_json(),
        **texts,
        "components": {n: {"path": component_path(n)} for n in COMPONENTS
                       if not n.startswith("text_encoder") or n in texts},
        "source": {"name": path.name},
    }
    where = f"{path} (optimum bundle)"
    m = _parse(d, _Fields(where))
    m.check(where)
    return m
