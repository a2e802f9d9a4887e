"""One I/O spec per component: the exporter, the TensorRT profile builder and the runtime read it.

Axis names are symbolic strings; everything else is a fixed size. ``profile`` gives the
(min, opt, max) range of each symbolic axis for engines with optimisation profiles.
Graph I/O names follow the optimum / diffusers ONNX pipelines, so bundles move both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEXT_TOKENS = 77  # CLIP's context: 75 prompt tokens + BOS + EOS per chunk


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", "int32"
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # the bundle sub-folder: text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The torch.onnx ``dynamic_axes`` argument: symbolic axes of every input and output."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.shape)
        }

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict:
        def tensors(ts):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
            "profile": {k: list(v) for k, v in self.profile.items()},
        }

    @classmethod
    def from_json(cls, name: str, d: dict) -> ComponentSpec:
        """The spec a manifest's ``components[name]`` entry holds (the inverse of ``to_json``)."""
        def tensors(ts):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in ts)

        return cls(name, tensors(d["inputs"]), tensors(d["outputs"]),
                   {k: tuple(v) for k, v in d.get("profile", {}).items()})


# Latent sides from 256 to 1024 pixels (32..128 latents), batch 1..8 (a guided batch of 4 images)
_LATENT = (32, 64, 128)
_BATCH = (1, 2, 8)


def text_encoder_spec(hidden_size: int, num_layers: int, dtype: str = "float32", *, name: str = "text_encoder",
                      raw_states: bool = False) -> ComponentSpec:
    """CLIP text tower fed with token embeddings (looked up in the runtime, so textual inversion
    and weighting cost nothing); ``normed_hidden_states[i]`` is the final layer norm applied to
    the output of layer ``i + 1``, which is what the webui's CLIP skip reads.

    With ``raw_states`` (the SD 2.x and SDXL encoders) a third output ``hidden_states[i]`` is the
    output of layer ``i + 1`` itself, without the final norm: SDXL conditions on the raw
    penultimate layer. ``name`` is the component (``text_encoder_2`` for SDXL's second encoder)."""
    states = (num_layers, "batch", TEXT_TOKENS, hidden_size)
    raw = (TensorSpec("hidden_states", dtype, states),) if raw_states else ()
    return ComponentSpec(
        name,
        inputs=(TensorSpec("inputs_embeds", dtype, ("batch", TEXT_TOKENS, hidden_size)),),
        outputs=(
            TensorSpec("last_hidden_state", dtype, ("batch", TEXT_TOKENS, hidden_size)),
            TensorSpec("normed_hidden_states", dtype, states),
            *raw,
        ),
        profile={"batch": (1, 2, 16)},
    )


def unet_spec(in_channels: int, out_channels: int, context_dim: int, dtype: str = "float32", *,
              added: tuple[int, int] | None = None) -> ComponentSpec:
    """The denoiser; ``added`` = (pooled width, number of time ids) for SDXL's added conditioning,
    the inputs optimum names ``text_embeds`` [batch, pooled] and ``time_ids`` [batch, 6] (the
    refiner's 5), both in the graph's float dtype."""
    extra = () if added is None else (TensorSpec("text_embeds", dtype, ("batch", added[0])),
                                      TensorSpec("time_ids", dtype, ("batch", added[1])))
    return ComponentSpec(
        "unet",
        inputs=(
            TensorSpec("sample", dtype, ("batch", in_channels, "height", "width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", dtype, ("batch", "sequence", context_dim)),
            *extra,
        ),
        outputs=(TensorSpec("out_sample", dtype, ("batch", out_channels, "height", "width")),),
        profile={"batch": _BATCH, "height": _LATENT, "width": _LATENT, "sequence": (77, 77, 231)},
    )


def vae_decoder_spec(latent_channels: int, dtype: str = "float32") -> ComponentSpec:
    return ComponentSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent_sample", dtype, ("batch", latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", dtype, ("batch", 3, "image_height", "image_width")),),
        profile={"batch": (1, 1, 4), "height": _LATENT, "width": _LATENT},
    )


def vae_encoder_spec(latent_channels: int, dtype: str = "float32") -> ComponentSpec:
    """Outputs the diagonal Gaussian's parameters (mean, log-variance) along channels."""
    return ComponentSpec(
        "vae_encoder",
        inputs=(TensorSpec("sample", dtype, ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("latent_parameters", dtype, ("batch", 2 * latent_channels, "height", "width")),),
        profile={"batch": (1, 1, 4), "image_height": (256, 512, 1024), "image_width": (256, 512, 1024)},
    )
