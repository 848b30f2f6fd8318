"""Train `trained-small`: a small DeepSeek-V3-style model whose outputs mean something (the accuracy model).

    python -m models.train_small --out models/trained/trained-small [--steps 1000]

Deterministic: torch.manual_seed, torch.use_deterministic_algorithms(True), one thread, a fixed step
count (never a time budget), batches drawn from a seeded generator. Same Python (its standard library
is the corpus), same torch -> same weights.

Corpus: the Python standard library's own top-level sources (`sysconfig.get_paths()["stdlib"]/*.py`,
sorted by name), read as bytes (byte-level vocabulary of 256). Files are split by their index in
that sorted list: every 10th file (index % 10 == 0) is held out for perplexity, index % 10 == 5 is
the calibration split (W8A8 activation ranges), the rest is training text. Held-out text is
therefore different files from the same corpus, never seen in training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from .config import DeepseekConfig

SPLITS = ("train", "calibration", "heldout")
DEFAULT_OUT = Path(__file__).resolve().parent / "trained" / "trained-small"

CONFIG = DeepseekConfig(
    model_type="deepseek_v3", vocab_size=256, hidden_size=128, intermediate_size=384,
    moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    scoring_func="sigmoid", topk_method="noaux_tc", routed_scaling_factor=2.5, norm_topk_prob=True,
    q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    rope_scaling={"factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
                  "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    max_train_bytes: int = 4_000_000


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def split_of(index: int) -> str:
    return "heldout" if index % 10 == 0 else "calibration" if index % 10 == 5 else "train"


def corpus(split: str, max_bytes: int | None = None) -> np.ndarray:
    """The bytes of one split (files joined by a NUL byte), uint8."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    parts = [p.read_bytes() for i, p in enumerate(corpus_files()) if split_of(i) == split]
    data = np.frombuffer(b"\0".join(parts), dtype=np.uint8)
    return data[:max_bytes] if max_bytes else data


def windows(split: str, n: int, seq: int, max_bytes: int | None = None) -> np.ndarray:
    """`n` evenly spaced windows of `seq` bytes from a split -> int64 [n, seq] (deterministic)."""
    data = corpus(split, max_bytes)
    if len(data) < seq + 1:
        raise ValueError(f"split {split!r} has only {len(data)} bytes")
    starts = np.linspace(0, len(data) - seq - 1, n).astype(np.int64)
    return np.stack([data[s:s + seq] for s in starts]).astype(np.int64)


def build(seed: int = 0):
    from .checkpoint import empty_model
    from .presets import init_weights
    cfg = dataclasses.replace(CONFIG, rope_scaling=dict(CONFIG.rope_scaling)).validate("trained-small")
    model = empty_model(cfg)
    init_weights(model, seed)
    return model


def train(settings: TrainSettings = TrainSettings(), log=print):
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = build(settings.seed)
    model.requires_grad_(True).train()
    data = torch.from_numpy(corpus("train", settings.max_train_bytes).astype(np.int64))
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                            betas=(0.9, 0.95), weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    losses = []
    for step in range(settings.steps):
        starts = torch.randint(0, len(data) - settings.seq - 1, (settings.batch,), generator=g)
        batch = torch.stack([data[s:s + settings.seq + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == settings.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s")
    model.requires_grad_(False).eval()
    return model, {"train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def perplexity(model, split: str = "heldout", n: int = 64, seq: int = 128) -> float:
    ids = torch.from_numpy(windows(split, n, seq + 1))
    nll = 0.0
    for i in range(0, n, 16):
        x = ids[i:i + 16]
        logits = model(x[:, :-1])
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(nll / (n * seq))


def _readme(settings: TrainSettings, stats: dict) -> str:
    files = corpus_files()
    counts = {s: sum(1 for i in range(len(files)) if split_of(i) == s) for s in SPLITS}
    return f"""# trained-small

A small DeepSeek-V3-style model (MLA with q_lora, YaRN RoPE, DeepSeekMoE with the sigmoid/noaux_tc
router, 1 dense + 2 MoE layers, byte-level vocabulary of 256) trained on the Python standard
library's sources: the accuracy model for quantization (issue 6). Hugging Face format (fp32).

Made by `python -m models.train_small --out models/trained/trained-small` (deterministic: seeded,
`torch.use_deterministic_algorithms(True)`, 1 thread, fixed step count).

- Python {sys.version.split()[0]}, torch {torch.__version__}; corpus `{sysconfig.get_paths()['stdlib']}/*.py`
  sorted by name ({len(files)} files): held-out = index % 10 == 0 ({counts['heldout']} files),
  calibration = index % 10 == 5 ({counts['calibration']} files), train = the rest ({counts['train']} files,
  first {settings.max_train_bytes:,} bytes used).
- Settings: {json.dumps(dataclasses.asdict(settings))}
- Result: {json.dumps(stats)}

Load with `models.load("models/trained/trained-small")`; held-out windows with
`models.train_small.windows("heldout", n, seq)`. Quantization figures: `pipeline.quant_eval`.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int, default=TrainSettings.steps)
    args = ap.parse_args(argv)
    from . import save
    settings = TrainSettings(steps=args.steps)
    model, stats = train(settings)
    stats["heldout_perplexity"] = round(perplexity(model, "heldout"), 4)
    stats["train_perplexity"] = round(perplexity(model, "train"), 4)
    print(json.dumps(stats))
    out = Path(args.out)
    save(model, out)
    from .tokenizer import byte_level_files
    for name, data in byte_level_files().items():  # the byte-level vocabulary it was trained with
        (out / name).write_bytes(data)
    (out / "README.md").write_text(_readme(settings, stats))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
