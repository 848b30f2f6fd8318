# one device call: stage part03, site, then verify + GPU tests + placement for both packages, determinism probe
set -uo pipefail
bash benchmarks/gpu/cuda_graph.sh stage > $OUT/stage.txt 2>&1
S=/tmp/cuda_graph_stage
if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
  cat $S/ortgpu-site.tar.xz.part* > /tmp/ortgpu-site.tar.xz
  (cd /tmp && sha256sum -c $S/SHA256SUMS) || { echo "parts incomplete"; ls -la $S; exit 1; }
  mkdir -p /tmp/site && tar xJf /tmp/ortgpu-site.tar.xz -C /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())" | tee $OUT/env.txt
nvidia-smi --query-gpu=name,driver_version --format=csv >> $OUT/env.txt 2>&1
mkdir -p /tmp/pkgs
for v in fp16 int8; do
  P=$PWD/dist/gpu/ts-cuda-$v.tar.gz
  tar xzf $P -C /tmp/pkgs
  L=$OUT/$v.txt
  { echo "== mlamoe verify $P"; timeout 120 python3 -m pipeline verify $P 2>&1; echo "verify exit $?"
    echo "== pytest -m gpu tests/test_ort_cuda.py"
    MLAMOE_ORT_CUDA_PACKAGE=$P timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ort_cuda.py -rs 2>&1
    echo "pytest exit $?"
    if [ $v = int8 ]; then echo "== pytest -m gpu tests/test_ort_cuda_quant_gpu.py (extra)"
      MLAMOE_ORT_CUDA_PACKAGE=$P timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ort_cuda_quant_gpu.py -rs 2>&1
      echo "pytest exit $?"; fi
    echo "== placement"; timeout 90 python3 dist/probe/placement.py /tmp/pkgs/ts-cuda-$v 2>&1; echo "placement exit $?"
  } > $L 2>&1
  grep -E "exit|passed|failed|skipped|error|golden data|off_cuda|no_fallback" $L | head -40
done
cd /tmp/pkgs/ts-cuda-fp16
D=$OUT/determinism.txt
for i in 1 2 3; do
  timeout 60 python3 runtime/cuda_runtime.py --device cuda generate --prompt-ids 172,47,117,192,67,251,195,103 --max-new-tokens 32 2>&1 | tee -a $D
done
python3 - $D <<'P' | tee -a $D
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
t = [x["tokens"] for x in r]
print("runs", len(t), "identical", all(x == t[0] for x in t), "decode", [x["decode"] for x in r], "providers", r[0]["providers"] if r else None)
P
