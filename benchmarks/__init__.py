"""Benchmarks: the ``sdrt bench`` harness and the standalone runs (``python -m benchmarks.NAME``).
They import the runtime (and, for the torch peers, the exporter); the runtime never imports them."""
