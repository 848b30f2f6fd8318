"""Peak RSS of loading small-v4 (~34M parameters) from a native FP8 + FP4 checkpoint through models.load,
against its fp32 weight bytes, an interpreter that only imports models, and building the same model from a
seed (no checkpoint), and a "warm runtime" baseline (the imports, the module built on the meta device and a
few small torch ops: the libraries and kernels any load pays for). Each measurement is its own process under /usr/bin/time -v.

    python -m benchmarks.v4_load_rss [--out benchmarks/cpu_small_v4_load_rss.json]

small-v4's HCA rate is 32; the native config.json can only say compress ratios 0 / 4 / 128, so the
checkpoint is of small-v4 with HCA at 128 (only the HCA position-bias rows differ).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD = """
import dataclasses, sys
from models.v4_presets import preset_config, init_weights
from models.v4_hf_checkpoint import empty_model
cfg = preset_config("small-v4")
cfg = dataclasses.replace(cfg, compress_rates={**cfg.compress_rates, "heavily_compressed_attention": 128})
cfg = cfg.validate("small-v4, HCA 128")
m = empty_model(cfg)
init_weights(m, 0)
print("FP32_BYTES", sum(t.numel() * t.element_size() for t in m.state_dict().values()))
if len(sys.argv) > 1:
    from models.v4_checkpoint import save_v4_native_checkpoint
    save_v4_native_checkpoint(m.state_dict(), cfg.to_hf_dict(), sys.argv[1])
"""
WARM = """
import torch, models
from models.v4 import DeepseekV4ForCausalLM
from models.v4_presets import preset_config
with torch.device("meta"):
    DeepseekV4ForCausalLM(preset_config("small-v4"))
x = torch.randn(256, 256)
(x @ x).sum(), torch.nn.functional.silu(x), torch.stack([x, x]), x.to(torch.bfloat16).float()
"""
LOAD = """
import sys, models
m = models.load(sys.argv[1])
print("FP8", len(m.checkpoint.fp8_names), "FP4", len(m.checkpoint.fp4_names))
"""


def peak_kib(code: str, *args: str) -> tuple[int, str]:
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *args], capture_output=True, text=True,
                       check=True, cwd=Path(__file__).resolve().parents[1])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)), r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "native"
        _, out = peak_kib(BUILD, str(folder))
        fp32 = int(re.search(r"FP32_BYTES (\d+)", out).group(1))
        ckpt = sum(f.stat().st_size for f in folder.iterdir())
        bare, _ = peak_kib("import torch, models")
        warm, _ = peak_kib(WARM)
        built, _ = peak_kib(BUILD)
        loaded, out = peak_kib(LOAD, str(folder))
    kib = fp32 / 1024
    res = {"command": "python -m benchmarks.v4_load_rss", "fp32_weight_bytes": fp32, "checkpoint_bytes": ckpt,
           "stored": out.strip(), "peak_rss_kib": {"import_only": bare, "warm_runtime": warm, "build_from_seed": built, "models_load": loaded},
           "models_load_minus_import_over_fp32": (loaded - bare) / kib,
           "build_from_seed_minus_import_over_fp32": (built - bare) / kib,
           "models_load_minus_warm_over_fp32": (loaded - warm) / kib,
           "build_from_seed_minus_warm_over_fp32": (built - warm) / kib,
           "models_load_over_fp32": loaded / kib, "models_load_over_build_from_seed": loaded / built}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
