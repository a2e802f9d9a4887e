"""``sdrt serve --ray``: the same HTTP API as replicas on Ray Serve.

Each replica is one ``sdrt serve`` application (``sdrt.runtime.serve.create_app``) built in its own
Ray actor from the command's options: its own model loaded once, its own worker and bounded
queue. Ray's HTTP proxy spreads requests over the replicas; the autoscaler adds replicas when the
requests in flight per replica (running plus queued: the queue length) stay above the target.

What Ray adds to the single server's guarantees, and what it does not:

* A replica that dies (its process killed, its node lost) is restarted by Ray Serve's controller;
  the requests it held are answered with an error by the proxy (500), never dropped without an
  answer. Requests still waiting in the proxy go to the other replicas.
* A full system answers 503: each replica takes ``queue_size + 1`` requests (one running), the
  proxy holds at most ``queue_size`` more per replica (Ray's ``max_queued_requests``).
* ``/sdapi/v1/progress``, ``interrupt``, ``skip`` and ``options`` reach one replica (whichever the
  proxy picks), so with several replicas they are per replica: a model switch through ``options``
  changes one replica. Select the model with ``--model`` for the whole deployment instead.

Multi-node: start Ray on each machine (``ray start --head`` on one, ``ray start --address
HEAD:6379`` on the others), then run ``sdrt serve --ray --ray-address HEAD:6379 --replicas N``
anywhere in the cluster; every node needs sdrt installed and the models at the same paths
(docs/SERVE.md).
"""

from __future__ import annotations

import logging
import signal
import threading

from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)

APP_NAME = "sdrt"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SdrtError("sdrt serve --ray needs Ray Serve: pip install 'ray[serve]'") from None
    return ray, serve


def deployment_options(options: dict, replicas: int, max_replicas: int | None) -> dict:
    """The Ray Serve deployment settings for ``sdrt serve``'s options: replicas per device,
    autoscaling on the queue length, the bounded queue kept at the proxy too."""
    if replicas < 1:
        raise SdrtError(f"--replicas must be at least 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise SdrtError(f"--max-replicas ({max_replicas}) must be at least --replicas ({replicas})")
    device = options["device"]
    kind, _, index = device.partition(":")
    if index:
        raise SdrtError(f"--device {device}: with --ray each replica gets its own GPU from Ray; pass "
                        f"--device {kind} (one replica per GPU)")
    # A GPU replica holds one GPU (Ray sets CUDA_VISIBLE_DEVICES, so it sees it as device 0)
    actor = {"num_cpus": 1} if kind == "cpu" else {"num_cpus": 1, "num_gpus": 1}
    queue = options["queue_size"]
    settings = {"ray_actor_options": actor, "max_ongoing_requests": queue + 1, "max_queued_requests": queue,
                "graceful_shutdown_timeout_s": 600, "health_check_period_s": 2}
    if max_replicas is None:
        settings["num_replicas"] = replicas
    else:
        # Scale on the requests each replica holds (running + waiting): above one waiting job per
        # replica on average, add replicas; below, remove them down to --replicas
        settings["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                          "max_replicas": max_replicas, "target_ongoing_requests": 2,
                                          "upscale_delay_s": 5, "downscale_delay_s": 60}
    return settings


def application(options: dict, replicas: int = 1, max_replicas: int | None = None):
    """The bound Ray Serve application of ``sdrt serve``'s options (``serve.run`` it)."""
    _, serve = _ray()

    @serve.ingress()
    class SdrtServe:
        def __init__(self, options: dict):
            self.options = options

        def __serve_build_asgi_app__(self):
            # In the replica's own process: its model loads here, once
            from sdrt.runtime.serve import create_app
            from sdrt.serve_config import server_config

            return create_app(server_config(self.options))

    settings = deployment_options(options, replicas, max_replicas)
    return serve.deployment(SdrtServe, name="sdrt-serve", **settings).bind(options)


def run(options: dict, *, replicas: int = 1, max_replicas: int | None = None, address: str | None = None) -> None:
    """Start (or join) Ray, deploy the server, and serve until SIGTERM / SIGINT; then drain and stop."""
    ray, serve = _ray()
    app = application(options, replicas, max_replicas)  # option errors before Ray starts
    host = "0.0.0.0" if options["listen"] else options["host"]
    context = ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    session = context.address_info.get("session_dir") if address is None else None
    try:
        serve.start(http_options={"host": host, "port": options["port"]})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("sdrt serve on Ray: http://%s:%d (%d replica(s))", host, options["port"], replicas)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        # Replicas finish the requests they hold (graceful_shutdown_timeout_s) before they stop
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
        if session:
            _stop_leftovers(session)


def _stop_leftovers(session_dir: str) -> None:
    """Stop the processes of the local cluster this command started that outlive ``ray.shutdown``
    (Ray 2.60 leaves its dashboard and runtime-env agents running once the raylet is gone)."""
    import psutil  # a dependency of Ray

    left = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in arg for arg in proc.info["cmdline"] or ()):
                proc.terminate()
                left.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
