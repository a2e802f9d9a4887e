"""Checkpoint -> bundle directory (optimum / diffusers ONNX layout plus ``sdrt.json``).

The bundle is written into a temporary sibling directory and renamed into place, so an
interrupted export never leaves a half bundle behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sdrt.export import convert, load
from sdrt.export import graphs as onnx_export
from sdrt.export import quantize as precision_mod
from sdrt.export.configs import check_configs, sd1_configs
from sdrt.runtime import bundle as manifests
from sdrt.runtime import spec as specs
from sdrt.runtime.bundle import COMPONENTS, MANIFEST, file_sha256
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import PRECISION_KINDS, PRECISIONS
from sdrt.runtime.text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def load_checkpoint(source: str | Path) -> tuple[dict, dict, dict]:
    """Read a single-file checkpoint or a diffusers folder: (configs, component state dicts, source info)."""
    source = Path(source)
    if not source.exists():
        raise SdrtError(f"checkpoint not found: {source}")
    if source.is_dir():
        configs, components = load.load_diffusers_folder(source)
        info = {"name": source.name, "kind": "diffusers", "sha256": None, "hash": None}
        return configs, components, info
    state_dict = load.load_state_dict(source)
    load.detect_architecture(state_dict)  # refuses SD 2.x / SDXL with a clear line
    configs = embedded_configs(source) or sd1_configs()
    components = convert.ldm_to_diffusers(state_dict, configs)
    sha = file_sha256(source)
    info = {"name": source.stem, "kind": source.suffix.lstrip("."), "sha256": sha, "hash": sha[:10]}
    return configs, components, info


CONFIGS_METADATA = "sdrt.configs"


def embedded_configs(path: Path) -> dict | None:
    """Configs carried inside a checkpoint (``sdrt.configs``: the safetensors header, or a string
    entry of a .ckpt's top-level dict), as sdrt's scaled-down models have them: widths can be
    read off the weights, head counts cannot. None for checkpoints without them; a one-line
    error naming the field for configs sdrt cannot build (``check_configs``)."""
    text = None
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(CONFIGS_METADATA)
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            text = obj.get(CONFIGS_METADATA) if isinstance(obj, dict) else None
    except Exception:  # unreadable or refused files are reported by the loader with its own message
        return None
    if not text:
        return None
    try:
        configs = json.loads(text)
    except (TypeError, ValueError):
        raise SdrtError(f"{path.name}: the {CONFIGS_METADATA} entry is not valid JSON") from None
    return check_configs(configs, f"{path.name}: {CONFIGS_METADATA}")


def save_checkpoint(state_dict: dict, configs: dict, path: str | Path) -> Path:
    """Write an LDM-layout state dict with its configs, atomically: ``.safetensors`` (configs in
    the header) or a weights-only loadable ``.ckpt`` (``{"state_dict": ..., "sdrt.configs": str}``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    text = json.dumps(configs, sort_keys=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={CONFIGS_METADATA: text})
    else:
        torch.save({"state_dict": state_dict, CONFIGS_METADATA: text}, str(tmp))
    tmp.replace(path)
    return path


def export_checkpoint(source: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                      progress: Progress | None = None, optimize: bool = True,
                      precisions: tuple[str, ...] = ("fp32",)) -> Path:
    """Export a checkpoint (file or diffusers folder) to a bundle at ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SdrtError(f"output directory exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    configs, components, info = load_checkpoint(source)
    unet, vae, text_encoder = convert.build_modules(configs, components)
    tokenizer_dir = Path(source) / "tokenizer" if Path(source).is_dir() else None
    return export_modules(unet, vae, text_encoder, configs, out_dir, source=info,
                          tokenizer_dir=tokenizer_dir, overwrite=overwrite, progress=progress, optimize=optimize,
                          precisions=precisions)


def export_modules(unet, vae, text_encoder, configs: dict, out_dir: str | Path, *, source: dict,
                   tokenizer_dir: Path | None = None, overwrite: bool = False,
                   progress: Progress | None = None, optimize: bool = True,
                   precisions: tuple[str, ...] = ("fp32",)) -> Path:
    """Export torch modules (diffusers UNet/VAE, transformers CLIP text model) to a bundle.

    With ``optimize``, each component also gets ``model.cpu.onnx``: the graph passes of
    :mod:`sdrt.export.passes` (fused GroupNorm+SiLU, attention, GELU), for ONNX Runtime's CPU
    provider. It shares ``model.onnx_data`` with the portable ``model.onnx``, which stays standard
    ONNX for the other execution providers, TensorRT and other tools.

    ``precisions`` beyond fp32 (always written) add reduced-precision variants
    (:mod:`sdrt.export.quantize`): ``int8``, the CPU UNet quantized; ``fp16``, every component
    for the CUDA provider. Each is measured against fp32 on one short generation and recorded in
    the manifest's ``precisions``, which decides ``--precision auto``."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SdrtError(f"unknown precision {unknown[0]!r}; valid: {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the finished bundle private
    try:
        manifest = _write_bundle(unet, vae, text_encoder, configs, tmp, source, tokenizer_dir, progress, optimize)
        _save_manifest(tmp, manifest)
        if set(precisions) - {"fp32"}:
            _save_manifest(tmp, _write_precisions(tmp, manifest, precisions, optimize, progress))
        for f in tmp.rglob("*"):  # some writers (onnx's external data) create files private to the user
            if f.is_file():
                f.chmod(0o666 & ~umask)
        if out_dir.exists():
            if not overwrite:
                raise SdrtError(f"output directory appeared during export: {out_dir}")
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s", out_dir)
    return out_dir


def _save_manifest(bundle_dir: Path, manifest: manifests.Manifest) -> None:
    """Write ``sdrt.json``, checked as the runtime checks it: no export writes a bundle it refuses."""
    d = manifest.to_json()
    manifests.Manifest.from_json(d, bundle_dir)
    (bundle_dir / MANIFEST).write_text(json.dumps(d, indent=2) + "\n")


def _write_bundle(unet, vae, text_encoder, configs, tmp: Path, source: dict,
                  tokenizer_dir: Path | None, progress: Progress | None,
                  optimize: bool = True) -> manifests.Manifest:
    tconf, uconf, vconf = configs["text_encoder"], configs["unet"], configs["vae"]
    hidden, layers = tconf["hidden_size"], tconf["num_hidden_layers"]
    latent_channels = vconf["latent_channels"]
    vae_scale = 2 ** (len(vconf["block_out_channels"]) - 1)
    component_specs = {
        "text_encoder": specs.text_encoder_spec(hidden, layers),
        "unet": specs.unet_spec(uconf["in_channels"], uconf["out_channels"], uconf["cross_attention_dim"]),
        "vae_decoder": specs.vae_decoder_spec(latent_channels),
        "vae_encoder": specs.vae_encoder_spec(latent_channels),
    }
    graphs = {
        "text_encoder": onnx_export.TextEncoderGraph(text_encoder),
        "unet": onnx_export.UNetGraph(unet),
        "vae_decoder": onnx_export.VaeDecoderGraph(vae),
        "vae_encoder": onnx_export.VaeEncoderGraph(vae),
    }
    sizes = onnx_export.example_sizes()
    steps = len(COMPONENTS) + 1
    optimized = {}
    for i, name in enumerate(COMPONENTS):
        if progress:
            progress(f"exporting {name}", i, steps)
        path = onnx_export.export_component(graphs[name], component_specs[name], sizes, tmp / name)
        (tmp / name / "config.json").write_text(json.dumps(_component_config(name, configs), indent=2) + "\n")
        if optimize:
            optimized[name] = _optimize_component(path)
    if progress:
        progress("writing tokenizer and scheduler", len(COMPONENTS), steps)

    # Token embeddings are looked up by the runtime and fed to the text encoder graph
    table = text_encoder.get_input_embeddings().weight.detach().to(torch.float32).numpy()
    half = table.astype(np.float16)
    if np.array_equal(half.astype(np.float32), table):  # an fp16 checkpoint's table: same values, half the bytes
        table = half
    np.save(tmp / manifests.TOKEN_EMBEDDINGS, table)

    if tokenizer_dir is not None and (tokenizer_dir / "vocab.json").exists():
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        tokenizer = ClipTokenizer.from_dir(tmp / "tokenizer")
    else:
        tokenizer = ClipTokenizer.default()
        tokenizer.write_files(tmp / "tokenizer")
    sched = dict(configs["scheduler"])
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    if progress:
        progress("done", steps, steps)

    import diffusers
    import onnx
    import transformers

    from sdrt import runtime

    return manifests.Manifest(
        architecture="sd1",
        prediction_type=sched.get("prediction_type", "epsilon"),
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale,
        latent_scale_factor=vconf.get("scaling_factor", 0.18215),
        default_size=(uconf["sample_size"] * vae_scale,) * 2,
        scheduler=manifests.Scheduler(*(sched[k] for k in manifests.Scheduler.__dataclass_fields__)),
        text_encoder=manifests.TextEncoderInfo(hidden, layers, manifests.TOKEN_EMBEDDINGS,
                                               tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id),
        components={name: manifests.Component(manifests.component_path(name), "fp32", component_specs[name],
                                              optimized.get(name, {}))
                    for name in COMPONENTS},
        source=manifests.Source(**source),
        exporter={
            "sdrt": runtime.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "opset": onnx_export.OPSET,
        },
    )


def _optimize_component(path: Path) -> dict[str, manifests.Variant]:
    """Write ``model.cpu.onnx`` beside ``path`` when a fusion applies; its manifest entry."""
    import onnx

    from sdrt.export import passes

    # A dry run on the structure first: only graphs that gain a fusion get a second file (and have
    # their weights moved to model.onnx_data, so the two graphs share them)
    trial = passes.optimize(onnx.load(str(path), load_external_data=False), base_dir=path.parent)
    if not any(trial.counts().get(k) for k in passes.FUSIONS):
        return {}
    onnx_export.externalize(path)
    key = manifests.variant_key("cpu")
    target = path.with_name(f"model.{key}.onnx")
    report = passes.optimize_file(path, target)
    log.info("%s: %s", path.parent.name, report.summary())
    return {key: manifests.Variant(f"{path.parent.name}/{target.name}", "fp32", report.custom_ops,
                                   {"passes": report.counts()})}


def _write_precisions(tmp: Path, manifest: manifests.Manifest, precisions: tuple[str, ...], optimize: bool,
                      progress: Progress | None) -> manifests.Manifest:
    """Add the reduced-precision variants to a written bundle, measure each, return the manifest."""
    for precision in precisions:
        if precision == "fp32":
            continue
        kind, suffix = PRECISION_KINDS[precision], precision_mod.SUFFIXES[precision]
        key = manifests.variant_key(kind, precision)
        if progress:
            progress(f"writing {precision} graphs", 0, 2)
        names = COMPONENTS if precision == "fp16" else ("unet",)
        calibration = precision_mod.calibration_feeds(tmp) if precision == "int8-static" else None
        details = {}
        for name in names:
            entry = manifest.components[name]
            portable = tmp / entry.path
            target = portable.with_name(f"model.{suffix}.onnx")
            if precision == "fp16":
                counts = precision_mod.convert_fp16(portable, target)
                details[name] = counts
                manifest = manifest.with_variant(name, key, manifests.Variant(f"{name}/{target.name}", "fp16",
                                                                              details=counts))
                continue
            onnx_export.externalize(portable)
            if precision == "int8":
                # From the fused CPU graph when there is one: the quantized MatMuls then sit between
                # sdrt's GroupNorm and ONNX Runtime's MultiHeadAttention, as in model.cpu.onnx
                fused = entry.optimized.get(manifests.variant_key("cpu")) if optimize else None
                report = precision_mod.quantize_int8(tmp / fused.path if fused else portable, target)
            else:
                # From the portable graph (the calibration runs it on plain ONNX Runtime), fused after
                report = precision_mod.quantize_int8_static(portable, target, calibration, optimize=optimize)
            log.info("%s: %s", name, report.summary())
            manifest = manifest.with_variant(name, key, manifests.Variant(
                f"{name}/{target.name}", precision, report.custom_ops,
                {"quantized": report.counts, "bf16_attention": report.bf16_attention}))
            details[name] = report.counts
        ran = None if calibration is None else {"prompts": list(precision_mod.CALIBRATION_PROMPTS),
                                                "seed": precision_mod.CALIBRATION_SEED, "feeds": len(calibration)}
        record = manifests.PrecisionRecord(details, precision_mod.DEFAULT_MIN_PSNR, calibration=ran)
        manifest = manifest.with_precision(kind, precision, record)
        _save_manifest(tmp, manifest)
        # fp16 is measured where the export finds ONNX Runtime's CUDA provider; elsewhere it stays
        # unmeasured and opt-in (`sdrt verify --device cuda --precision fp16` measures it there)
        if kind == "cpu" or _cuda_available():
            if progress:
                progress(f"measuring {precision} against fp32", 1, 2)
            f = {**precision_mod.measure(tmp, precision, device=kind), "device": kind}
            record = dataclasses.replace(record, fidelity=f, default=f["default"])
            manifest = manifest.with_precision(kind, precision, record)
            log.info("%s: final image %s dB against fp32 (%s)", precision,
                     f["image_psnr"] if f["image_psnr"] is not None else "identical",
                     f"the {kind} default" if record.default else "opt-in")
    return manifest


def _cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _component_config(name: str, configs: dict) -> dict:
    key = {"text_encoder": "text_encoder", "unet": "unet"}.get(name, "vae")
    return dict(configs[key])


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
