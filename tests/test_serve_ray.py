"""``sdrt serve --ray`` on a local Ray cluster that the test starts on 127.0.0.1: two replicas of the
embedded model, requests spread over both, one replica killed mid-load without an accepted request
left unanswered, the killed replica replaced, SIGTERM stopping everything; the autoscaler adding a replica under load."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from sdrt.runtime import png

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from test_serve import _free_port


def _post(url, payload, timeout=120):
    """(status, the answering process, body) of one request; an HTTP error is an answer too."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("x-sdrt-server"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-sdrt-server"), e.read()


def _pid(server_id: str) -> int:
    return int(server_id.rsplit(":", 1)[1])


def _start(tmp, *args):
    """``sdrt serve --ray ARGS`` on a free port, once it answers: (url, process, log file)."""
    port = _free_port()
    log = open(tmp / f"serve-{port}.log", "w+")  # noqa: SIM115 - closed by the caller
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--ray", "--port", str(port),
                             "--ckpt-dir", str(tmp / "none"), "--max-pixels", str(64 * 64), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{url}/sdapi/v1/samplers", timeout=5)
            return url, proc, log
        except (OSError, urllib.error.HTTPError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"sdrt serve --ray did not start:\n{log.read()[-4000:]}")
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    url, proc, log = _start(tmp_path_factory.mktemp("ray"), "--replicas", "2", "--queue-size", "8")
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    log.close()


def _check_image(body: dict, seed: int) -> None:
    info = json.loads(body["info"])
    assert info["seed"] == seed and info["all_seeds"] == [seed]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert png.parse_infotext(image.info["parameters"])[2]["Seed"] == str(seed)


def test_two_replicas_a_killed_one_and_sigterm(ray_server):
    url, proc = ray_server
    txt2img = f"{url}/sdapi/v1/txt2img"

    def request(seed):
        return seed, *_post(txt2img, {"prompt": "a red circle", "seed": seed, "steps": 12, "width": 64, "height": 64})

    # Warm up until both replicas have answered: Ray's proxy spreads the requests over them
    seen, seed = set(), 0
    while len(seen) < 2 and seed < 40:
        seed += 1
        _, status, server, body = request(seed)
        assert status == 200, body
        _check_image(body, seed)
        seen.add(server)
    assert len(seen) == 2, f"requests never reached a second replica: {seen}"

    # 48 requests from 8 clients; a replica is killed (SIGKILL: no goodbye) while they run
    victim = _pid(min(seen))
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request, 100 + i) for i in range(48)]
        while sum(f.done() for f in futures) < 6:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]  # every request answered: none left hanging

    ok = [(seed, server, body) for seed, status, server, body in results if status == 200]
    failed = [(seed, status) for seed, status, _, _ in results if status != 200]
    for seed, _, body in ok:
        _check_image(body, seed)  # no image mixed up between clients
    # The requests the killed replica held come back as errors (Ray's proxy answers 5xx for them); the
    # rest are images from the survivor or the replacement
    assert all(status >= 500 for _, status in failed), failed
    assert len(failed) <= 9, f"more errors than the killed replica could hold (9): {failed}"
    print(f"{len(ok)} images, {len(failed)} errors after killing replica {victim}: {failed}")
    assert len(ok) >= 24, f"too few images: {len(ok)} of {len(results)}"

    # Ray Serve replaces the killed replica: two replicas answer again, neither the killed one
    deadline, after, seed = time.monotonic() + 120, set(), 1000
    while time.monotonic() < deadline and len(after) < 2:
        seed += 1
        _, status, server, body = request(seed)
        if status == 200:
            _check_image(body, seed)
            assert _pid(server) != victim
            after.add(server)
    assert len(after) == 2, f"the killed replica was not replaced: {after}"

    # SIGTERM: the deployment is deleted, Ray stopped, the command exits
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/sdapi/v1/samplers", timeout=5)


def test_deployment_options_are_checked_before_ray_starts(tmp_path):
    from sdrt.runtime.errors import SdrtError

    from sdrt.serve_ray import deployment_options

    options = {"device": "cpu", "queue_size": 4}
    d = deployment_options(options, 2, None)
    assert d["num_replicas"] == 2 and d["max_ongoing_requests"] == 5 and d["max_queued_requests"] == 4
    a = deployment_options(options, 1, 3)["autoscaling_config"]
    assert (a["min_replicas"], a["max_replicas"]) == (1, 3)
    assert deployment_options({"device": "cuda", "queue_size": 1}, 1, None)["ray_actor_options"]["num_gpus"] == 1
    for args, message in ((({"device": "cuda:1", "queue_size": 1}, 1, None), "own GPU from Ray"),
                          (({"device": "cpu", "queue_size": 1}, 0, None), "--replicas must be at least 1"),
                          (({"device": "cpu", "queue_size": 1}, 3, 2), "--max-replicas")):
        with pytest.raises(SdrtError, match=message):
            deployment_options(*args)
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--ray", "--replicas", "3", "--max-replicas", "2"],
                       check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --max-replicas (2) must be at least --replicas (3)"]


def test_autoscaling_adds_a_replica_under_load(tmp_path):
    """``--replicas 1 --max-replicas 2``: with the queue held above the target (8 clients on one
    replica), Ray Serve's autoscaler starts the second replica, which then answers too."""
    url, proc, log = _start(tmp_path, "--replicas", "1", "--max-replicas", "2")
    try:
        def request(seed):
            return _post(f"{url}/sdapi/v1/txt2img", {"prompt": "a red circle", "seed": seed, "steps": 30,
                                                    "width": 64, "height": 64})

        servers, seed, deadline = set(), 0, time.monotonic() + 150
        with ThreadPoolExecutor(8) as pool:
            while len(servers) < 2 and time.monotonic() < deadline:
                for status, server, body in pool.map(request, range(seed, seed + 8)):
                    assert status == 200, body
                    servers.add(server)
                seed += 8
        assert len(servers) == 2, f"the autoscaler added no replica in 150 s ({seed} requests)"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        log.close()
