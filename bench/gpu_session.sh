#!/usr/bin/env bash
# One command of a GPU session (the device tool: a fresh machine per call, offline, at most 10 minutes).
#   bench/gpu_session.sh STAGE [STAGE ...]      STAGE: tests[:ARGS] | bench:FILE[:ARGS] | a shell snippet
# Set-up: wheels carried in .whl/ (dev extras the image lacks), .venv by the Makefile (offline), the Triton
# cache in .tcache/ (carried from the last call: compiled kernels and autotuning results are kept).
# Each stage runs under the time left before DEADLINE seconds; logs, the bench results file and the Triton
# cache come back through $OUT (at most 8 files).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
OUT=${OUT:-/tmp/molf-out}
mkdir -p "$OUT" .tcache
export TRITON_CACHE_DIR=$PWD/.tcache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
left() { echo $((DEADLINE - ($(date +%s) - START))); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  make .venv/.molf-installed 2>&1 | tail -5
  .venv/bin/python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  .venv/bin/python -c "import trl, bitsandbytes; print('trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for stage in "$@"; do
  t=$(left)
  [ "$t" -gt 20 ] || { echo "== $stage: skipped, $t s left" | tee -a "$OUT/stages.txt"; continue; }
  kind=${stage%%:*}; rest=${stage#*:}
  case $kind in
    tests) cmd=".venv/bin/python -m pytest -v tests -p no:cacheprovider -rfEs ${rest#tests}" ; log=tests.log ;;
    bench) file=${rest%%:*}; args=${rest#"$file"}; args=${args#:}
           cmd=".venv/bin/python -m pytest -q $file $args -p no:cacheprovider --benchmark-columns=median --benchmark-group-by=group"
           log=bench.log ;;
    *) cmd=$stage; log=other.log ;;
  esac
  echo "== $stage ($t s left): $cmd" | tee -a "$OUT/$log" "$OUT/stages.txt"
  s0=$(date +%s)
  timeout -s INT -k 20 "$((t - 25))" bash -c "$cmd" >> "$OUT/$log" 2>&1
  rc=$?
  echo "== $stage: rc=$rc in $(( $(date +%s) - s0 )) s" | tee -a "$OUT/$log" "$OUT/stages.txt"
  tail -4 "$OUT/$log"
done
cp bench/results/NVIDIA*.json "$OUT/" 2>/dev/null
tar czf "$OUT/tcache.tgz" .tcache 2>/dev/null
[ "$(stat -c %s "$OUT/tcache.tgz")" -lt 16000000 ] || { echo "Triton cache too large to bring back"; rm "$OUT/tcache.tgz"; }
ls -la "$OUT"
