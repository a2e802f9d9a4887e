"""``sdrt serve`` against live servers on 127.0.0.1 with the embedded model: the webui's own client
(webuiapi), raw HTTP for errors, limits and auth, the bounded queue and a small concurrent load."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdrt.models import default_model_path
from sdrt.runtime import png

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

AUTH = ("alice", "s3cret:with-colon")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, payload=None, auth=None, method=None, timeout=60):
    """(status, headers, JSON body) of one request; HTTP errors are answers too."""
    data = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, e.headers, json.loads(body) if body else None


class Server:
    def __init__(self, tmp_path, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"serve-{self.port}.log", "w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/docs", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401 from a guarded server: it is up
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    self.log.seek(0)
                    raise RuntimeError(f"sdrt serve did not start:\n{self.log.read()}")
                time.sleep(0.2)

    def api(self, route):
        return f"{self.url}/sdapi/v1/{route}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tmp / "Stable-diffusion"
    shutil.copytree(default_model_path(), ckpt / "copy")  # a second model to switch to
    s = Server(tmp, "--ckpt-dir", str(ckpt), "--max-steps", "200", "--max-pixels", str(128 * 128))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Auth on, one queue place."""
    tmp = tmp_path_factory.mktemp("guarded")
    s = Server(tmp, "--ckpt-dir", str(tmp / "none"), "--queue-size", "1", "--max-steps", "400", "--max-body", "100000",
               "--cors-allow-origins", "http://app.test", "--api-auth", f"{AUTH[0]}:{AUTH[1]},bob:hunter2")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def _seed_of(image: Image.Image) -> int:
    return int(png.parse_infotext(image.info["parameters"])[2]["Seed"])


def test_txt2img_with_the_webui_client(client):
    r = client.txt2img(prompt="a red house", negative_prompt="blurry", seed=1234, steps=6, width=128, height=128,
                       batch_size=2, sampler_name="DPM++ 2M", cfg_scale=5)
    assert len(r.images) == 2 and r.images[0].size == (128, 128)
    assert [_seed_of(im) for im in r.images] == [1234, 1235]
    info = r.info
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234 and info["sampler_name"] == "DPM++ 2M"
    assert info["prompt"] == "a red house" and info["negative_prompt"] == "blurry"
    assert info["infotexts"][0] == r.images[0].info["parameters"]
    prompt, negative, fields = png.parse_infotext(info["infotexts"][1])
    assert (prompt, negative, fields["Sampler"], fields["Steps"], fields["CFG scale"]) == \
        ("a red house", "blurry", "DPM++ 2M", "6", "5")
    assert r.parameters["prompt"] == "a red house"  # the request, as the webui's response carries it
    # The same seed renders the same pixels (nothing of one request leaks into the next)
    again = client.txt2img(prompt="a red house", negative_prompt="blurry", seed=1234, steps=6, width=128,
                           height=128, sampler_name="DPM++ 2M", cfg_scale=5)
    assert again.images[0].tobytes() == r.images[0].tobytes()


def test_png_info_reads_the_parameters_back(client):
    image = client.txt2img(prompt="a boat", seed=9, steps=3, width=128, height=128).images[0]
    r = client.png_info(image)
    assert r.info == image.info["parameters"]
    assert r.json["parameters"]["Prompt"] == "a boat" and r.json["parameters"]["Seed"] == "9"


def test_options_round_trip_and_model_switch(client, server):
    options = client.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1 and options["eta_noise_seed_delta"] == 0
    titles = [m["title"] for m in client.get_sd_models()]
    assert options["sd_model_checkpoint"] == titles[0] and any(t.startswith("copy [") for t in titles)
    try:
        client.set_options({"eta_noise_seed_delta": 31337, "CLIP_stop_at_last_layers": 2})
        assert client.get_options()["eta_noise_seed_delta"] == 31337
        r = client.txt2img(prompt="x", seed=5, steps=3, width=128, height=128)
        fields = png.parse_infotext(r.info["infotexts"][0])[2]
        assert fields["ENSD"] == "31337" and fields["Clip skip"] == "2"
        client.util_set_model(next(t for t in titles if t.startswith("copy [")), find_closest=False)
        assert client.util_get_current_model().startswith("copy [")
        assert client.txt2img(prompt="x", seed=5, steps=3, width=128, height=128).images[0].tobytes() == \
            r.images[0].tobytes()  # the copy holds the same weights
    finally:
        client.set_options({"eta_noise_seed_delta": 0, "CLIP_stop_at_last_layers": 1,
                            "sd_model_checkpoint": titles[0]})
    assert client.get_options()["sd_model_checkpoint"] == titles[0]
    status, _, body = _request(server.api("options"), {"sd_model_checkpoint": "../../etc/passwd"})
    assert status == 422 and "unknown model" in body["detail"]
    status, _, body = _request(server.api("options"), {"samples_save": True})
    assert status == 422 and "samples_save" in body["detail"]


def test_lists_in_the_webui_shapes(client, server):
    samplers = client.get_samplers()
    assert {"name", "aliases", "options"} <= set(samplers[0]) and "Euler a" in [s["name"] for s in samplers]
    assert "karras" in [s["name"] for s in client.get_schedulers()]
    for route in ("loras", "sd-vae"):
        assert _request(server.api(route))[:3:2] == (200, [])
    assert [u["name"] for u in client.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in client.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]
    memory = client.get_memory()
    assert memory["ram"]["total"] > 0
    assert client.get_cmd_flags()["ckpt_dir"].endswith("Stable-diffusion")
    assert _request(server.api("refresh-checkpoints"), method="POST")[0] == 200


def test_img2img_with_the_webui_client(client, server):
    pytest.importorskip("sdrt.runtime.pipeline.img2img", reason="the img2img stage is not in this sdrt")
    init = client.txt2img(prompt="a house", seed=4, steps=4, width=128, height=128).images[0]
    r = client.img2img(images=[init], prompt="a house at night", seed=8, steps=10, denoising_strength=0.5,
                       width=128, height=128, batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (128, 128)
    assert [_seed_of(im) for im in r.images] == [8, 9]
    fields = png.parse_infotext(r.info["infotexts"][0])[2]
    assert fields["Denoising strength"] == "0.5" and r.info["denoising_strength"] == 0.5
    assert r.parameters["init_images"] is None  # as the webui's, without include_init_images
    for payload, field in (({"init_images": ["%%%"]}, "init_images[0]"), ({"init_images": []}, "init_images"),
                           ({"init_images": [r.json["images"][0]], "mask": "%%%"}, "mask"),
                           ({"init_images": [r.json["images"][0]], "mask": r.json["images"][0],
                             "inpainting_fill": 9}, "inpainting_fill"),
                           ({"init_images": [r.json["images"][0]], "denoising_strength": 2}, "denoising_strength")):
        status, _, body = _request(server.api("img2img"), {"prompt": "x", **payload})
        assert status == 422 and field in body["detail"], body
    # inpainting: the mask's black half comes back as the init image (the webui's paste back)
    mask = Image.new("L", (128, 128))
    mask.paste(255, (64, 0, 128, 128))
    r = client.img2img(images=[init], mask_image=mask, prompt="a house", seed=8, steps=4, denoising_strength=0.75,
                       width=128, height=128, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    kept = np.asarray(r.images[0].convert("RGB"))[:, :64]
    assert np.array_equal(kept, np.asarray(init.convert("RGB"))[:, :64])
    assert "Mask blur" not in r.info["infotexts"][0] and r.parameters["mask"] is None


def test_img2img_outpainting_scripts_by_name(client, server):
    init = client.txt2img(prompt="a house", seed=4, steps=2, width=64, height=64).images[0].convert("RGB")
    status, _, body = _request(server.api("scripts"))
    assert status == 200 and body["img2img"] == ["outpainting mk2", "poor man's outpainting"]
    # 64 + 2 * 32 -> 128 wide: two 64 x 64 passes; the webui's script_args, its info text first
    r = client.img2img(images=[init], prompt="a house", seed=8, steps=2, denoising_strength=0.8, width=64, height=64,
                       script_name="Outpainting mk2", script_args=["", 32, 2, ["left", "right"], 1.0, 0.05])
    assert len(r.images) == 1 and r.images[0].size == (128, 64) and _seed_of(r.images[0]) == 8
    centre = np.asarray(r.images[0].convert("RGB"))[:, 32 + 24:32 + 40].astype(int)
    assert np.abs(centre - np.asarray(init)[:, 24:40]).max() <= 1  # beyond the masks' blur: the init image
    r = client.img2img(images=[init], prompt="a house", seed=8, steps=2, width=64, height=64,
                       script_name="poor man's outpainting", script_args=[16, 4, 1, ["up"]])
    assert r.images[0].size == (64, 128)
    for name, args, words in (("Outpainting mk2", ["", 32, 2, []], "outpainting directions"),
                              ("Poor man's outpainting", [0], "outpainting pixels")):
        status, _, body = _request(server.api("img2img"), {"prompt": "x", "init_images": [r.json["images"][0]],
                                                            "script_name": name, "script_args": args})
        assert status == 422 and words in body["detail"], body
    status, _, body = _request(server.api("img2img"), {"prompt": "x", "init_images": [r.json["images"][0]],
                                                        "script_name": "Outpainting mk2", "script_args": ["", 64]})
    assert status == 422 and "the outpainted image (192x256) must be at most 16384 pixels" in body["detail"], body
    status, _, body = _request(server.api("img2img"), {"prompt": "x", "init_images": [r.json["images"][0]],
                                                        "script_name": "X/Y/Z plot"})
    assert status == 422 and "script_name 'X/Y/Z plot'" in body["detail"]


def test_progress_during_a_job_and_interrupt(client, server):
    results = {}

    def long_job():
        results["r"] = _request(server.api("txt2img"), {"prompt": "slow", "seed": 3, "steps": 200, "batch_size": 4,
                                                        "width": 128, "height": 128, "force_task_id": "t-long"})

    t = threading.Thread(target=long_job)
    t.start()
    deadline = time.monotonic() + 30
    while True:
        p = client.get_progress()
        if p["state"]["sampling_step"] >= 2:
            break
        assert time.monotonic() < deadline, p
        time.sleep(0.05)
    assert p["state"]["sampling_steps"] == 200 and p["state"]["job_count"] == 1 and 0 < p["progress"] < 1
    assert _request(server.api("progress?id_task=t-long"))[2]["queue_position"] == 0
    asked = time.monotonic()
    client.interrupt()
    t.join(30)
    assert time.monotonic() - asked < 1.5  # the rest of the job's 200 steps take seconds more
    status, _, body = results["r"]
    assert status == 200 and len(body["images"]) == 4  # the images of the last prediction, as the webui's
    info = json.loads(body["info"])
    assert info["all_seeds"] == [3, 4, 5, 6] and png.parse_infotext(info["infotexts"][0])[2]["Seed"] == "3"
    assert client.get_progress()["state"]["job_count"] == 0


@pytest.mark.parametrize("payload, field", [
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "cfg_scale": "high"}, "cfg_scale"),
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "steps": 201}, "--max-steps"),
    ({"prompt": "x", "batch_size": 9}, "--max-batch"),
    ({"prompt": "x", "width": 256, "height": 256}, "--max-pixels"),
    ({"prompt": "x", "n_iter": 10**12}, "--max-batch"),
    ({"prompt": "x", "bogus_field": 1}, "bogus_field"),
    ({"prompt": "x", "enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ({"prompt": "x", "enable_hr": True, "width": 64, "height": 64, "hr_scale": 8}, "--max-pixels"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler"),
    ({"prompt": "x", "override_settings": {"sd_vae": "/etc/passwd"}}, "sd_vae"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "word " * 5000}, "characters"),
    ({"prompt": "x", "force_task_id": ["a"]}, "force_task_id"),
])
def test_invalid_requests_are_422_naming_the_field(server, payload, field):
    status, _, body = _request(server.api("txt2img"), payload)
    assert status == 422 and field in body["detail"] and "Traceback" not in json.dumps(body)


def test_wrong_values_in_any_field_never_500(server):
    """Each webui field (and sdrt's) given each wrong kind of value: an answer, 200 or 422, never a 500."""
    import dataclasses

    from sdrt.runtime.pipeline import GenerationParams
    from sdrt.runtime.pipeline.params import _NEUTRAL

    names = [f.name for f in dataclasses.fields(GenerationParams)] + [*_NEUTRAL, "override_settings", "sampler_index"]
    for name in names:
        for value in (None, "x", [], {"a": 1}, -1, 10**30, 1.5, True, float("nan")):
            payload = {"prompt": "x", "steps": 2, "width": 64, "height": 64, name: value}
            status, _, body = _request(server.api("txt2img"), json.dumps(payload).encode())
            assert status in (200, 422), (name, value, body)


def test_malformed_bodies_never_500(server):
    assert _request(server.api("txt2img"), b"{not json")[0] == 422
    assert _request(server.api("txt2img"), [1, 2])[0] == 422
    assert _request(server.api("txt2img"), b"[" * 100_000)[0] in (400, 422)
    deep = b'{"prompt": "x", "styles": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _request(server.api("txt2img"), deep)[0] in (400, 422)
    status, _, body = _request(server.api("png-info"), {"image": "not base64!"})
    assert status == 422 and "base64" in body["detail"]
    status, _, body = _request(server.api("png-info"), {"image": base64.b64encode(b"junk").decode()})
    assert status == 422 and "image" in body["detail"]


def test_openai_images_generations(server):
    status, _, body = _request(f"{server.url}/v1/images/generations",
                               {"prompt": "a tree", "n": 2, "size": "128x128", "seed": 77, "steps": 3})
    assert status == 200 and len(body["data"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][1]["b64_json"])))
    assert image.size == (128, 128) and _seed_of(image) == 78
    assert _request(f"{server.url}/v1/images/generations", {"prompt": "x", "response_format": "url"})[0] == 422


def test_concurrent_clients_get_their_own_images(server):
    def one(seed):
        status, _, body = _request(server.api("txt2img"), {"prompt": f"p{seed}", "seed": seed, "steps": 3,
                                                           "width": 64, "height": 64}, timeout=120)
        assert status == 200, body
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        return seed, _seed_of(image), json.loads(body["info"])["prompt"]

    # 16 clients (the queue holds 16: none is refused), 192 requests, each checked by seed and prompt
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(1000, 1096)))
        used = _request(server.api("memory"))[2]["ram"]["used"]
        answers += pool.map(one, range(2000, 2096))
    assert len(answers) == 192
    assert all(seed == got and prompt == f"p{seed}" for seed, got, prompt in answers)
    growth = _request(server.api("memory"))[2]["ram"]["used"] - used
    assert growth < 16 << 20, f"the server's memory grew {growth >> 20} MB over 96 requests"


def test_auth_is_required_on_every_route(guarded):
    for route in ("options", "sd-models", "progress"):
        assert _request(guarded.api(route))[0] == 401
        assert _request(guarded.api(route), auth=("alice", "wrong"))[0] == 401
        assert _request(guarded.api(route), auth=AUTH)[0] == 200
    assert _request(guarded.api("options"), auth=("bob", "hunter2"))[0] == 200
    assert _request(f"{guarded.url}/docs")[0] == 401
    status, headers, _ = _request(guarded.api("txt2img"), {"prompt": "x"})
    assert status == 401 and headers["WWW-Authenticate"] == "Basic"
    flags = webuiapi.WebUIApi(port=guarded.port, username=AUTH[0], password=AUTH[1]).get_cmd_flags()
    assert flags["api_auth"] == "<set>" and AUTH[1] not in json.dumps(flags)


def test_a_full_queue_answers_503_with_retry_after(guarded):
    long = {"prompt": "slow", "steps": 400, "width": 128, "height": 128}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(_request(guarded.api("txt2img"), long, auth=AUTH)))]
    threads[0].start()
    deadline = time.monotonic() + 30
    while _request(guarded.api("progress"), auth=AUTH)[2]["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = {**long, "force_task_id": "t-second"}
    threads.append(threading.Thread(target=lambda: answers.append(_request(guarded.api("txt2img"), waiting,
                                                                           auth=AUTH))))
    threads[1].start()
    while _request(guarded.api("progress"), auth=AUTH)[2]["queue_pending"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _request(guarded.api("progress?id_task=t-second"), auth=AUTH)[2]["queue_position"] == 1
    status, headers, body = _request(guarded.api("txt2img"), long, auth=AUTH)
    assert status == 503 and int(headers["Retry-After"]) >= 1 and "queue is full" in body["detail"]
    # interrupt both accepted jobs: each still ends with its image
    while any(t.is_alive() for t in threads):
        _request(guarded.api("interrupt"), method="POST", auth=AUTH)
        time.sleep(0.1)
    assert sorted(a[0] for a in answers) == [200, 200]


def test_sigterm_finishes_the_job_in_flight(tmp_path):
    s = Server(tmp_path, "--ckpt-dir", str(tmp_path / "none"))
    answers = []
    t = threading.Thread(target=lambda: answers.append(_request(s.api("txt2img"), {
        "prompt": "x", "seed": 21, "steps": 100, "batch_size": 2, "width": 128, "height": 128})))
    t.start()
    deadline = time.monotonic() + 30
    while _request(s.api("progress"))[2]["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.proc.terminate()
    t.join(60)
    s.proc.wait(30)
    status, _, body = answers[0]
    assert status == 200 and len(body["images"]) == 2 and json.loads(body["info"])["all_seeds"] == [21, 22]
    s.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(s.api("progress"), timeout=2)


def test_the_cli_loads_fastapi_only_for_serve():
    code = "import sys, sdrt.cli; print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_every_get_route_of_the_schema_answers_without_5xx(server):
    schema = _request(f"{server.url}/openapi.json")[2]
    routes = [path for path, ops in schema["paths"].items() if "get" in ops and "{" not in path]
    assert len(routes) >= 15
    for path in routes:
        status = _request(server.url + path)[0]
        assert status < 500, path


def test_an_oversized_body_is_413(guarded):
    status, _, body = _request(guarded.api("png-info"), {"image": "A" * 200_000}, auth=AUTH)
    assert status == 413 and "100000 bytes" in body["detail"]


def test_a_client_that_disconnects_stops_its_job(server):
    # about 8 s of work: stopped once the client is gone, it ends within a fraction of that
    body = json.dumps({"prompt": "gone", "steps": 200, "batch_size": 8, "width": 128, "height": 128}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while _request(server.api("progress"))[2]["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()
    gone = time.monotonic()
    while (state := _request(server.api("progress"))[2]["state"])["job_count"]:
        last = state["sampling_step"]
        assert time.monotonic() - gone < 3, state
        time.sleep(0.05)
    assert last < 100


def test_cors_only_for_the_configured_origins(server, guarded):
    def preflight(s):
        req = urllib.request.Request(s.api("txt2img"), method="OPTIONS", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("access-control-allow-origin")

    assert preflight(guarded) == (200, "http://app.test")  # a preflight carries no credentials
    assert preflight(server)[1] is None


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """The embedded model, and in the checkpoint folder another model of its latent space (random
    weights, the tiny SD 1.x architecture, the embedded model's latent scale) for requests to refine
    with or to run hires fix's second pass on."""
    from sdrt.export.tiny import random_bundle, scaled_sd1_configs
    from sdrt.runtime.bundle import open_bundle

    tmp = tmp_path_factory.mktemp("refined")
    configs = scaled_sd1_configs()
    configs["vae"]["scaling_factor"] = open_bundle(default_model_path()).latent_scale_factor
    bundle = random_bundle(configs, tmp / "Stable-diffusion" / "polish", seed=5)
    s = Server(tmp, "--ckpt-dir", str(tmp / "Stable-diffusion"), "--max-pixels", str(128 * 128))
    yield s, bundle
    s.stop()


def test_refiner_checkpoint_names_a_model_of_the_catalog(refined):
    """The webui API's refiner_checkpoint / refiner_switch_at: the server loads the named model and the
    image is the Python API's with that refiner attached; a request without it is not refined."""
    import sdrt

    server, bundle = refined
    title = next(m["title"] for m in _request(server.api("sd-models"))[2] if m["title"].startswith("polish"))
    payload = {"prompt": "a red circle", "seed": 7, "steps": 6, "width": 128, "height": 128,
               "sampler_name": "Euler", "cfg_scale": 5}
    status, _, plain = _request(server.api("txt2img"), payload)
    assert status == 200
    status, _, body = _request(server.api("txt2img"), {**payload, "refiner_checkpoint": title,
                                                      "refiner_switch_at": 0.5})
    assert status == 200, body
    served = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))

    pipe = sdrt.Pipeline(default_model_path(), refiner=bundle)
    expected = pipe("a red circle", seed=7, steps=6, width=128, height=128, sampler_name="Euler", cfg_scale=5,
                    refiner_checkpoint=pipe.refiner_title(), refiner_switch_at=0.5)[0]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected.image.convert("RGB")))
    fields = png.parse_infotext(served.info["parameters"])[2]
    assert fields["Refiner"] == pipe.refiner_title() and fields["Refiner switch at"] == "0.5"
    assert base64.b64decode(body["images"][0]) != base64.b64decode(plain["images"][0])
    # the refiner stays loaded, but a request that does not name it is not refined
    status, _, again = _request(server.api("txt2img"), payload)
    assert status == 200 and again["images"][0] == plain["images"][0]
    for bad, words in ((f"nope [{'0' * 10}]", "refiner_checkpoint: unknown model"),
                       (7, "refiner_checkpoint must be a model title")):
        status, _, body = _request(server.api("txt2img"), {**payload, "refiner_checkpoint": bad})
        assert status == 422 and words in body["detail"], body
    status, _, body = _request(server.api("txt2img"), {**payload, "refiner_checkpoint": title,
                                                      "refiner_switch_at": 1.5})
    assert status == 422 and "refiner_switch_at" in body["detail"]


def test_hr_checkpoint_name_runs_the_second_pass_on_a_model_of_the_catalog(refined):
    """The webui API's hr_checkpoint_name: hires fix's second pass on another model of the catalog,
    the image the Python API's with that model attached; the server's own model names no switch."""
    import sdrt

    server, bundle = refined
    models = _request(server.api("sd-models"))[2]
    title = next(m["title"] for m in models if m["title"].startswith("polish"))
    payload = {"prompt": "a blue square", "seed": 3, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler",
               "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
               "hr_second_pass_steps": 3}
    status, _, body = _request(server.api("txt2img"), {**payload, "hr_checkpoint_name": title})
    assert status == 200, body
    served = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert served.size == (96, 96)

    pipe, second = sdrt.Pipeline(default_model_path()), sdrt.Pipeline(bundle)
    pipe.set_hires_checkpoint(second)
    fields = {k: v for k, v in payload.items() if k != "prompt"}
    expected = pipe("a blue square", **fields, hr_checkpoint_name=second.refiner_title(second))[0]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected.image.convert("RGB")))
    assert png.parse_infotext(served.info["parameters"])[2]["Hires checkpoint"] == second.refiner_title(second)
    # The server's own model: the same image as "Use same checkpoint", its name in the PNG text
    own = models[0]["title"]
    status, _, same = _request(server.api("txt2img"), {**payload, "hr_checkpoint_name": own})
    status2, _, plain = _request(server.api("txt2img"), payload)
    assert status == status2 == 200 and same["images"][0] != body["images"][0]
    a, b = (Image.open(io.BytesIO(base64.b64decode(r["images"][0]))) for r in (same, plain))
    assert a.tobytes() == b.tobytes()
    assert "Hires checkpoint" in png.parse_infotext(a.info["parameters"])[2]
    status, _, body = _request(server.api("txt2img"), {**payload, "hr_checkpoint_name": "nope"})
    assert status == 422 and "hr_checkpoint_name: unknown model" in body["detail"]
