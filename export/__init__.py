"""sdrt export: checkpoints -> ONNX bundles. Needs the ``export`` extra (torch, diffusers, transformers, onnx)."""
