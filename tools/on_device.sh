#!/usr/bin/env bash
# On a lent GPU machine (no network, no make; docs/development.md): gpu-check ("check") or the
# bench's GPU section ("bench"), their results and logs in $OUT, under `timeout` ahead of the
# machine's own 600 s limit, which kills outright (both unwind on timeout's SIGTERM). First,
# where the Python lacks them, the wheels carried in .whl (make gpu-wheels) are installed, once a
# machine. Further arguments go to the run (--rehearse: the same on the CPU, as the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: OUT=DIR tools/on_device.sh check|bench [ARGS...]"
run=${1:?$usage}
shift
python=${PYTHON:-python3}
# One site per Python: wheels built for another (a rehearsal's, say) would be imported first, and fail.
site=${AST_DEVICE_SITE:-/tmp/ast-device-site-$("$python" -c 'import sys; print(sys.implementation.cache_tag)')}
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! "$python" -c "import kserve, soundfile, soxr, av" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
case $run in
  check) exec timeout 560 "$python" -m tools.gpu_check --out "${OUT:?$usage}" "$@" ;;
  bench) exec timeout 560 "$python" -m benchmarks.bench --only gpu --results "${OUT:?$usage}" "$@" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
