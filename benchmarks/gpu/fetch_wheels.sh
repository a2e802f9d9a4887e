#!/bin/sh
# Download what the device lacks (KINDS.md: no diffusers, no onnxruntime-gpu) as cp312 x86-64 wheels.
#   benchmarks/gpu/fetch_wheels.sh      -> .whl/diffusers-*.whl and .ortgpu/onnxruntime_gpu-*.whl
# Run in the repository root, on a machine with PyPI access. Versions are pinned: the device has
# Python 3.12, torch 2.11+cu130, transformers 5.17, huggingface_hub 1.33 (diffusers 0.42.1 needs >=1.32).
set -eu
DIFFUSERS=${DIFFUSERS:-0.42.1}
ORT=${ORT:-1.30.0}            # built for CUDA 13.0 (build_and_package_info.cuda_version), like the device's torch
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.ortgpu/' .git/info/exclude 2>/dev/null || echo /.ortgpu/ >> .git/info/exclude
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "$2"
}
mkdir -p .whl .ortgpu
get .whl "diffusers==$DIFFUSERS"      # pure Python; its needs (filelock, hf-hub, regex, requests, safetensors, Pillow) are on the device
get .ortgpu "onnxruntime-gpu==$ORT"
ls -l .whl .ortgpu
