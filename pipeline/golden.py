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


@torch.no_grad()
def choice_margins(model, prompt: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """How near each greedy step's discrete choices were to going the other way, in the eager fp32 model on the
    trajectory prompt [1, L] + tokens [1, N]: {"routing": [N, MoE layers], "selection": [N, indexer layers]}, each
    the smallest margin (pipeline.parity.route's for a router: k-th minus (k+1)-th choice score, groups included; for
    DeepSeek-V3.2's lightning indexer: the k-th minus (k+1)-th index score among the visible keys) at the position whose
    logits choose that step's token, L-1+i (the prompt's earlier positions reach it only through the cache, as earlier
    steps do). One causal forward over the whole sequence
    makes each position's choices as cached decoding makes them (per token for routers; per query over the keys up to
    it for the indexer). A family with neither (V4's routers and indexer are other modules) gets empty arrays.
    `mlamoe verify` on the GPU calls a greedy divergence that follows such a near tie a note, not a failure
    (runtime/cuda_runtime.py verify_golden)."""
    from models.indexer import LightningIndexer
    from models.moe import Router as GateModule
    from .parity import Router, route

    seq = torch.as_tensor(np.concatenate([prompt, tokens[:, :-1]], 1) if tokens.shape[1] else prompt)
    L, N = prompt.shape[1], tokens.shape[1]
    gates = [m for m in model.modules() if isinstance(m, GateModule)]
    indexers = [m for m in model.modules() if isinstance(m, LightningIndexer)]
    seen: dict[str, list[np.ndarray]] = {"routing": [], "selection": []}

    def on_gate(mod, args, _out):
        bias = None if mod.e_score_correction_bias is None else mod.e_score_correction_bias.double().numpy()
        logits = torch.nn.functional.linear(args[0].float(), mod.weight.float()).double().numpy()
        seen["routing"].append(route(Router.of(mod.cfg, bias), logits)[1])  # per token, in sequence order

    def scores_of(ix):
        plain = ix.scores

        def wrapped(*a, **kw):
            sc = plain(*a, **kw)  # [B, S, T], causal -inf included
            k = min(ix.topk, sc.shape[-1])
            srt = -np.sort(-sc[0].double().numpy(), -1)
            with np.errstate(invalid="ignore"):  # -inf - -inf where fewer than k + 1 keys are visible
                m = srt[:, k - 1] - srt[:, k] if sc.shape[-1] > k else np.full(sc.shape[1], np.inf)
            seen["selection"].append(np.where(np.isfinite(m), m, np.inf))
            return sc
        return wrapped

    hooks = [g.register_forward_hook(on_gate) for g in gates]
    for ix in indexers:
        ix.scores = scores_of(ix)
    try:
        layout = family_of(model).cache_layouts[0]
        model.step(seq, model.empty_cache(1, layout), layout)
    finally:
        for h in hooks:
            h.remove()
        for ix in indexers:
            del ix.scores
    out = {}
    for kind, per_layer in seen.items():
        if not per_layer:
            out[kind] = np.zeros((N, 0))
            continue
        m = np.stack([np.asarray(x, np.float64).reshape(-1)[:L + N - 1] for x in per_layer], 1)  # [positions, layers]
        out[kind] = m[L - 1:L - 1 + N]
    return out


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


def save_choice_margins(margins: dict[str, np.ndarray], folder: Path, root: Path) -> dict[str, str]:
    """Write choice_margins' arrays as folder/greedy.choice_margins.{kind}.npy; -> {kind: path relative to root}."""
    out = {}
    for kind, a in margins.items():
        path = folder / f"greedy.choice_margins.{kind}.npy"
        np.save(path, np.ascontiguousarray(a, np.float64), allow_pickle=False)
        out[kind] = path.relative_to(root).as_posix()
    return out
