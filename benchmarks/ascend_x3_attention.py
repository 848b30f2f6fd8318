"""Attention sharpness of the randomized x3 checkpoints (not a pytest test): per decode step and layer, the last
query row's top softmax probability and top-2 score gap per head, and the pre-softmax score std (eager PyTorch).

    python benchmarks/ascend_x3_attention.py v3-s0

Recorded in benchmarks/cpu_ascend_w8a8_x3_sensitivity.json ("attention").
"""
import sys, tempfile, torch
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
from test_routing_parity import randomized_checkpoint
from models import mla
from targets.ascend.emulation import make_prompt
from models.cache import *  # noqa
from targets.ascend.static_export import static_cache_spec
name = sys.argv[1]
model = randomized_checkpoint(name, Path(tempfile.mkdtemp()))
rec = []
orig = mla.MLAAttention._attend if hasattr(mla, "MLAAttention") else None
cls = [c for c in vars(mla).values() if isinstance(c, type) and "_attend" in vars(c)][0]
orig = cls._attend
def hook(self, scores, mask, scale):
    p = orig(self, scores, mask, scale)
    z = scores.float() * scale + mask
    top = z[..., -1, :].topk(2, dim=-1).values  # last query row: [B, H, 2]
    rec.append((p[..., -1, :].max(-1).values.flatten().tolist(), (top[..., 0] - top[..., 1]).flatten().tolist(), (z[..., -1, :][z[..., -1, :] > -1e4]).std().item()))
    return p
cls._attend = hook
cfg = model.config
L = 12
prompt = make_prompt(cfg, 1, L, 0)
cs = static_cache_spec(cfg)
with torch.no_grad():
    logits, cache = model.step(prompt, model.empty_cache(1, cs.layout), cs.layout)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for step in range(4):
        rec.clear()
        logits, cache = model.step(tok, cache, cs.layout)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i, (pm, gap, sd) in enumerate(rec):
            print(f"decode-{step} layer {i}: max prob per head {[round(x,3) for x in pm]} top2 logit gap {[round(x,2) for x in gap]} score std {sd:.1f}")
        print("  logits std", logits.std().item(), "top2 gap", (logits[0,-1].topk(2).values[0]-logits[0,-1].topk(2).values[1]).item())
