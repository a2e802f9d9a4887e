#!/bin/sh
# Repack onnxruntime-gpu smaller and split it into parts that each fit one device call.
#   benchmarks/gpu/split_wheel.sh [CHUNK_BYTES]   (after fetch_wheels.sh; run in the repository root)
# The wheel (~247 MB, zip-deflated) is unpacked without the TensorRT EP library (not installed there
# anyway) and recompressed as tar.xz (xz -9; zstd -19 gave 177 MB for the CUDA provider library alone,
# against ~225 MB deflated in the wheel; xz is used because the device has Python's lzma for sure), then split into .ortgpu/part-NN. A call
# carries the working tree plus its part, 64 MiB in all, so the default chunk is 64 MiB minus the
# tree (tracked + untracked-not-ignored files) minus 2 MiB of margin.
set -eu
cd .ortgpu
WHEEL=$(ls onnxruntime_gpu-*.whl | head -1)
TREE=$(cd .. && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
CHUNK=${1:-$(( 64 * 1048576 - TREE - 2 * 1048576 ))}
rm -rf site ort.tar.xz part-*
mkdir site && unzip -q "$WHEEL" -d site
rm -f site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar -C site -cf - . | xz -T0 -9 > ort.tar.xz
rm -rf site
split -b "$CHUNK" -d -a 2 ort.tar.xz part-
sha256sum ort.tar.xz | cut -d' ' -f1 > ort.sha256
echo "tree $TREE bytes, chunk $CHUNK bytes:"; ls -l part-* ort.tar.xz
