#!/usr/bin/env bash
# ort-cuda --quant int4 on the lent H200: verify the trained-small int4 package there and time decode against the
# fp16 and int8 packages in the same run (benchmarks/gpu/README.md is the recipe this follows). From the repo root:
#
#   bash benchmarks/gpu/int4_cuda.sh prepare   # HERE (CPU machine, network): the 3 packages into dist/gpu/, the
#                                              # onnxruntime-gpu site folder as 4 parts into dist/whl/ (~3 min)
#   bash benchmarks/gpu/int4_cuda.sh stage     # THERE, calls 1-3: each carries one part (dist/whl/...part00..02)
#   bash benchmarks/gpu/int4_cuda.sh run       # THERE, call 4: carries part03, SHA256SUMS and dist/gpu; runs all
#
# The machine goes back after ~30 s idle: make the four calls back to back (a fresh machine needs every part again).
# `run` writes $OUT/h200_ort_cuda_int4.json (benchmarks.cuda_int8: verify_golden on CUDA, vs eager fp32, greedy,
# placement, decode ms/token at 1K and 8K cache, with --probe-int4), $OUT/verify_*.txt (`mlamoe verify`, i.e.
# python -m pipeline verify), $OUT/gpu_tests.txt (pytest -m gpu tests/test_ort_cuda_quant_gpu.py on the int4
# package) and $OUT/run.log.
# onnxruntime-gpu: 1.31.1, the newest on PyPI for Linux (no 1.32.0 wheel is served); the packages are built with
# onnxruntime 1.32.0 CPU (IR <= 10, opset 17..23: what 1.31.1 loads, as for the int8 / fp8 runs).
set -uo pipefail
cmd=${1:-run}
ORTGPU=${ORTGPU:-1.31.1}
STAGE=/tmp/int4_cuda_stage
PKGS="trained-small-ort-cuda trained-small-ort-cuda-int8 trained-small-ort-cuda-int4"

prepare() {  # on the CPU machine
  set -e
  PY=${PY:-python3}
  mkdir -p dist/gpu dist/whl
  for q in none int8 int4; do
    s=$([ $q = none ] && echo "" || echo "-$q")
    $PY -m pipeline compile --model trained-small --target ort-cuda $([ $q = none ] || echo "--quant $q") \
      --out dist/gpu/trained-small-ort-cuda$s --force
  done
  w=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$w" "onnxruntime-gpu==$ORTGPU"
  mkdir "$w/site" && (cd "$w/site" && unzip -q "$w"/onnxruntime_gpu-*.whl)  # the wheel's files = pip install --target
  (cd "$w/site" && tar cf - .) | xz -T0 -6 > "$w/ortgpu-site.tar.xz"
  rm -f dist/whl/ortgpu-site.tar.xz.part*
  split -b 54M -d "$w/ortgpu-site.tar.xz" dist/whl/ortgpu-site.tar.xz.part
  (cd "$w" && sha256sum ortgpu-site.tar.xz) > dist/whl/SHA256SUMS
  rm -rf "$w"
  ls -la dist/whl dist/gpu/*.tar.gz
}

stage() {  # on the GPU machine: keep what this call carried
  mkdir -p "$STAGE"
  cp -n dist/whl/ortgpu-site.tar.xz.part* dist/whl/SHA256SUMS "$STAGE"/ 2>/dev/null || true
  [ -d dist/gpu ] && cp -rn dist/gpu "$STAGE"/ 2>/dev/null
  ls -la "$STAGE" "$STAGE"/gpu 2>/dev/null
}

run() {
  stage
  OUT=${OUT:-/tmp/int4_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/run.log") 2>&1
  if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
    cat "$STAGE"/ortgpu-site.tar.xz.part* > /tmp/ortgpu-site.tar.xz || exit 1
    (cd /tmp && sha256sum -c "$STAGE/SHA256SUMS") || { echo "parts incomplete: run stage with each part first"; exit 1; }
    mkdir -p /tmp/site && tar xJf /tmp/ortgpu-site.tar.xz -C /tmp/site || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv || true
  P=$STAGE/gpu
  for p in $PKGS; do
    [ -f "$P/$p.tar.gz" ] || { echo "missing $P/$p.tar.gz (carry dist/gpu)"; exit 1; }
    timeout 240 python3 -m pipeline verify "$P/$p.tar.gz" > "$OUT/verify_$p.txt" 2>&1
    echo "exit $?" >> "$OUT/verify_$p.txt"
    cat "$OUT/verify_$p.txt"
  done
  MLAMOE_ORT_CUDA_PACKAGE=$P/trained-small-ort-cuda-int4.tar.gz timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_ort_cuda_quant_gpu.py -rs > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
  tail -5 "$OUT/gpu_tests.txt"
  timeout 400 python3 -m benchmarks.cuda_int8 --probe-int4 --lengths 1024,8192 --repeat 100 \
    --packages $(for p in $PKGS; do echo "$P/$p.tar.gz"; done) --out "$OUT/h200_ort_cuda_int4.json"
  echo "benchmark exit $?"
  python3 - "$OUT/h200_ort_cuda_int4.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("onnxruntime", r["onnxruntime"], "errors", len(r["errors"]))
print("int4 probe", json.dumps(r.get("int4_probe"), sort_keys=True))
for p in r["packages"]:
    d = {L: round(v["median_ms"], 3) for L, v in p.get("decode", {}).items()}
    v = p.get("vs_fp32", {}).get("prefill/logits", {})
    print(p["quantization"], "verify", p["verify"]["passed"], "decode ms", d, "prefill cosine", v.get("cosine"),
          "greedy", p.get("greedy_vs_fp32", {}).get("n_equal_prefix"), "placement", p.get("placement"))
EOF
}

case "$cmd" in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  *) echo "usage: $0 prepare|stage|run"; exit 2 ;;
esac
