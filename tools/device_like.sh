#!/usr/bin/env bash
# tools/on_device.sh's two runs (gpu-check and the bench's GPU section), rehearsed on this CPU in a
# Python like the lent GPU machine's: its Python 3.12, its torch (PyPI's 2.11.0, a CUDA build that runs
# on a CPU), transformers and numpy, the other packages of its image that kserve and this server
# import, and the carried wheels (.whl, make gpu-wheels) installed as that script installs them there.
# make gpu-rehearsal runs the same two runs in .venv, whose versions are this repo's pins; this one
# catches what only the machine's versions break, before device time is spent on it.
# The virtualenv (gigabytes: CUDA's libraries come with that torch) is made once and kept.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
venv=${DEVICE_LIKE_VENV:-/tmp/ast-device-like}
if [ ! -x "$venv/bin/python" ]; then
  python=${DEVICE_PYTHON:-python3.12}
  # pyenv's shim for a version that is installed but not selected fails: take that version itself.
  "$python" -c '' 2>/dev/null || python=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 | tail -n 1)
  "$python" -m venv "$venv"
  # /work/.library/device/KINDS.md: the versions read on that machine where it gives them, else the newest.
  "$venv/bin/python" -m pip install -q torch==2.11.0 transformers==5.17.0 numpy==2.5.2 onnxruntime==1.30.0 \
    onnx==1.23.1 safetensors==0.8.0 tokenizers==0.23.2 huggingface_hub==1.33.0 \
    aiohttp grpcio h11 httpx pandas pillow prometheus-client protobuf psutil python-dateutil pyyaml \
    requests six tabulate tqdm urllib3 uvloop
fi
[ -d .whl ] || make gpu-wheels
# A site of its own, so that wheels installed by an earlier run are not taken for this one's.
export AST_DEVICE_SITE
AST_DEVICE_SITE=$(mktemp -d)
trap 'rm -rf "$AST_DEVICE_SITE"' EXIT
for run in check bench; do
  mkdir -p "$out/$run"
  PYTHON=$venv/bin/python OUT=$out/$run bash tools/on_device.sh "$run" --rehearse
done
echo "results and logs in $out"
