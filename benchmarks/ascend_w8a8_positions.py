"""Per-position error of ascend W8A8 in one prefill pass (not a pytest test): is a decode step worse than prefill?

    python benchmarks/ascend_w8a8_positions.py v3-s0   (and v2-s1)

The fp32 static prefill graph (bucket 16) and the same graph with every site quantized (calibrated as the compile
does) run the 12-token prompt of emulation.compare_runs followed by eager's 4 greedy tokens (the tokens the decode
steps feed), unforced routing; prints each position's logits KL and cosine. Results are in
benchmarks/cpu_ascend_w8a8_x3_sensitivity.json ("per_position").
"""
import sys, tempfile, torch, numpy as np
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
import onnx_ir as ir, onnxruntime as ort
from test_routing_parity import randomized_checkpoint
from targets.ascend.shapes import resolve_shapes
from targets.ascend.static_export import export_static_graph, zero_inputs, INDEX_DTYPE, static_cache_spec
from targets.ascend.emulation import make_prompt
from targets.ascend.flow import CALIBRATION_PROMPTS
from targets.ascend.quant import calibrate_static
from benchmarks.ascend_w8a8_sensitivity import quantize
from models.generation import greedy_generate
name = sys.argv[1]
d = Path(tempfile.mkdtemp())
model = randomized_checkpoint(name, d / "ckpt"); cfg = model.config
shapes = resolve_shapes(cfg, "Ascend910B3", "mixed_float16", None, None, None, None)
spec = [s for s in shapes.base_specs() if s.kind == "prefill"][0]
g = export_static_graph(model, spec)
rng = np.random.default_rng(1); feeds = []
for _ in range(CALIBRATION_PROMPTS):
    f = zero_inputs(cfg, spec); f["input_ids"] = rng.integers(0, cfg.vocab_size, (spec.batch, spec.seq)).astype(INDEX_DTYPE); feeds.append(f)
cal = calibrate_static(g, feeds)
ir.save(g, d / "f.onnx")
q = ir.load(d / "f.onnx"); quantize(q, cfg, cal); ir.save(q, d / "q.onnx")
prompt = make_prompt(cfg, 1, 12, 0)
toks, _ = greedy_generate(model, prompt, 4, static_cache_spec(cfg).layout)
ids = torch.cat([prompt, torch.as_tensor(toks)], 1).numpy().astype(INDEX_DTYPE)
f = zero_inputs(cfg, spec); f["input_ids"] = ids
out = {}
for k in ("f", "q"):
    s = ort.InferenceSession(str(d / f"{k}.onnx"), providers=["CPUExecutionProvider"])
    out[k] = s.run(["logits"], f)[0][0]
def lsm(x): x = x - x.max(-1, keepdims=True); return x - np.log(np.exp(x).sum(-1, keepdims=True))
a, b = lsm(out["f"].astype(np.float64)), lsm(out["q"].astype(np.float64))
kl = (np.exp(a) * (a - b)).sum(-1)
cos = (out["f"] * out["q"]).sum(-1) / np.linalg.norm(out["f"], axis=-1) / np.linalg.norm(out["q"], axis=-1)
print(name, "per-position KL (unforced routing, fp32 static prefill vs every site quantized):")
print(" ".join(f"{i}:{x:.3f}" for i, x in enumerate(kl)))
print(" ".join(f"{i}:{x:.4f}" for i, x in enumerate(cos)))
print("mean KL positions 0-11:", kl[:12].mean(), " positions 12-15 (the decode steps' tokens):", kl[12:16])
