"""Golden data: fixed inputs and the eager reference's outputs, used by every parity check and
shipped in the package for re-verification on the target."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from models.family import family_of
from models.generation import greedy_generate


@dataclasses.dataclass
class GoldenCase:
    name: str  # prefill | prefill-chunk | decode
    graph: str  # which graph runs it
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclasses.dataclass
class Golden:
    cases: list[GoldenCase]
    prompt: np.ndarray  # [1, S] for greedy generation
    tokens: np.ndarray  # [1, N] eager greedy tokens
    step_logits: np.ndarray  # [1, N, vocab]


def case_lengths(spec, prompt_len: int = 8, chunk_len: int = 4) -> tuple[int, int]:
    """(prompt, chunk) lengths of the golden cases. A spec whose tensors follow window(n) / pending(m) /
    compressed(m) rules (models/cache.py) gets a prompt that fills every window and closes at least two entries of
    each rate m, and whose decode token (at position prompt + chunk) closes an entry of every rate at once; the
    chunk then closes one of each rate m <= chunk_len. Specs with append tensors only keep the given lengths."""
    tensors = [t for layer in spec.layers for t in layer]
    rates = {t.n for t in tensors if t.rule in ("pending", "compressed")}
    windows = [t.n for t in tensors if t.rule == "window"]
    if not rates and not windows:
        return prompt_len, chunk_len
    period = math.lcm(*rates) if rates else 1
    least = max([prompt_len, *(2 * m for m in rates), *(n + 1 for n in windows)])
    prompt = least + (-(least + chunk_len + 1)) % period
    return prompt, chunk_len


@torch.no_grad()
def make_golden(model, layout: str | None = None, batch: int = 2, prompt_len: int | None = None,
                chunk_len: int = 4, gen_tokens: int = 32, seed: int = 0) -> Golden:
    """The golden cases in `layout` (the family's default cache layout unless given); prompt_len: case_lengths'
    unless given."""
    layout = layout or family_of(model).cache_layouts[0]
    spec = model.cache_spec(layout)
    if prompt_len is None:
        prompt_len, chunk_len = case_lengths(spec, chunk_len=chunk_len)
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (batch, prompt_len), generator=g)
    chunk = torch.randint(0, V, (batch, chunk_len), generator=g)
    empty = model.empty_cache(batch, layout)
    logits, present = model.step(prompt, empty, layout)
    cases = [GoldenCase("prefill", "prefill", {"input_ids": prompt.numpy(), **spec.flatten(empty, "past")},
                        {"logits": logits.numpy(), **spec.flatten(present, "present")})]
    logits_c, present_c = model.step(chunk, present, layout)
    cases.append(GoldenCase("prefill-chunk", "prefill", {"input_ids": chunk.numpy(), **spec.flatten(present, "past")},
                            {"logits": logits_c.numpy(), **spec.flatten(present_c, "present")}))
    nxt = logits_c[:, -1].argmax(-1, keepdim=True)
    logits_d, present_d = model.step(nxt, present_c, layout)
    cases.append(GoldenCase("decode", "decode", {"input_ids": nxt.numpy(), **spec.flatten(present_c, "past")},
                            {"logits": logits_d.numpy(), **spec.flatten(present_d, "present")}))
    gen_prompt = prompt[:1]
    tokens, step_logits = greedy_generate(model, gen_prompt, gen_tokens, layout)
    return Golden(cases, gen_prompt.numpy(), tokens.numpy(), step_logits.numpy())


def save_golden(golden: Golden, folder: Path, root: Path) -> dict:
    """Write .npy files under folder; return the manifest's "golden" section (paths relative to root)."""
    folder.mkdir(parents=True, exist_ok=True)

    def put(name: str, arr: np.ndarray) -> str:
        path = folder / f"{name}.npy"
        np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
        return path.relative_to(root).as_posix()

    cases = []
    for c in golden.cases:
        cases.append({"name": c.name, "graph": c.graph,
                      "inputs": {k: put(f"{c.name}.in.{k}", v) for k, v in c.inputs.items()},
                      "outputs": {k: put(f"{c.name}.out.{k}", v) for k, v in c.outputs.items()}})
    return {"cases": cases,
            "greedy": {"prompt": put("greedy.prompt", golden.prompt), "tokens": put("greedy.tokens", golden.tokens),
                       "step_logits": put("greedy.step_logits", golden.step_logits), "must_match": True}}
