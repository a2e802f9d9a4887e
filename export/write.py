"""Checkpoint -> bundle directory (optimum / diffusers ONNX layout plus ``sdrt.json``).

The bundle is written into a temporary sibling directory and renamed into place, so an
interrupted export never leaves a half bundle behind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from sdrt.export import convert, load, provenance
from sdrt.export import graphs as onnx_export
from sdrt.export import optimum as optimum_graph
from sdrt.export import quantize as precision_mod
from sdrt.export.configs import (
    architecture_of,
    check_configs,
    family_configs,
    sd1_configs,
    text_encoder_names,
)
from sdrt.runtime import bundle as manifests
from sdrt.runtime import spec as specs
from sdrt.runtime.bundle import COMPONENTS, MANIFEST, file_sha256
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import MIXED_LAYERS, PRECISION_KINDS, PRECISIONS
from sdrt.runtime.text.tokenizer import EOS_TOKEN, ClipTokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def load_checkpoint(source: str | Path) -> tuple[dict, dict, dict]:
    """Read a single-file checkpoint or a diffusers folder: (configs, component state dicts, source info).

    A single file's configs are the ones it carries (``sdrt.configs``), else the shipped ones of
    its family (:func:`sdrt.export.configs.family_configs`: SD 1.5, SD 2.x 512 base, SDXL base,
    the refiner); an SD 2.x file's prediction type is then still open (:func:`decide_prediction`)."""
    source = Path(source)
    if not source.exists():
        raise SdrtError(f"checkpoint not found: {source}")
    if source.is_dir():
        configs, components = load.load_diffusers_folder(source)
        info = {"name": source.name, "kind": "diffusers", "sha256": None, "hash": None}
        return configs, components, info
    state_dict = load.load_state_dict(source)
    arch = load.detect_architecture(state_dict)
    family = convert.family_of(arch)
    configs = embedded_configs(source)
    if configs is None:
        configs = family_configs(family) if family in convert.SUPPORTED else sd1_configs()
        if arch.endswith("-inpaint"):
            # an inpainting UNet: the latents, the mask and the masked image's latents in (4 + 1 + 4)
            configs["unet"]["in_channels"] = 9
    components = convert.ldm_to_diffusers(state_dict, configs)  # refuses other families with a clear line
    sha = file_sha256(source)
    info = {"name": source.stem, "kind": source.suffix.lstrip("."), "sha256": sha, "hash": sha[:10]}
    return configs, components, info


def decide_prediction(configs: dict, unet, prediction: str | None = None) -> tuple[dict, dict]:
    """The configs with their prediction type settled, and the record of how (for the manifest's
    ``exporter.prediction``).

    ``prediction`` (``eps`` / ``v``, ``sdrt export --prediction``) overrides; for SD 2.x with the
    shipped configs it also picks the model (512 base or 768-v, hence the default size). Else a
    config that names a prediction type (diffusers folders, sdrt's own files, SD 1.x and SDXL's
    shipped configs) keeps it, and an SD 2.x one that does not is decided by the webui's probe
    (:mod:`sdrt.export.prediction`)."""
    from sdrt.export import prediction as probe

    configs = copy.deepcopy(configs)
    shipped_sd2 = {k: configs.get(k) for k in ("unet", "vae")} == {k: family_configs("sd2").get(k)
                                                                  for k in ("unet", "vae")}
    named = "prediction_type" in configs["scheduler"] and not shipped_sd2
    record: dict = {}
    if prediction is not None:
        if prediction not in probe.PREDICTIONS:
            raise SdrtError(f"unknown prediction {prediction!r}; valid: {', '.join(probe.PREDICTIONS)}")
        kind, record["by"] = probe.PREDICTIONS[prediction], "--prediction"
    elif named or architecture_of(configs) != "sd2":
        kind, record["by"] = configs["scheduler"].get("prediction_type", "epsilon"), "config"
    else:
        value = probe.v_probe(unet)
        kind = "v_prediction" if probe.is_v_prediction(value) else "epsilon"
        record |= {"by": "probe", "probe": value, "threshold": probe.V_THRESHOLD}
        log.info("SD 2.x prediction: %s (the webui's probe: mean(out - x) = %.3f, v below %s)", kind, value,
                 probe.V_THRESHOLD)
    if shipped_sd2:  # the 768-v model: its sizes and schedule (the same weights' shapes as the base)
        configs = family_configs("sd2-v" if kind == "v_prediction" else "sd2")
    configs["scheduler"]["prediction_type"] = kind
    return configs, {"type": kind, **record}


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
                      precisions: tuple[str, ...] = ("fp32",), prediction: str | None = None) -> Path:
    """Export a checkpoint (file or diffusers folder; SD 1.x, SD 2.x, SDXL, the refiner) to a bundle
    at ``out_dir``. ``prediction`` (``eps`` / ``v``) overrides the prediction type
    (:func:`decide_prediction`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SdrtError(f"output directory exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    configs, components, info = load_checkpoint(source)
    # The modules take the tensors over (an fp16 file's are freed one by one as they are converted)
    unet, vae, text_encoder, *rest = convert.build_modules(configs, components, release=True)
    del components
    configs, decided = decide_prediction(configs, unet, prediction)
    tokenizer_dir = Path(source) / "tokenizer" if Path(source).is_dir() else None
    return export_modules(unet, vae, text_encoder, configs, out_dir, source=info,
                          text_encoder_2=rest[0] if rest else None, tokenizer_dir=tokenizer_dir,
                          overwrite=overwrite, progress=progress, optimize=optimize, precisions=precisions,
                          notes={"prediction": decided})


def export_modules(unet, vae, text_encoder, configs: dict, out_dir: str | Path, *, source: dict,
                   text_encoder_2=None, tokenizer_dir: Path | None = None, overwrite: bool = False,
                   progress: Progress | None = None, optimize: bool = True,
                   precisions: tuple[str, ...] = ("fp32",), notes: dict | None = None) -> Path:
    """Export torch modules (diffusers UNet/VAE, transformers CLIP text model) to a bundle.

    The family follows ``configs`` (:func:`sdrt.export.configs.architecture_of`): SDXL passes its
    OpenCLIP bigG ``CLIPTextModelWithProjection`` as ``text_encoder_2`` (the refiner has only that
    one: ``text_encoder`` None); SD 2.x and SDXL text encoder graphs also output the raw
    ``hidden_states``, SDXL's UNet takes ``text_embeds`` and ``time_ids``.

    With ``optimize``, each component also gets ``model.cpu.onnx``: the graph passes of
    :mod:`sdrt.export.passes` (fused GroupNorm+SiLU, attention, GELU), for ONNX Runtime's CPU
    provider. It shares ``model.onnx_data`` with the portable ``model.onnx``, which stays standard
    ONNX for the other execution providers, TensorRT and other tools.

    ``precisions`` beyond fp32 (always written) add reduced-precision variants
    (:mod:`sdrt.export.quantize`): ``int8``, the CPU UNet quantized; ``fp16``, every component
    for the CUDA provider. Each is measured against fp32 on one short generation and recorded in
    the manifest's ``precisions``, which decides ``--precision auto``. ``notes`` join the
    manifest's ``exporter`` record (``export_checkpoint``: how the prediction type was decided)."""
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
        text_encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        given = {name: module for name, module in text_encoders.items() if module is not None}
        if tuple(given) != text_encoder_names(configs):
            raise SdrtError(f"{architecture_of(configs)} configs need the text encoders "
                            f"{', '.join(text_encoder_names(configs))}; given {', '.join(given) or 'none'}")
        manifest = _write_bundle(unet, vae, given, configs, tmp, source, tokenizer_dir, progress, optimize)
        if notes:
            manifest = dataclasses.replace(manifest, exporter={**manifest.exporter, **notes})
        _save_manifest(tmp, manifest)
        if set(precisions) - {"fp32"}:
            _save_manifest(tmp, _write_precisions(tmp, manifest, precisions, optimize, progress))
        # Which source weight each graph initializer holds, for LoRA and VAE files (export/provenance.py)
        provenance.write_provenance(tmp, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                                          "unet": unet, "vae_decoder": vae, "vae_encoder": vae}, configs)
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


# Where each text encoder's token table and pad id go; OpenCLIP pads with id 0 after the first end
# token (the webui's FrozenOpenCLIPEmbedder*WithCustomWords), CLIP ViT-L with eos
_TOKEN_TABLES = {"text_encoder": manifests.TOKEN_EMBEDDINGS, "text_encoder_2": manifests.TOKEN_EMBEDDINGS_2}
_OPENCLIP_PAD = 0
_OPENCLIP_PAD_TOKEN = "!"  # id 0, the pad token of the published SD 2.x and SDXL tokenizers


def _pad_token(architecture: str, conf: dict | None) -> str:
    """The pad token of a written ``tokenizer/`` folder: OpenCLIP's for SD 2.x, the end token otherwise."""
    openclip = architecture != "sd1" and conf is not None and conf.get("hidden_act") == "gelu"
    return _OPENCLIP_PAD_TOKEN if openclip else EOS_TOKEN


def _write_bundle(unet, vae, text_encoders: dict, configs, tmp: Path, source: dict,
                  tokenizer_dir: Path | None, progress: Progress | None,
                  optimize: bool = True) -> manifests.Manifest:
    """Write every component of ``text_encoders`` ({component: module}), the UNet and the VAE."""
    architecture = architecture_of(configs)
    uconf, vconf = configs["unet"], configs["vae"]
    latent_channels = vconf["latent_channels"]
    vae_scale = 2 ** (len(vconf["block_out_channels"]) - 1)
    raw_states = architecture != "sd1"  # sd1 graphs stay as they were: two outputs
    added = None
    if uconf.get("addition_embed_type") == "text_time":
        time_ids = (uconf["projection_class_embeddings_input_dim"] - configs["text_encoder_2"]["projection_dim"]) \
            // uconf["addition_time_embed_dim"]
        added = (configs["text_encoder_2"]["projection_dim"], time_ids)
    component_specs = {
        name: specs.text_encoder_spec(configs[name]["hidden_size"], configs[name]["num_hidden_layers"], name=name,
                                      raw_states=raw_states)
        for name in text_encoders
    }
    component_specs |= {
        "unet": specs.unet_spec(uconf["in_channels"], uconf["out_channels"], uconf["cross_attention_dim"], added=added),
        "vae_decoder": specs.vae_decoder_spec(latent_channels),
        "vae_encoder": specs.vae_encoder_spec(latent_channels),
    }
    graphs = {name: onnx_export.TextEncoderGraph(module, raw_states=raw_states)
              for name, module in text_encoders.items()}
    graphs |= {
        "unet": onnx_export.UNetAddedGraph(unet) if added else onnx_export.UNetGraph(unet),
        "vae_decoder": onnx_export.VaeDecoderGraph(vae),
        "vae_encoder": onnx_export.VaeEncoderGraph(vae),
    }
    names = [n for n in COMPONENTS if n in graphs]
    sizes = onnx_export.example_sizes()
    steps = len(names) + 1
    optimized, graph_paths = {}, {}
    for i, name in enumerate(names):
        if progress:
            progress(f"exporting {name}", i, steps)
        filename = manifests.EMBEDS_GRAPH if name in text_encoders else "model.onnx"
        graph_paths[name] = f"{name}/{filename}"
        path = onnx_export.export_component(graphs[name], component_specs[name], sizes, tmp / name, filename)
        (tmp / name / "config.json").write_text(json.dumps(_component_config(name, configs), indent=2) + "\n")
        if name in text_encoders:  # the token-id graph written below shares these weights
            onnx_export.externalize(path)
        if optimize:
            optimized[name] = _optimize_component(path)
    if progress:
        progress("writing tokenizer and scheduler", len(names), steps)

    # Token embeddings are looked up by the runtime and fed to the text encoder graphs
    tables = {}
    for name, module in text_encoders.items():
        table = module.get_input_embeddings().weight.detach().to(torch.float32).numpy()
        half = table.astype(np.float16)
        if np.array_equal(half.astype(np.float32), table):  # an fp16 checkpoint's table: same values, half the bytes
            table = half
        np.save(tmp / _TOKEN_TABLES[name], table)
        tables[name] = table
    projection = projection_matrix = None
    if "text_encoder_2" in text_encoders:  # OpenCLIP bigG's pooled output: h_eos @ P, P = [hidden, projection]
        weight = text_encoders["text_encoder_2"].text_projection.weight.detach().to(torch.float32)
        projection_matrix = np.ascontiguousarray(weight.T.numpy())
        np.save(tmp / manifests.TEXT_PROJECTION, projection_matrix)
        projection = manifests.TEXT_PROJECTION

    if tokenizer_dir is not None and (tokenizer_dir / "vocab.json").exists():
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        tokenizer = ClipTokenizer.from_dir(tmp / "tokenizer")
    else:
        tokenizer = ClipTokenizer.default()
        # diffusers' pipelines pad with the tokenizer's pad token: OpenCLIP's is "!" (id 0)
        tokenizer.write_files(tmp / "tokenizer", pad_token=_pad_token(architecture, configs.get("text_encoder")))
    if "text_encoder_2" in text_encoders:  # the optimum / diffusers SDXL layout has a second tokenizer folder
        second = tokenizer_dir.parent / "tokenizer_2" if tokenizer_dir is not None else None
        if second is not None and (second / "vocab.json").exists():
            shutil.copytree(second, tmp / "tokenizer_2")
        else:
            tokenizer.write_files(tmp / "tokenizer_2", pad_token=_OPENCLIP_PAD_TOKEN)
    # The graphs optimum's pipelines run (text_encoder*/model.onnx): sdrt's, fed with token ids
    token_ids = {}
    for name in text_encoders:
        pooled = projection_matrix if name == "text_encoder_2" else None
        ids_spec = optimum_graph.ids_spec(configs[name]["hidden_size"], configs[name]["num_hidden_layers"], name=name,
                                          raw_states=raw_states, projection_dim=None if pooled is None
                                          else pooled.shape[1])
        optimum_graph.write_ids_graph(tmp / graph_paths[name], tmp / manifests.component_path(name), ids_spec,
                                      tables[name], tokenizer.eos_id, pooled)
        token_ids[name] = manifests.TokenIdsGraph(manifests.component_path(name), ids_spec)
    sched = dict(configs["scheduler"])
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    (tmp / "model_index.json").write_text(json.dumps(_model_index(configs), indent=2) + "\n")
    if progress:
        progress("done", steps, steps)

    def info(name: str) -> manifests.TextEncoderInfo | None:
        if name not in text_encoders:
            return None
        conf = configs[name]
        pad = tokenizer.pad_id if architecture == "sd1" or conf.get("hidden_act") != "gelu" else _OPENCLIP_PAD
        return manifests.TextEncoderInfo(conf["hidden_size"], conf["num_hidden_layers"], _TOKEN_TABLES[name],
                                         tokenizer.bos_id, tokenizer.eos_id, pad,
                                         projection if name == "text_encoder_2" else None)

    import diffusers
    import onnx
    import transformers

    from sdrt import runtime

    return manifests.Manifest(
        architecture=architecture,
        prediction_type=sched.get("prediction_type", "epsilon"),
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale,
        latent_scale_factor=vconf.get("scaling_factor", 0.18215),
        default_size=(uconf["sample_size"] * vae_scale,) * 2,
        scheduler=manifests.Scheduler(*(sched[k] for k in manifests.Scheduler.__dataclass_fields__)),
        text_encoder=info("text_encoder"),
        text_encoder_2=info("text_encoder_2"),
        components={name: manifests.Component(graph_paths[name], "fp32", component_specs[name],
                                              optimized.get(name, {}), token_ids.get(name))
                    for name in names},
        source=manifests.Source(**source),
        exporter={
            "sdrt": runtime.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "opset": onnx_export.OPSET,
        },
        format_version=manifests.format_version_for(architecture),
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
    """Add the reduced-precision variants to a written bundle, measure each, return the manifest.

    ``mixed`` needs ``int8`` and ``int8-static`` (added when not asked) and comes last, choosing
    per component from their measurements, and per layer where int8-static missed the bar
    (:func:`_write_mixed`; it reuses int8-static's calibration)."""
    if "mixed" in precisions:
        precisions = (*dict.fromkeys(p for p in (*precisions, "int8", "int8-static") if p != "mixed"), "mixed")
    with tempfile.TemporaryDirectory(prefix=".calibration-", dir=tmp) as ranges_dir:
        return _write_variants(tmp, manifest, precisions, optimize, progress, Path(ranges_dir))


@dataclasses.dataclass
class _Calibration:
    """int8-static's calibration, kept for ``mixed``'s layer search: the feeds per component and
    the files of their calibrated activation ranges."""
    feeds: dict[str, list[dict]]
    ranges: dict[str, Path]


def _write_variants(tmp: Path, manifest: manifests.Manifest, precisions: tuple[str, ...], optimize: bool,
                    progress: Progress | None, ranges_dir: Path) -> manifests.Manifest:
    static: _Calibration | None = None
    for precision in precisions:
        if precision == "fp32":
            continue
        if precision == "mixed":
            manifest = _write_mixed(tmp, manifest, progress, static, optimize)
            continue
        kind, suffix = PRECISION_KINDS[precision], precision_mod.SUFFIXES[precision]
        key = manifests.variant_key(kind, precision)
        if progress:
            progress(f"writing {precision} graphs", 0, 2)
        names = ([n for n in COMPONENTS if n in manifest.components] if precision == "fp16"
                 else [n for n in precision_mod.STATIC_COMPONENTS if n in manifest.components]
                 if precision == "int8-static" else ("unet",))
        calibration = precision_mod.calibration_feeds(tmp, components=tuple(names)) \
            if precision == "int8-static" else None
        if calibration is not None:
            static = _Calibration(calibration, {n: ranges_dir / f"{n}.json" for n in names})
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
                report = precision_mod.quantize_int8_static(portable, target, calibration[name], optimize=optimize,
                                                            stream_input=precision_mod.STATIC_COMPONENTS[name],
                                                            ranges=static.ranges[name])
            log.info("%s: %s", name, report.summary())
            kept = {"kept_float": report.kept_float} if report.kept_float else {}
            manifest = manifest.with_variant(name, key, manifests.Variant(
                f"{name}/{target.name}", precision, report.custom_ops,
                {"quantized": report.counts, "bf16_attention": report.bf16_attention, **kept}))
            details[name] = {**report.counts, **kept}
        ran = None if calibration is None else {"prompts": list(precision_mod.CALIBRATION_PROMPTS),
                                                "seed": precision_mod.CALIBRATION_SEED,
                                                "feeds": len(calibration["unet"]),
                                                **{f"{n}_feeds": len(calibration[n]) for n in names if n != "unet"}}
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


def _write_mixed(tmp: Path, manifest: manifests.Manifest, progress: Progress | None,
                 static: _Calibration | None = None, optimize: bool = True) -> manifests.Manifest:
    """The ``mixed`` CPU precision: per component the fastest variant whose own measured effect on
    the final image reached the bar (``components`` of each precision's measurement): int8-static,
    then int8-static with its least faithful layers kept in fp32 (:class:`_LayerSearch`, for the
    components whose int8-static missed the bar; each count of layers kept that held is an option,
    fewest first), then int8; the rest fp32. The combination is then measured as a whole, and while
    it misses the bar the component whose choice cost the most steps down to its next option."""
    cpu = manifest.precisions.get("cpu", {})

    def effects(precision: str) -> dict:
        return ((cpu.get(precision) or manifests.PrecisionRecord({})).fidelity or {}).get("components", {})

    reference: dict = {}  # the fp32 generations, measured once for every measurement below
    missed = [name for name, effect in effects("int8-static").items()
              if not effect.get("default") and name in precision_mod.STATIC_COMPONENTS]
    search = None
    if missed and static is not None and all(p.exists() for p in static.ranges.values()):
        search = _LayerSearch(tmp, static, optimize, reference)
        manifest = search.run(manifest, missed, progress)
    elif missed and static is not None:
        log.warning("mixed: this onnxruntime keeps no calibration cache; no per-layer search")
    # component -> [(precision, its own PSNR, layers kept in fp32)], fastest first
    options: dict[str, list[tuple[str, float | None, int | None]]] = {}
    for name in manifest.components:
        choices = []
        for precision in ("int8-static", MIXED_LAYERS, "int8"):
            if precision == MIXED_LAYERS:
                choices += [(precision, db, k) for k, db in (search.held.get(name, []) if search else [])]
            elif (effect := effects(precision).get(name)) and effect.get("default"):
                choices.append((precision, effect.get("image_psnr"), None))
        if choices:
            options[name] = choices
    choice = {name: 0 for name in manifest.components if name in options}  # in the bundle's order
    tried = []
    while True:
        picked = {name: options[name][i] if i < len(options[name]) else ("fp32", None, None)
                  for name, i in choice.items()}
        chosen = {name: p for name, (p, _, _) in picked.items()}
        for name, (p, _, k) in picked.items():
            if p == MIXED_LAYERS:
                manifest = search.write(manifest, name, k)
        components = {name: {"precision": p, "own_image_psnr": db,
                             **({"layers": search.record(name, k)} if p == MIXED_LAYERS else {})}
                      for name, (p, db, k) in picked.items()}
        record = manifests.PrecisionRecord(components, precision_mod.DEFAULT_MIN_PSNR)
        manifest = manifest.with_precision("cpu", "mixed", record)
        _save_manifest(tmp, manifest)
        if all(p == "fp32" for p in chosen.values()):
            break  # nothing held its own: mixed is fp32, opt-in and not measured
        if progress:
            progress("measuring mixed against fp32", 1, 2)
        f = {**precision_mod.measure(tmp, "mixed", device="cpu", reference=reference), "device": "cpu",
             "tried": tried}
        record = dataclasses.replace(record, fidelity=f, default=f["default"])
        manifest = manifest.with_precision("cpu", "mixed", record)
        log.info("mixed (%s): final image %s dB against fp32",
                 ", ".join(f"{n} {p}" + (f" ({k} layers in fp32)" if k is not None else "")
                           for n, (p, _, k) in picked.items()), f["image_psnr"])
        if f["default"]:
            break
        tried.append({"components": {n: p if k is None else f"{p}, {k} layers in fp32"
                                     for n, (p, _, k) in picked.items()}, "image_psnr": f["image_psnr"]})
        # the choice whose own effect was the largest (lowest PSNR) steps down
        worst = min((n for n, p in chosen.items() if p != "fp32"),
                    key=lambda n: components[n]["own_image_psnr"] or float("inf"))
        choice[worst] += 1
    for name in (search.held if search else {}):  # a per-layer graph the combination stepped down from goes
        if chosen.get(name) != MIXED_LAYERS:
            manifest = _drop_variant(tmp, manifest, name, manifests.variant_key("cpu", "mixed"))
    return manifest


def _drop_variant(tmp: Path, manifest: manifests.Manifest, name: str, key: str) -> manifests.Manifest:
    """The manifest without ``name``'s optimized graph ``key``, whose files are deleted."""
    variant = manifest.components[name].optimized.get(key)
    if variant is None:
        return manifest
    (tmp / variant.path).unlink(missing_ok=True)
    (tmp / variant.path).with_suffix(".onnx_data").unlink(missing_ok=True)
    return manifest.without_variant(name, key)


LAYER_SEARCH_ROUNDS = 5  # bisections of the count of layers kept in fp32: resolution N / 32


class _LayerSearch:
    """For components whose int8-static graph missed the bar on its own: how many of their int8
    layers to keep in fp32 for their own effect on the final image to reach it.

    Each layer's own quantization error is measured first (:func:`precision_mod.layer_sensitivity`,
    on the calibration's activations) and the layers are ranked by it, least faithful first. Then
    the count ``k`` of the least faithful kept in fp32 is bisected on the final image
    (``measure``, the component's own effect, the rest fp32): ``k = 0`` is int8-static, which
    missed; ``k = N`` is the fp32 graph. The components are searched in the same measurements. A
    graph written for a count is the component's ``cpu-mixed`` variant (``model.cpu-mixed.onnx``);
    its ``kept_float`` names each layer kept with its measured error. ``held``: {component: [(k,
    its own PSNR)]} of the counts that held, fewest first."""

    def __init__(self, tmp: Path, static: _Calibration, optimize: bool, reference: dict):
        self.tmp, self.static, self.optimize, self.reference = tmp, static, optimize, reference
        self.ranked: dict[str, list[str]] = {}
        self.sensitivity: dict[str, dict] = {}
        self.held: dict[str, list[tuple[int, float | None]]] = {}
        self.rounds: list[dict] = []
        self._written: dict[str, int] = {}

    def run(self, manifest: manifests.Manifest, names: list[str], progress: Progress | None) -> manifests.Manifest:
        for i, name in enumerate(names):
            if progress:
                progress(f"mixed: measuring {name}'s layers in int8 one at a time", i, len(names))
            portable = self.tmp / manifest.components[name].path
            stream = precision_mod.STATIC_COMPONENTS[name]
            targets, _ = precision_mod.static_targets(onnx.load(str(portable), load_external_data=False), stream)
            db = precision_mod.layer_sensitivity(portable, self.static.feeds[name],
                                                 precision_mod.calibrated_ranges(self.static.ranges[name]), targets)
            self.sensitivity[name] = db
            self.ranked[name] = sorted(db, key=lambda n: (np.inf if db[n] is None else db[n], n))
        lo = dict.fromkeys(names, 0)
        hi = {name: len(self.ranked[name]) for name in names}
        for r in range(LAYER_SEARCH_ROUNDS):
            trial = {name: (lo[name] + hi[name]) // 2 for name in names if hi[name] - lo[name] > 1}
            if not trial:
                break
            if progress:
                progress(f"mixed: layer search, round {r + 1} of {LAYER_SEARCH_ROUNDS}", r, LAYER_SEARCH_ROUNDS)
            for name, k in trial.items():
                manifest = self.write(manifest, name, k)
            record = manifests.PrecisionRecord({name: {"precision": MIXED_LAYERS} for name in trial},
                                               precision_mod.DEFAULT_MIN_PSNR)
            manifest = manifest.with_precision("cpu", "mixed", record)
            _save_manifest(self.tmp, manifest)
            f = precision_mod.measure(self.tmp, "mixed", device="cpu", reference=self.reference)
            step = {}
            for name, k in trial.items():
                own = f["components"].get(name) or {"default": True, "image_psnr": None}
                step[name] = {"kept_float": k, "image_psnr": own["image_psnr"]}
                if own["default"]:
                    hi[name] = k
                    self.held.setdefault(name, []).append((k, own["image_psnr"]))
                else:
                    lo[name] = k
            self.rounds.append(step)
            log.info("mixed layer search %d: %s", r + 1,
                     ", ".join(f"{n} {s['kept_float']} in fp32: {s['image_psnr']} dB" for n, s in step.items()))
        self.held = {name: sorted(held) for name, held in self.held.items()}
        for name in names:
            if name not in self.held:  # nothing held below all-fp32: no graph
                manifest = _drop_variant(self.tmp, manifest, name, manifests.variant_key("cpu", "mixed"))
        return manifest

    def write(self, manifest: manifests.Manifest, name: str, k: int) -> manifests.Manifest:
        """``name``'s cpu-mixed graph with its ``k`` least faithful layers in fp32 (unless written last)."""
        key = manifests.variant_key("cpu", "mixed")
        if self._written.get(name) == k and key in manifest.components[name].optimized:
            return manifest
        portable = self.tmp / manifest.components[name].path
        target = portable.with_name(f"model.{key}.onnx")
        n = len(self.ranked[name])
        keep = {layer: f"{self.sensitivity[name][layer]} dB alone in int8: among the {k} of {n} least faithful, "
                       "kept in fp32 by the mixed precision's search on the final image"
                for layer in self.ranked[name][:k]}
        report = precision_mod.quantize_int8_static(portable, target, self.static.feeds[name], optimize=self.optimize,
                                                    stream_input=precision_mod.STATIC_COMPONENTS[name], keep=keep,
                                                    ranges=self.static.ranges[name])
        self._written[name] = k
        return manifest.with_variant(name, key, manifests.Variant(
            f"{name}/{target.name}", "mixed", report.custom_ops,
            {"quantized": report.counts, "bf16_attention": report.bf16_attention, "kept_float": report.kept_float}))

    def record(self, name: str, k: int) -> dict:
        """The manifest's account of ``name``'s search, with ``k`` layers in fp32 chosen."""
        n = len(self.ranked[name])
        return {"int8": n - k, "kept_float": k, "of": n,
                "ranked_by": "each layer's own int8 error (dB), measured alone on the calibration's activations",
                "rounds": [{"kept_float": s[name]["kept_float"], "image_psnr": s[name]["image_psnr"]}
                           for s in self.rounds if name in s]}


def _cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _component_config(name: str, configs: dict) -> dict:
    key = name if name in ("text_encoder", "text_encoder_2", "unet") else "vae"
    return dict(configs[key])


def _model_index(configs: dict) -> dict:
    """The diffusers ``model_index.json``: SD 1.x / 2.x as StableDiffusionPipeline, SDXL (and its
    refiner) as StableDiffusionXLPipeline (which names both text encoders and tokenizers)."""
    import diffusers

    scheduler = configs["scheduler"].get("_class_name", "PNDMScheduler")
    if configs.get("text_encoder_2") is None:
        return {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    first = configs.get("text_encoder") is not None
    return {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if not first else "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"] if first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
