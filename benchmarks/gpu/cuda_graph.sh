#!/usr/bin/env bash
# ort-cuda decode gears + CUDA graphs (issue 19) on the lent H200: the GPU tests and `mlamoe verify` on a CPU-built
# tiny gears package, then decode ms/token at 1K / 8K / 32K for trained-small, small and medium: today's ort-cuda
# decode vs the CUDA-graph gears vs eager PyTorch with torch.cuda.CUDAGraph (benchmarks/cuda_graph.py; graphs built
# on the machine: medium's are ~1 GB, more than a call carries). benchmarks/gpu/README.md is the recipe this follows.
# From the repo root:
#
#   bash benchmarks/gpu/cuda_graph.sh prepare   # HERE (CPU machine, network): dist/gpu/tiny-ort-cuda-gears.tar.gz and
#                                               # the onnxruntime-gpu site folder as 4 parts into dist/whl/ (skipped
#                                               # when dist/whl/SHA256SUMS is there already, e.g. from int4_cuda.sh)
#   bash benchmarks/gpu/cuda_graph.sh stage     # THERE, calls 1-3: each carries one part (dist/whl/...part00..02)
#   bash benchmarks/gpu/cuda_graph.sh run       # THERE, call 4: carries part03, dist/whl/SHA256SUMS, dist/gpu; GPU
#                                               # tests + verify (tiny), benchmark trained-small and small (<= 10
#                                               # min; what is unfinished: `MODELS=small ... medium` in a next call)
#   bash benchmarks/gpu/cuda_graph.sh medium    # THERE, call 5 (same machine, back to back): benchmark medium (~8 min;
#                                               # if it runs out of time, call it again: it reuses the graphs built
#                                               # in /tmp/cuda_graph_work)
#   bash benchmarks/gpu/cuda_graph.sh profile   # THERE, instead of run: carries part03, SHA256SUMS, dist/gpu; GPU
#                                               # tests + verify (tiny), then benchmarks/cuda_gear_profile.py on
#                                               # trained-small and small: ORT nodes and CUPTI kernels per step, the
#                                               # gears with and without the kernel-count fusions, dynamic, torch
#                                               # CUDA graph, run-to-run determinism probes (h200_cuda_gear_profile.json)
#   bash benchmarks/gpu/cuda_graph.sh profile-medium-build   # THERE, next call: medium's graphs (~7 min)
#   bash benchmarks/gpu/cuda_graph.sh profile-medium         # THERE, next call: medium measured (reuses the build)
#   bash benchmarks/gpu/cuda_graph.sh determinism  # THERE, instead of profile (carries part03, SHA256SUMS): small and
#                                               # medium, gear 1024 only: --generations greedy runs with the dynamic
#                                               # prefill vs prefill="gears", run-to-run probes
#                                               # (h200_cuda_gear_determinism.json; written 2026-12-04, not yet run)
#
# The machine goes back after ~30 s idle: make the calls back to back (a fresh machine needs every part again).
# Writes under $OUT: h200_cuda_graph.json (one file, each call adds its models), gpu_tests.txt, verify_tiny.txt,
# run.log / medium.log. MODELS=... GEARS=... REPEAT=... override the benchmark's defaults. Each call also keeps the JSON
# in /tmp/cuda_graph_work on the machine and the next call on the same machine starts from it, so call 5's
# h200_cuda_graph.json holds every model measured so far (or carry benchmarks/h200_cuda_graph.json on a fresh one).
set -uo pipefail
cmd=${1:-run}
ORTGPU=${ORTGPU:-1.31.1}
STAGE=/tmp/cuda_graph_stage
GEARS=${GEARS:-1024,8192,32768}
REPEAT=${REPEAT:-50}
PKG=tiny-ort-cuda-gears
WORK=/tmp/cuda_graph_work  # benchmarks/cuda_graph.py --work: the graphs it built, reused by a later call

prepare() {  # on the CPU machine
  set -e
  PY=${PY:-python3}
  mkdir -p dist/gpu dist/whl
  $PY -m pipeline compile --model tiny --target ort-cuda --decode-gears 16,64 --out dist/gpu/$PKG --force
  if [ ! -f dist/whl/SHA256SUMS ]; then
    w=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$w" "onnxruntime-gpu==$ORTGPU"
    mkdir "$w/site" && (cd "$w/site" && unzip -q "$w"/onnxruntime_gpu-*.whl)  # = pip install --target
    (cd "$w/site" && tar cf - .) | xz -T0 -6 > "$w/ortgpu-site.tar.xz"
    rm -f dist/whl/ortgpu-site.tar.xz.part*
    split -b 54M -d "$w/ortgpu-site.tar.xz" dist/whl/ortgpu-site.tar.xz.part
    (cd "$w" && sha256sum ortgpu-site.tar.xz) > dist/whl/SHA256SUMS
    rm -rf "$w"
  fi
  ls -la dist/whl dist/gpu/$PKG.tar.gz
}

stage() {  # on the GPU machine: keep what this call carried
  mkdir -p "$STAGE"
  cp -n dist/whl/ortgpu-site.tar.xz.part* dist/whl/SHA256SUMS "$STAGE"/ 2>/dev/null || true
  [ -d dist/gpu ] && cp -rn dist/gpu "$STAGE"/ 2>/dev/null
  ls -la "$STAGE" "$STAGE"/gpu 2>/dev/null
}

site() {  # onnxruntime-gpu into /tmp/site (once per machine)
  if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
    cat "$STAGE"/ortgpu-site.tar.xz.part* > /tmp/ortgpu-site.tar.xz || return 1
    (cd /tmp && sha256sum -c "$STAGE/SHA256SUMS") || { echo "parts incomplete: run stage with each part first"; return 1; }
    mkdir -p /tmp/site && tar xJf /tmp/ortgpu-site.tar.xz -C /tmp/site || return 1
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
}

run() {
  stage
  OUT=${OUT:-/tmp/cuda_graph_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/run.log") 2>&1
  site || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv || true
  P=$STAGE/gpu/$PKG.tar.gz
  [ -f "$P" ] || { echo "missing $P (carry dist/gpu)"; exit 1; }
  MLAMOE_ORT_CUDA_GEARS_PACKAGE=$P MLAMOE_ORT_CUDA_PACKAGE=$P timeout 180 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_ort_cuda_gears.py tests/test_ort_cuda.py -rs > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
  tail -8 "$OUT/gpu_tests.txt"
  timeout 90 python3 -m pipeline verify "$P" > "$OUT/verify_tiny.txt" 2>&1
  echo "exit $?" >> "$OUT/verify_tiny.txt"
  cat "$OUT/verify_tiny.txt"
  timeout 320 python3 -m benchmarks.cuda_graph --models "${MODELS:-trained-small,small}" --gears "$GEARS" \
    --repeat "$REPEAT" --pingpong --work "$WORK" --also-save "$WORK/h200_cuda_graph.json" --out "$OUT/h200_cuda_graph.json"
  echo "benchmark exit $?"
  summary "$OUT/h200_cuda_graph.json"
}

medium() {
  OUT=${OUT:-/tmp/cuda_graph_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/medium.log") 2>&1
  stage
  site || exit 1
  # a previous call's JSON, when this call carried it back (benchmarks/h200_cuda_graph.json): models add up
  [ -f "$OUT/h200_cuda_graph.json" ] || cp "$WORK/h200_cuda_graph.json" "$OUT/" 2>/dev/null || \
    { [ -f benchmarks/h200_cuda_graph.json ] && cp benchmarks/h200_cuda_graph.json "$OUT/"; }
  timeout 570 python3 -m benchmarks.cuda_graph --models "${MODELS:-medium}" --gears "$GEARS" --repeat "$REPEAT" \
    --work "$WORK" --also-save "$WORK/h200_cuda_graph.json" --out "$OUT/h200_cuda_graph.json"
  echo "benchmark exit $?"
  summary "$OUT/h200_cuda_graph.json"
}

profile() {
  stage
  OUT=${OUT:-/tmp/cuda_graph_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/profile.log") 2>&1
  site || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv || true
  P=$STAGE/gpu/$PKG.tar.gz
  [ -f "$P" ] || { echo "missing $P (carry dist/gpu)"; exit 1; }
  MLAMOE_ORT_CUDA_GEARS_PACKAGE=$P MLAMOE_ORT_CUDA_PACKAGE=$P timeout 150 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_ort_cuda_gears.py -rs > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
  tail -8 "$OUT/gpu_tests.txt"
  timeout 60 python3 -m pipeline verify "$P" > "$OUT/verify_tiny.txt" 2>&1
  echo "exit $?" >> "$OUT/verify_tiny.txt"
  cat "$OUT/verify_tiny.txt"
  timeout ${PROFILE_TIMEOUT:-380} python3 -m benchmarks.cuda_gear_profile --models "${MODELS:-trained-small,small}" \
    --gears "$GEARS" --repeat "$REPEAT" --torch --determinism --work "$WORK" \
    --also-save "$WORK/h200_cuda_gear_profile.json" --out "$OUT/h200_cuda_gear_profile.json"
  echo "profile exit $?"
}

profile_medium() {  # $1: --build-only or nothing (set -u: read as ${1:-})
  OUT=${OUT:-/tmp/cuda_graph_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/profile_medium${1:+_build}.log") 2>&1
  stage
  site || exit 1
  [ -f "$OUT/h200_cuda_gear_profile.json" ] || cp "$WORK/h200_cuda_gear_profile.json" "$OUT/" 2>/dev/null || true
  timeout 570 python3 -m benchmarks.cuda_gear_profile --models "${MODELS:-medium}" --gears "$GEARS" \
    --repeat "$REPEAT" --torch --determinism --work "$WORK" ${1:-} \
    --also-save "$WORK/h200_cuda_gear_profile.json" --out "$OUT/h200_cuda_gear_profile.json"
  echo "profile exit $?"
}

determinism() {  # repeated generations, dynamic prefill vs prefill="gears", and the run-to-run probes (one gear)
  stage
  OUT=${OUT:-/tmp/cuda_graph_out}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/determinism.log") 2>&1
  site || exit 1
  timeout ${DET_TIMEOUT:-560} python3 -m benchmarks.cuda_gear_profile --models "${MODELS:-small,medium}" \
    --gears "${DET_GEARS:-1024}" --sections parity --variants ort_gear_graph --determinism \
    --generations "${GENERATIONS:-4}" --work "${WORK}_det" --out "$OUT/h200_cuda_gear_determinism.json"
  echo "determinism exit $?"
}

summary() {
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("onnxruntime", r["env"]["onnxruntime"], "errors", len(r["errors"]))
for name, m in r["models"].items():
    print(name, "errors", len(m["errors"]), "parity", json.dumps(m.get("parity")))
    print("  capture", json.dumps(m.get("capture", {}).get("dynamic_decode")), "off-CUDA gear nodes",
          m.get("capture", {}).get("gear_nodes_off_cuda"))
    for G, row in m.get("decode", {}).items():
        ms = {k: round(v["median_ms"], 3) for k, v in row.items() if isinstance(v, dict) and "median_ms" in v}
        print(f"  G={G} ms/token", ms, "floor", round(row["floor_ms"], 4),
              "speedup", round(row.get("speedup_gear_graph_vs_dynamic", 0), 2))
    for e in m["errors"]:
        print("  ERROR", e[-600:])
EOF
}

case "$cmd" in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  medium) medium ;;
  profile) profile ;;
  determinism) determinism ;;
  profile-medium-build) profile_medium --build-only ;;
  profile-medium) profile_medium ;;
  *) echo "usage: $0 prepare|stage|run|medium|profile|profile-medium-build|profile-medium"; exit 2 ;;
esac
