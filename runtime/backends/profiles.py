"""TensorRT optimisation profiles from the I/O spec.

``sdrt build`` takes sizes in the user's units (images per batch, pixels, prompt chunks);
``component_axes`` turns them into sizes of each component's symbolic axes and ``profile_shapes``
into TensorRT's (min, opt, max) shapes per input, read off the same ``ComponentSpec`` the exporter
and the runtime use. Equal min and max give a static engine (fastest, CUDA-graph capturable).
Both TensorRT routes (sdrt's engines, ONNX Runtime's TensorRT EP) build from these profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import TEXT_TOKENS, ComponentSpec

ENGINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # those a bundle has (SDXL: both
# text encoders; the refiner: text_encoder_2 only)
PRECISIONS = ("fp16", "fp32")

Range = tuple[int, int, int]
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


@dataclass(frozen=True)
class BuildShapes:
    """What engines are built for, in the user's units; each a (min, opt, max) range."""

    batch: Range             # images per batch
    height: Range            # pixels
    width: Range             # pixels
    chunks: Range = (1, 1, 1)  # 75-token prompt chunks: the UNet's sequence is 77 per chunk
    vae_tile: int | None = None  # latent side of the VAE decoder's tiles (tiled decoding), if any

    @property
    def static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width, self.chunks))


def dim_range(name: str, value: int | None, lo: int | None = None, hi: int | None = None) -> Range:
    """``--width 512`` -> (512, 512, 512); ``--min-width 256 --width 512 --max-width 1024`` -> a range
    with 512 as the size TensorRT tunes for (a missing bound is the value, a missing value the min)."""
    if value is None and lo is None and hi is None:
        raise SdrtError(f"no {name} given")
    opt = value if value is not None else (lo if lo is not None else hi)
    r = (lo if lo is not None else opt, opt, hi if hi is not None else opt)
    if not r[0] <= r[1] <= r[2]:
        raise SdrtError(f"{name}: min {r[0]} <= opt {r[1]} <= max {r[2]} does not hold")
    return r


def build_shapes(*, width: Range, height: Range, batch: Range = (1, 1, 1), chunks: Range = (1, 1, 1),
                 vae_tile: int | None = None, vae_scale_factor: int = 8) -> BuildShapes:
    """Validated shapes: pixel sizes positive multiples of 8 (and of the VAE's factor), counts >= 1,
    min <= opt <= max; ``vae_tile`` in pixels."""
    multiple = max(8, vae_scale_factor)
    for name, r in (("width", width), ("height", height)):
        for v in r:
            if v <= 0 or v % multiple:
                raise SdrtError(f"{name} must be a positive multiple of {multiple}, got {v}")
    for name, r in (("width", width), ("height", height), ("batch", batch), ("prompt chunks", chunks)):
        if not r[0] <= r[1] <= r[2]:
            raise SdrtError(f"{name}: min {r[0]} <= opt {r[1]} <= max {r[2]} does not hold")
    for name, r in (("batch", batch), ("prompt chunks", chunks)):
        if r[0] < 1:
            raise SdrtError(f"{name} must be at least 1, got {r[0]}")
    tile = None
    if vae_tile is not None:
        if vae_tile <= 0 or vae_tile % multiple:
            raise SdrtError(f"VAE tile size must be a positive multiple of {multiple}, got {vae_tile}")
        tile = vae_tile // vae_scale_factor
    return BuildShapes(tuple(batch), tuple(height), tuple(width), tuple(chunks), tile)


def component_axes(spec: ComponentSpec, shapes: BuildShapes, vae_scale_factor: int = 8) -> dict[str, Range]:
    """Sizes of a component's symbolic axes for ``shapes``.

    The UNet sees the guided batch: a static batch of B images is built for 2B rows (conditional
    and unconditional); a range spans B_min rows (CFG scale 1) to 2 B_max. The text encoder keeps
    the batch range of its spec (it runs on prompt chunks, not images). The VAE decodes one image
    at a time, or tiles of ``vae_tile`` latents."""
    f = vae_scale_factor

    def latent(r: Range) -> Range:
        return tuple(v // f for v in r)

    if spec.name in ("text_encoder", "text_encoder_2"):
        return {"batch": spec.profile.get("batch", (1, 2, 16))}
    if spec.name == "unet":
        b = shapes.batch
        batch = (2 * b[0],) * 3 if b[0] == b[2] else (b[0], 2 * b[1], 2 * b[2])
        return {"batch": batch, "height": latent(shapes.height), "width": latent(shapes.width),
                "sequence": tuple(TEXT_TOKENS * c for c in shapes.chunks)}
    if spec.name == "vae_decoder":
        h, w = latent(shapes.height), latent(shapes.width)
        if shapes.vae_tile:
            h, w = (tuple(min(shapes.vae_tile, v) for v in r) for r in (h, w))
        return {"batch": (1, 1, 1), "height": h, "width": w}
    if spec.name == "vae_encoder":
        return {"batch": (1, 1, 1), "image_height": shapes.height, "image_width": shapes.width}
    raise SdrtError(f"no engine profile for component {spec.name!r}")


def engine_components(bundle) -> tuple[str, ...]:
    """The components of ``bundle`` that get engines, in build order."""
    return tuple(name for name in ENGINE_COMPONENTS if bundle.has(name))


def profile_shapes(spec: ComponentSpec, axes: dict[str, Range]) -> Shapes:
    """TensorRT's (min, opt, max) shape of every input: fixed dims from the spec, symbolic ones from ``axes``."""
    out = {}
    for t in spec.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, str):
                if d not in axes:
                    raise SdrtError(f"{spec.name}: no size for axis {d!r} of input {t.name}")
                dims.append(tuple(axes[d]))
            else:
                dims.append((d, d, d))
        out[t.name] = tuple(tuple(r[i] for r in dims) for i in range(3))
    return out


def covers(shapes: Shapes, feeds: dict[str, tuple[int, ...]]) -> bool:
    """Whether every fed shape lies within the profile."""
    for name, shape in feeds.items():
        if name not in shapes:
            return False
        lo, _, hi = shapes[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def is_static(shapes: Shapes) -> bool:
    return all(lo == hi for lo, _, hi in shapes.values())


def describe(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())


def bundle_spec(bundle, name: str) -> ComponentSpec:
    """The component's I/O spec, which both TensorRT routes need; one-line error for bundles without it."""
    spec = bundle.spec(name)
    if spec is None:
        raise SdrtError(f"TensorRT engines need the I/O spec of an sdrt bundle; {bundle.path} has none for {name} "
                        "(exported by optimum?): re-export the checkpoint with `sdrt export`")
    return spec
