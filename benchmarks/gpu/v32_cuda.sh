#!/usr/bin/env bash
# DeepSeek-V3.2 (issue 17) on the lent H200: `mlamoe verify` (golden data re-run on the CUDA EP) of CPU-built tiny-v32
# ort-cuda packages: fp16 with decode gears 32,64, int8, int4, fp8. benchmarks/gpu/README.md is the recipe; the
# onnxruntime-gpu parts are the ones cuda_graph.sh / int4_cuda.sh prepare into dist/whl/.
#
#   bash benchmarks/gpu/v32_cuda.sh prepare   # HERE: dist/gpu/tiny-v32-ort-cuda-*.tar.gz (and the parts, if missing)
#   bash benchmarks/gpu/cuda_graph.sh stage   # THERE, calls 1-3: each carries one of dist/whl/...part00..02
#   bash benchmarks/gpu/v32_cuda.sh run       # THERE, call 4: carries part03, dist/whl/SHA256SUMS, dist/gpu
#   bash benchmarks/gpu/v32_cuda.sh levels    # THERE, after run: fp8's golden cases per optimization level, buffer reuse
#                                             # off, deterministic compute, a repeat (ep_diff.py levels)
#   bash benchmarks/gpu/v32_cuda.sh diff      # THERE, call 4 or 5, carrying .gpudiff too (made HERE by
#                                             # `python -m benchmarks.gpu.ep_diff feeds PKG --feeds .gpudiff/feeds_SCHEME`):
#                                             # every value of the golden cases and of the first greedy step whose top-1
#                                             # differs on the CUDA EP, for `ep_diff compare` HERE (benchmarks/gpu/ep_diff.py)
#
# Writes under $OUT: v32_verify.txt (each package's verify output and exit status), env.txt.
set -uo pipefail
cmd=${1:-run}
STAGE=/tmp/cuda_graph_stage
SCHEMES="fp16 int8 int4 fp8"

prepare() {
  set -e
  PY=${PY:-python3}
  mkdir -p dist/gpu
  rm -f dist/gpu/*.tar.gz
  for s in $SCHEMES; do
    if [ "$s" = fp16 ]; then extra="--decode-gears 32,64"; q=none; else extra=""; q=$s; fi
    $PY -m pipeline compile --model tiny-v32 --target ort-cuda --quant $q $extra --out dist/gpu/tiny-v32-ort-cuda-$s --force
    rm -rf dist/gpu/tiny-v32-ort-cuda-$s
  done
  [ -f dist/whl/SHA256SUMS ] || bash benchmarks/gpu/cuda_graph.sh prepare
  ls -la dist/gpu dist/whl
}

run() {
  bash benchmarks/gpu/cuda_graph.sh stage
  OUT=${OUT:-/tmp/v32_out}
  mkdir -p "$OUT"
  if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
    cat "$STAGE"/ortgpu-site.tar.xz.part* > /tmp/ortgpu-site.tar.xz
    (cd /tmp && sha256sum -c "$STAGE/SHA256SUMS") || { echo "parts incomplete: run stage with each part first"; exit 1; }
    mkdir -p /tmp/site && tar xJf /tmp/ortgpu-site.tar.xz -C /tmp/site
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  { python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
    nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv; } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  : > "$OUT/v32_verify.txt"
  for s in $SCHEMES; do
    P=$STAGE/gpu/tiny-v32-ort-cuda-$s.tar.gz
    echo "=== $s: mlamoe verify $P" >> "$OUT/v32_verify.txt"
    timeout 120 python3 -m pipeline verify "$P" >> "$OUT/v32_verify.txt" 2>&1
    echo "exit $?" >> "$OUT/v32_verify.txt"
  done
  cat "$OUT/v32_verify.txt"
}

diff() {  # THERE, after run (or in its place, call 4): where the CUDA EP parts from ORT CPU (benchmarks/gpu/ep_diff.py)
  bash benchmarks/gpu/cuda_graph.sh stage > /dev/null
  OUT=${OUT:-/tmp/v32_out}
  mkdir -p "$OUT" /tmp/v32_pkgs
  if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
    cat "$STAGE"/ortgpu-site.tar.xz.part* > /tmp/ortgpu-site.tar.xz
    (cd /tmp && sha256sum -c "$STAGE/SHA256SUMS") || { echo "parts incomplete: run stage with each part first"; exit 1; }
    mkdir -p /tmp/site && tar xJf /tmp/ortgpu-site.tar.xz -C /tmp/site
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  for s in ${DIFF_SCHEMES:-fp16 fp8 int8}; do
    tar xzf "$STAGE/gpu/tiny-v32-ort-cuda-$s.tar.gz" -C /tmp/v32_pkgs
    mkdir -p "$OUT/$s"
    timeout 200 python3 -m benchmarks.gpu.ep_diff cuda /tmp/v32_pkgs/tiny-v32-ort-cuda-$s --feeds .gpudiff/feeds_$s \
      --dump "$OUT/$s" > /dev/null 2> "$OUT/$s/err.txt"
    echo "$s exit $?"
  done
  ls -la "$OUT"
}

levels() {  # THERE, after run (stage done): the fp8 golden cases at each optimization level and with buffer reuse
  bash benchmarks/gpu/cuda_graph.sh stage > /dev/null  # off / deterministic compute / a repeat (ep_diff.py levels)
  OUT=${OUT:-/tmp/v32_out}
  mkdir -p "$OUT" /tmp/v32_pkgs
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  for s in ${LEVEL_SCHEMES:-fp8}; do
    tar xzf "$STAGE/gpu/tiny-v32-ort-cuda-$s.tar.gz" -C /tmp/v32_pkgs
    timeout 200 python3 -m benchmarks.gpu.ep_diff levels /tmp/v32_pkgs/tiny-v32-ort-cuda-$s --json "$OUT/levels_$s.json" \
      > /dev/null 2> "$OUT/levels_$s.err.txt"
    echo "$s exit $?"; cat "$OUT/levels_$s.json"
  done
}

case "$cmd" in
  prepare) prepare ;;
  levels) levels ;;
  run) run ;;
  diff) diff ;;
  *) echo "usage: $0 prepare|run|diff|levels"; exit 2 ;;
esac
