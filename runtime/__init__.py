"""sdrt runtime: numpy + ONNX Runtime sampling loop. Never imports torch."""

__version__ = "0.1.0"
