"""Node placement of an ort-cuda package on the CUDA EP: (a) the profile of one prefill (8 tokens) and 3 decode
steps through CudaPackageRuntime (CUDA + CPU fallback, as the package runs), counted by provider:op;
(b) each graph opened CUDA-only with session.disable_cpu_ep_fallback=1 (fails if any node lands on the CPU EP)."""
import json, os, sys, glob
import numpy as np

from runtime.cuda_runtime import CudaPackageRuntime, cuda_provider_options, session_options
import onnxruntime as ort
pkg = sys.argv[1]
out = {"package": pkg, "onnxruntime": ort.__version__}
rt = CudaPackageRuntime(pkg, device="cuda", profile=True)
out["providers"] = rt.providers
_, past = rt.run("prefill", np.array([[172, 47, 117, 192, 67, 251, 195, 103]]), rt.empty_cache(1))
for t in (4, 5, 6):
    _, past = rt.run("decode", np.array([[t]]), past)
for g, sess in rt.sessions.items():
    path = sess.end_profiling()
    ev = json.loads(open(path).read()); os.remove(path)
    by = {}
    for e in ev:
        a = e.get("args", {})
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            k = f"{a.get('provider')}:{a.get('op_name')}"
            by[k] = by.get(k, 0) + 1
    out[f"{g}_kernels_by_provider_op"] = dict(sorted(by.items()))
    out[f"{g}_off_cuda"] = {k: v for k, v in by.items() if not k.startswith("CUDAExecutionProvider")}
cfg = dict(rt.manifest["target"].get("session", {}))
for g, spec in rt.manifest["io"]["graphs"].items():
    so = session_options(cfg)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(os.path.join(pkg, spec["file"]), so,
                             providers=[("CUDAExecutionProvider", cuda_provider_options())])
        out[f"{g}_cuda_only_no_fallback"] = "session created: no node assigned to the CPU EP"
    except Exception as e:
        out[f"{g}_cuda_only_no_fallback"] = "FAILED: " + str(e).strip()[:800]
print(json.dumps(out, indent=1))
