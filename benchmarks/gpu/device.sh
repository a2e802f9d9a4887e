#!/bin/sh
# On the device machine, in the repository root (README.md has the call sequence):
#   sh benchmarks/gpu/device.sh part NN        keep one carried part of onnxruntime-gpu in /tmp/ortparts
#   sh benchmarks/gpu/device.sh run STAGES     assemble + install what was carried, run the stages
set -u
OUT=${OUT:-/tmp/out}
case "$1" in
part)
  mkdir -p /tmp/ortparts && cp ".ortgpu/part-$2" /tmp/ortparts/ && ls -l /tmp/ortparts; exit ;;
run) ;;
*) echo "usage: device.sh part NN | run STAGES" >&2; exit 2 ;;
esac
STAGES=$2
if [ ! -d /tmp/ortgpu/onnxruntime ]; then
  cp .ortgpu/part-* /tmp/ortparts/ 2>/dev/null
  cat /tmp/ortparts/part-* > /tmp/ort.tar.xz
  [ "$(sha256sum /tmp/ort.tar.xz | cut -d' ' -f1)" = "$(cat .ortgpu/ort.sha256)" ] || { echo "onnxruntime-gpu parts: checksum mismatch" >&2; ls -l /tmp/ortparts; exit 3; }
  mkdir -p /tmp/ortgpu && python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/ortgpu')" || exit 3
fi
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 4
fi
# sdrt from this tree without building it: the package layout of pyproject.toml's wheel.packages
mkdir -p /tmp/pkg/sdrt && cp -r src/sdrt/. /tmp/pkg/sdrt/
for p in export runtime benchmarks; do ln -sfn "$PWD/$p" "/tmp/pkg/sdrt/$p"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
python3 -m sdrt.benchmarks.gpu.prove --out "$OUT" --work /tmp/sdrt-gpu --root "$PWD" --ort-site /tmp/ortgpu --stages "$STAGES"
