"""How far FP8 (and fp16) weight rounding moves a model's logits in eager PyTorch, with no ONNX involved
(not a pytest test; CPU). The reference for the agreement figures of benchmarks.cuda_fp8: the same
prompt (rng 1, --prompt-len tokens), the same weights touched (every linear weight the ort-cuda fp8 flow
quantizes: not the routed experts, which com.microsoft.MoE keeps fp16, nor the router gate, lm_head,
embeddings and norms), DeepSeek-V3's 128x128-block E4M3 rounding (models.checkpoint, the scheme that
tests/test_quant_schemes.py checks against numpy).

    python -m benchmarks.fp8_sensitivity --model medium --out benchmarks/cpu_medium_fp8_sensitivity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import command_line, elapsed_logger  # noqa: E402


def quantized_by_fp8_flow(name: str, ndim: int) -> bool:
    return (ndim == 2 and name.endswith(".weight") and ".mlp.experts." not in name and "embed" not in name
            and "lm_head" not in name and not name.endswith("mlp.gate.weight") and "norm" not in name)


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1]).astype(np.float64)
    return {"cosine": float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))),
            "max_abs": float(np.abs(a - b).max()), "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    log = elapsed_logger()
    import torch

    import models
    from models.checkpoint import fp8_block_dequantize, fp8_block_quantize
    t0 = time.time()
    model = models.load(args.model, seed=0).eval()
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, args.prompt_len), dtype=np.int64)

    def logits():
        with torch.no_grad():
            return model(torch.from_numpy(prompt)).float().numpy()

    ref = logits()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = {"command": command_line("benchmarks.fp8_sensitivity", argv), "model": args.model,
           "prompt_len": args.prompt_len, "vs_eager_fp32": {}}
    for tag, rounding in (("fp8 weights", lambda w: fp8_block_dequantize(*fp8_block_quantize(w))),
                          ("fp16-rounded weights", lambda w: w.half().float())):
        n = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if quantized_by_fp8_flow(name, p.ndim):
                    p.copy_(rounding(p.detach().clone()))
                    n += 1
        res["vs_eager_fp32"][tag] = {**_agreement(ref, logits()), "n_weights": n}
        log(f"{tag}: {res['vs_eager_fp32'][tag]}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
    res["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
