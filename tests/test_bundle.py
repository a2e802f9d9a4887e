"""The ``sdrt.json`` manifest: one schema written by the exporter and read (and checked) on open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime import spec as specs
from sdrt.runtime.bundle import (
    BETA_SCHEDULES,
    FORMAT_VERSION,
    MANIFEST,
    SD1_FORMAT_VERSION,
    Manifest,
    PrecisionRecord,
    Variant,
    open_bundle,
    variant_key,
)
from sdrt.runtime.errors import CheckpointError
from sdrt.runtime.sampling import schedules

OPTIMUM = Path(__file__).parent / "data" / "optimum_tiny" / "onnx"


def copy_with(bundle: Path, dst: Path, edit=None) -> Path:
    """A copy of ``bundle`` whose manifest ``edit(m)`` changed in place (or replaced, if it returns one)."""
    shutil.copytree(bundle, dst)
    m = json.loads((dst / MANIFEST).read_text())
    if edit is not None:
        m = edit(m) or m
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_round_trip(tiny_bundle):
    raw = json.loads((tiny_bundle / MANIFEST).read_text())
    m = Manifest.from_json(raw, tiny_bundle)
    assert m.to_json() == raw
    assert Manifest.from_json(json.loads(json.dumps(m.to_json())), tiny_bundle) == m
    assert m.format_version == SD1_FORMAT_VERSION == 1 and m.default_size == (64, 64)  # sd1: as before
    assert m.text_encoder.token_embeddings == "text_encoder/token_embeddings.npy"
    assert (m.text_encoder.bos_token_id, m.text_encoder.eos_token_id) == (49406, 49407)
    assert m.components["unet"].optimized["cpu"].custom_ops is True
    # sdrt's text encoder graph and, beside it, the token-id graph optimum runs
    te = m.components["text_encoder"]
    assert te.path == "text_encoder/model.embeds.onnx" and te.token_ids.path == "text_encoder/model.onnx"
    assert te.token_ids.spec.input_names == ["input_ids"] and te.spec.input_names == ["inputs_embeds"]


def test_shipped_bundle_round_trips():
    """Bundles written before the schema read back to the same JSON (the default model's, here)."""
    from sdrt.models import default_model_path

    b = open_bundle(default_model_path())
    assert b.schema.to_json() == b.manifest and b.name == "sdrt-shapes-v1"


def test_variants_and_precisions_round_trip(tiny_bundle):
    m = Manifest.from_json(json.loads((tiny_bundle / MANIFEST).read_text()), tiny_bundle)
    key = variant_key("cpu", "int8")
    assert (key, variant_key("cpu"), variant_key("cuda", "fp16")) == ("cpu-int8", "cpu", "cuda-fp16")
    record = PrecisionRecord({"unet": {"MatMulInteger": 3}}, 40.0, {"image_psnr": 41.0, "int8_saturates": False},
                             default=True)
    m2 = (m.with_variant("unet", key, Variant("unet/model.cpu-int8.onnx", "int8", True, {"quantized": {"x": 1}}))
          .with_precision("cpu", "int8", record))
    assert "cpu-int8" not in m.components["unet"].optimized and not m.precisions  # frozen: a new manifest
    back = Manifest.from_json(json.loads(json.dumps(m2.to_json())), tiny_bundle)
    assert back == m2 and back.precisions["cpu"]["int8"].default is True
    assert back.to_json()["components"]["unet"]["optimized"][key]["quantized"] == {"x": 1}


def test_bundle_api(tiny_bundle, tiny_configs):
    b = open_bundle(tiny_bundle)
    assert b.native and b.manifest == json.loads((tiny_bundle / MANIFEST).read_text())
    u = tiny_configs["unet"]
    assert b.spec("unet") == specs.unet_spec(u["in_channels"], u["out_channels"], u["cross_attention_dim"])
    assert b.spec("vae_decoder").input_names == ["latent_sample"] and b.spec("nothing") is None
    assert b.default_size == (64, 64) and b.vae_scale_factor == 8 and b.architecture == "sd1"
    assert schedules.alphas_cumprod(**b.scheduler).shape == (1000,)
    assert b.text_encoder["num_layers"] == tiny_configs["text_encoder"]["num_hidden_layers"]
    assert b.component("unet") == tiny_bundle / "unet" / "model.onnx" and b.has("vae_encoder")
    assert b.precisions("cpu") == {} and b.default_precision("cpu") == "fp32"


def test_beta_schedules_are_what_the_schedule_computes():
    for name in BETA_SCHEDULES:
        assert np.all(np.diff(schedules.alphas_cumprod(beta_schedule=name)) < 0)
    with pytest.raises(ValueError):
        schedules.alphas_cumprod(beta_schedule="squaredcos_cap_v2")


def _set(path: str, value):
    """An edit setting the dotted ``path`` of the manifest (deleting it for ``...``)."""
    def edit(m):
        *parents, last = path.split(".")
        d = m
        for k in parents:
            d = d[k]
        if value is ...:
            del d[last]
        else:
            d[last] = value
    return edit


MALFORMED = [
    # (edit, the field the one-line error names, what it says)
    (lambda m: [m], "sdrt.json:", "must be a JSON object, got list"),
    (_set("components", None), "components", "must be an object"),
    (_set("components", ...), "components", "missing"),
    (_set("scheduler", ...), "scheduler", "missing"),
    (_set("text_encoder", ...), "text_encoder", "missing"),
    (_set("components.unet", ...), "components.unet", "missing"),
    (_set("components.unet.path", None), "components.unet.path", "must be a path"),
    (_set("components.unet.inputs", [{"name": "sample"}]), "components.unet.inputs", "not an I/O spec"),
    (_set("components.unet.optimized.cpu.path", ...), "components.unet.optimized.cpu.path", "missing"),
    (_set("components.unet.optimized.cpu.custom_ops", "yes"), "components.unet.optimized.cpu.custom_ops",
     "true or false"),
    (_set("vae_scale_factor", ...), "vae_scale_factor", "missing"),
    (_set("vae_scale_factor", 0), "vae_scale_factor", ">= 1"),
    (_set("vae_scale_factor", 6), "vae_scale_factor", "power of two"),
    (_set("vae_scale_factor", "8"), "vae_scale_factor", "must be an integer"),
    (_set("vae_scale_factor", 128), "default_size", "multiple of vae_scale_factor 128"),
    (_set("default_size", [64]), "default_size", "[width, height]"),
    (_set("scheduler.num_train_timesteps", 0), "scheduler.num_train_timesteps", ">= 2"),
    (_set("scheduler.beta_end", 1.5), "scheduler.beta_end", "below 1"),
    (_set("scheduler.beta_schedule", "squaredcos_cap_v2"), "scheduler.beta_schedule", "scaled_linear, linear"),
    (_set("prediction_type", "sample"), "prediction_type", "epsilon, v_prediction"),
    (_set("latent_channels", 0), "latent_channels", ">= 1"),
    (_set("latent_channels", 4.0), "latent_channels", "must be an integer"),
    (_set("latent_channels", True), "latent_channels", "must be an integer"),
    # 3 is a positive int, but the VAE decoder's spec takes 4-channel latents
    (_set("latent_channels", 3), "latent_channels", "4-channel latent_sample"),
    (_set("latent_scale_factor", -0.18), "latent_scale_factor", "positive number"),
    (_set("text_encoder.hidden_size", ...), "text_encoder.hidden_size", "missing"),
    (_set("text_encoder.token_embeddings", 7), "text_encoder.token_embeddings", "must be a path"),
    (_set("text_encoder.token_embeddings", ""), "text_encoder.token_embeddings", "must be a path"),
    (_set("text_encoder.eos_token_id", -1), "text_encoder.eos_token_id", ">= 0"),
    (_set("components.text_encoder.token_ids", "model.onnx"), "components.text_encoder.token_ids", "an object"),
    (_set("components.text_encoder.token_ids.inputs", 3), "components.text_encoder.token_ids", "not an I/O spec"),
    (_set("components.text_encoder.token_ids.path", ""), "components.text_encoder.token_ids.path", "must be a path"),
    (_set("precisions", {"cpu": {"int8": {"default": "yes"}}}), "precisions.cpu.int8.default", "true or false"),
    (_set("source", "tiny"), "source", "must be an object"),
]


@pytest.mark.parametrize("edit, field, says", MALFORMED, ids=[f"{f}-{s}" for _, f, s in MALFORMED])
def test_malformed_manifest_is_one_line_naming_the_field(tiny_bundle, tmp_path, edit, field, says):
    copy = copy_with(tiny_bundle, tmp_path / "b", edit)
    with pytest.raises(CheckpointError) as e:
        open_bundle(copy)
    message = str(e.value)
    assert "\n" not in message and str(copy / MANIFEST) in message
    assert f"{field} " in message and says in message


def test_newer_format_version_is_refused(tiny_bundle, tmp_path):
    copy = copy_with(tiny_bundle, tmp_path / "b", _set("format_version", FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}; this sdrt reads up to"):
        open_bundle(copy)


@pytest.mark.parametrize("field, target", [
    ("components.unet.path", "another bundle"),
    ("components.unet.path", "../x/model.onnx"),
    ("components.vae_decoder.optimized.cpu.path", "vae_decoder/../../outside.onnx"),
    ("text_encoder.token_embeddings", "/etc/passwd"),
    ("text_encoder.token_embeddings", "."),
    ("components.text_encoder.token_ids.path", "../x/model.onnx"),
])
def test_paths_outside_the_bundle_are_refused(tiny_bundle, tmp_path, field, target):
    if target == "another bundle":
        target = str(tiny_bundle / "unet" / "model.onnx")  # exists, and is a real graph
    copy = copy_with(tiny_bundle, tmp_path / "b", _set(field, target))
    with pytest.raises(CheckpointError) as e:
        open_bundle(copy)
    assert str(e.value) == f"{copy / MANIFEST}: {field} {target!r} is not a file inside the bundle"


def test_symlinks_out_of_the_bundle_are_refused(tiny_bundle, tmp_path):
    copy = copy_with(tiny_bundle, tmp_path / "b")
    (copy / "unet" / "alias.onnx").symlink_to("model.onnx")  # inside: fine
    (copy / "unet" / "model.cpu.onnx").unlink()
    (copy / "unet" / "model.cpu.onnx").symlink_to(tiny_bundle / "unet" / "model.cpu.onnx")
    m = json.loads((copy / MANIFEST).read_text())
    m["components"]["unet"]["path"] = "unet/alias.onnx"
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"components\.unet\.optimized\.cpu\.path 'unet/model\.cpu\.onnx' is not"):
        open_bundle(copy)

    (copy / "unet" / "model.cpu.onnx").unlink()
    shutil.copy(tiny_bundle / "unet" / "model.cpu.onnx", copy / "unet" / "model.cpu.onnx")
    assert open_bundle(copy).component("unet") == copy / "unet" / "alias.onnx"
    (copy / "text_encoder").rename(tmp_path / "text_encoder")  # a folder linked out of the bundle
    (copy / "text_encoder").symlink_to(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match=r"components\.text_encoder\.path"):
        open_bundle(copy)
    (copy / "text_encoder").unlink()
    (tmp_path / "text_encoder").rename(copy / "text_encoder")
    (copy / "tokenizer" / "vocab.json").unlink()
    (copy / "tokenizer" / "vocab.json").symlink_to(tiny_bundle / "tokenizer" / "vocab.json")
    with pytest.raises(CheckpointError, match=r"tokenizer/vocab\.json 'tokenizer/vocab\.json' is not a file inside"):
        open_bundle(copy)


def test_optimum_bundle_manifest_is_inferred():
    b = open_bundle(OPTIMUM)
    assert not b.native and b.schema.format == "optimum" and b.schema.format_version is None
    assert b.manifest == b.schema.to_json() and "format_version" not in b.manifest
    assert {n: c.path for n, c in b.schema.components.items()} == {
        n: f"{n}/model.onnx" for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    assert b.spec("unet") is None and b.schema.text_encoder.token_embeddings is None
    assert b.text_encoder == {"hidden_size": 8, "num_layers": 1, "bos_token_id": 49406, "eos_token_id": 49407,
                              "pad_token_id": 49407}
    assert b.graph("unet") == OPTIMUM / "unet" / "model.onnx" and b.name == "onnx"


def test_optimum_config_sdrt_cannot_run_is_one_line(tmp_path):
    copy = shutil.copytree(OPTIMUM, tmp_path / "onnx")
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(CheckpointError) as e:
        open_bundle(copy)
    assert "\n" not in str(e.value) and "scheduler.beta_schedule 'squaredcos_cap_v2' is not one of" in str(e.value)
