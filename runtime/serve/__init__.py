"""``sdrt serve``: the webui's HTTP API (``/sdapi/v1/*``) over one pipeline per device.

``create_app(ServeConfig(...))`` returns the FastAPI application: the webui's routes and payloads
(``GenerationParams.from_webui`` reads each generation payload), validation with 422 answers that
name the field, limits, HTTP Basic auth, and one worker thread with a bounded queue (``worker``).
The runtime never imports this package; it needs the ``serve`` extra (FastAPI, uvicorn).
"""

from sdrt.runtime.serve.app import ModelEntry, ServeConfig, create_app

__all__ = ["ModelEntry", "ServeConfig", "create_app"]
