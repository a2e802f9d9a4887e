"""A live ``sdrt serve``'s published contract: its OpenAPI request schemas; schemathesis against them
(payloads generated from the published field types, valid and invalid, for every route: no answer may
be a 5xx); and the progress route's live previews."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")

from test_serve import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    s = Server(tmp, "--ckpt-dir", str(tmp / "none"), "--max-steps", "8", "--max-pixels", str(64 * 64),
               "--max-batch", "2")
    yield s
    s.stop()


def test_published_request_schema_names_the_fields(server):
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=30) as r:
        spec = json.loads(r.read())
    body = spec["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False
    props = body["properties"]
    assert props["steps"] == {"type": "integer", "default": 20} and props["width"]["type"] == ["integer", "null"]
    assert {"sampler_name", "cfg_scale", "seed", "override_settings", "restore_faces"} <= set(props)
    img2img = spec["paths"]["/sdapi/v1/img2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert img2img["properties"]["init_images"]["items"]["contentEncoding"] == "base64"
    assert "denoising_strength" in img2img["properties"]


@pytest.mark.skipif(shutil.which("st") is None, reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error(server, tmp_path):
    # Time-bounded: the coverage phase (boundary values of every published field) and fuzzing
    r = subprocess.run(["st", "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                        "--phases", "coverage,fuzzing", "--max-examples", "25", "--seed", "7", "--no-shrink",
                        "--request-timeout", "60", "--max-time", "45", "--no-color", "--workers", "1"],
                       check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # (one worker: hypothesis' source inspection is not thread-safe on Python 3.11)
    summary = r.stdout[-3000:]
    assert r.returncode == 0, summary
    assert "generated" in summary and "failed" not in summary, summary


def test_progress_previews_the_running_job(server):
    """``current_image``: the running job's prediction decoded every ``show_progress_every_n_steps``
    steps while clients ask for it; none with ``skip_current_image``, none once idle."""
    import base64
    import io
    import threading

    from PIL import Image
    from test_serve import _request

    assert _request(server.api("options"), {"show_progress_every_n_steps": 3})[0] == 200
    assert _request(server.api("options"))[2]["show_progress_every_n_steps"] == 3
    assert _request(server.api("options"), {"show_progress_every_n_steps": "3"})[0] == 422
    done = threading.Event()
    result = {}

    def generate():
        result["reply"] = _request(server.api("txt2img"), {"prompt": "a red circle", "seed": 5, "steps": 8,
                                                           "width": 64, "height": 64, "n_iter": 2}, timeout=300)
        done.set()

    threading.Thread(target=generate).start()
    previews, skipped = [], []
    while not done.is_set():
        status, _, reply = _request(server.api("progress"))
        assert status == 200
        if reply["current_image"]:
            previews.append((reply["state"]["job_no"], reply["state"]["sampling_step"], reply["current_image"]))
        skipped.append(_request(server.api("progress?skip_current_image=true"))[2]["current_image"])
    assert result["reply"][0] == 200
    assert previews, "no preview while the job ran"
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1][2])))
    assert image.size == (64, 64) and image.mode == "RGB" and np.asarray(image).std() > 0
    assert all(s is None for s in skipped)
    assert _request(server.api("progress"))[2]["current_image"] is None  # idle
    assert _request(server.api("options"), {"show_progress_every_n_steps": 10})[0] == 200


def test_embeddings_lists_loaded_and_skipped(tmp_path):
    """``/embeddings`` as the webui's: files of ``--embeddings-dir`` that fit the model are ``loaded``
    (shape = vector width, vectors = count), other widths ``skipped``, unreadable files left out; and a
    listed embedding is used by a prompt naming it."""
    from safetensors.numpy import save_file
    from sdrt.runtime.bundle import open_bundle
    from test_serve import _request

    from sdrt.models import default_model_path

    bundle = open_bundle(default_model_path())
    width = np.load(bundle.path / bundle.text_encoder["token_embeddings"], mmap_mode="r").shape[1]
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"emb_params": rng.standard_normal((2, width)).astype(np.float32)}, str(folder / "sub" / "shapy.safetensors"))
    save_file({"emb_params": rng.standard_normal((3, width + 8)).astype(np.float32)}, str(folder / "wide.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    s = Server(tmp_path, "--ckpt-dir", str(tmp_path / "none"), "--embeddings-dir", str(folder),
               "--max-pixels", str(64 * 64))
    try:
        status, _, reply = _request(s.api("embeddings"))
        assert status == 200
        assert reply["loaded"] == {"shapy": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                             "shape": width, "vectors": 2}}
        assert reply["skipped"] == {"wide": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                             "shape": width + 8, "vectors": 3}}
        base = {"seed": 3, "steps": 4, "width": 64, "height": 64}
        named = _request(s.api("txt2img"), {**base, "prompt": "a red circle shapy"})[2]
        assert 'TI hashes: "shapy: ' in json.loads(named["info"])["infotexts"][0]
    finally:
        s.stop()


def test_loras_and_vaes_are_listed_and_applied(tmp_path):
    """``/loras``, ``/sd-vae`` and ``/hypernetworks`` list ``--lora-dir``, ``--vae-dir`` and
    ``--hypernetwork-dir`` (names relative to the folders); a ``<lora:>`` tag in a payload changes the
    image and writes ``Lora hashes``, a ``<hypernet:>`` tag changes it too; ``sd_vae`` switches
    the VAE through ``options`` (a queued load job), never per request, and the info names it."""
    import torch
    from sdrt.export import convert
    from sdrt.export.write import load_checkpoint
    from test_hypernetworks import make_hypernet
    from test_networks import _vae_file, make_lora, write_network
    from test_serve import _request

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    configs, components, _ = load_checkpoint(root / "models" / "sdrt-shapes-v1.safetensors")
    modules = convert.build_modules(configs, components)
    lora_dir, vae_dir = tmp_path / "Lora", tmp_path / "VAE"
    write_network(lora_dir / "styles" / "bold.safetensors", make_lora(modules[0], modules[2], torch.Generator().manual_seed(1)),
                  {"ss_output_name": "boldface"})
    _vae_file(modules, configs, vae_dir / "warm.vae.safetensors")
    hn_dir = tmp_path / "hypernetworks"
    make_hypernet(hn_dir / "styles" / "soft.pt", seed=2, activation="relu",
                  widths=(modules[0].config.cross_attention_dim, *modules[0].config.block_out_channels))
    s = Server(tmp_path, "--ckpt-dir", str(tmp_path / "none"), "--lora-dir", str(lora_dir), "--vae-dir", str(vae_dir),
               "--hypernetwork-dir", str(hn_dir), "--max-pixels", str(64 * 64))
    try:
        status, _, loras = _request(s.api("loras"))
        assert status == 200 and [(x["name"], x["alias"], x["path"]) for x in loras] == [
            ("bold", "boldface", "styles/bold.safetensors")]
        assert loras[0]["metadata"]["ss_output_name"] == "boldface"
        assert _request(s.api("sd-vae"))[2] == [{"model_name": "warm.vae.safetensors",
                                                 "filename": "warm.vae.safetensors"}]
        base = {"prompt": "a red circle", "seed": 3, "steps": 4, "width": 64, "height": 64}
        plain = _request(s.api("txt2img"), base)[2]
        tagged = _request(s.api("txt2img"), {**base, "prompt": "a red circle <lora:boldface:1>"})[2]
        assert tagged["images"][0] != plain["images"][0]
        assert 'Lora hashes: "boldface: ' in json.loads(tagged["info"])["infotexts"][0]
        status, _, body = _request(s.api("txt2img"), {**base, "prompt": "<lora:missing:1> x"})
        assert status == 422 and "missing" in body["detail"]
        assert _request(s.api("hypernetworks"))[2] == [{"name": "soft", "path": "styles/soft.pt"}]
        hyper = _request(s.api("txt2img"), {**base, "prompt": "a red circle <hypernet:soft:0.5>"})[2]
        assert hyper["images"][0] not in (plain["images"][0], tagged["images"][0])
        assert json.loads(hyper["info"])["infotexts"][0].startswith("a red circle <hypernet:soft:0.5>\n")
        status, _, body = _request(s.api("txt2img"), {**base, "override_settings": {"sd_vae": "warm.vae.safetensors"}})
        assert status == 422 and "options" in body["detail"]
        assert _request(s.api("options"), {"sd_vae": "../outside.pt"})[0] == 422
        assert _request(s.api("options"), {"sd_vae": "warm.vae.safetensors"})[0] == 200
        assert _request(s.api("options"))[2]["sd_vae"] == "warm.vae.safetensors"
        warm = _request(s.api("txt2img"), base)[2]
        info = json.loads(warm["info"])
        assert info["sd_vae_name"] == "warm.vae.safetensors" and "VAE: warm.vae.safetensors" in info["infotexts"][0]
        assert warm["images"][0] != plain["images"][0]
        assert _request(s.api("options"), {"sd_vae": "None"})[0] == 200
        assert _request(s.api("txt2img"), base)[2]["images"][0] == plain["images"][0]
    finally:
        s.stop()
