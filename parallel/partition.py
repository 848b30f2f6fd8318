"""Expert partitioning (expert parallelism): routing statistics, the partition plan, its memory per rank.

Pure Python + numpy on config shapes (plus, for `routing_stats`, one calibration run of the eager
model). Nothing here reads weights, so `mlamoe plan --model deepseek-v3-671b --ranks 64 --redundant 16`
works from the config-only presets.

The plan (`partition.json`, JSON-able dict, schema below) puts every routed expert of every MoE layer
on at least one of `ranks` devices; attention, the router, the shared experts, the dense layers,
the norms and embeddings/lm_head are replicated on every rank (data-parallel attention).

Algorithm (`plan_partition`), per MoE layer, on the expected load of each expert (tokens routed to it
in a calibration run, `routing_stats`; uniform when there are no statistics):
  1. Redundancy (EPLB, DeepSeek's `replicate_experts`): `redundant` extra replicas are handed out one
     at a time to the expert with the largest load per replica; an expert's tokens are split evenly
     between its replicas. An expert never gets more replicas than there are ranks.
  2. Slot quota: the layer has S = n_routed_experts + redundant expert slots. Every rank holds
     floor(S/ranks) or ceil(S/ranks) of them (the S % ranks ranks holding one more rotate from layer
     to layer), so expert memory per rank differs by at most one expert per layer and, summed over
     layers, by at most one expert in total when the layers rotate evenly.
  3. Longest-processing-time greedy (Graham's LPT): replicas in decreasing load order, each to the
     least-loaded rank that still has a free slot and does not already hold that expert
     (ties: lowest rank index), then a local search that swaps a replica of the most loaded rank
     with a lighter one elsewhere while that lowers the maximum (LPT alone is blind to the slot
     quota: with uniform load it leaves the ranks holding an extra slot overloaded). Deterministic.
  Reported per layer: expected tokens per rank and `imbalance` = max / mean rank load (1.0 is perfect).

`contiguous_plan` is the naive baseline: experts split in contiguous blocks (rank r holds experts
[r*E/R, (r+1)*E/R)), no replicas, the same load and memory accounting.

Memory per rank: (replicated params + routed expert params of the slots the rank holds, replicas
included) * `bytes_per_param`. Default bf16 (2 bytes per parameter) for every weight, whatever the
checkpoint's storage dtype: DeepSeek-V3's fp8 experts would be 1 byte + their 128x128 block scales
(pass bytes_per_param=1 for a rough fp8 figure). Activations, KV cache and runtime buffers are not
counted. The router's gate weight (+ e_score_correction_bias) and the shared experts are counted
as replicated.

Ranks vs experts: a plan needs every rank to hold at least one expert slot of every layer, i.e.
`ranks <= n_routed_experts + redundant`. More ranks than experts is therefore an error without
redundancy and allowed with enough redundant replicas (e.g. 8 experts on 12 ranks with 4 redundant:
4 experts are held twice). It is a `PartitionError` otherwise.

Plan schema (version 1):
  schema_version, algorithm ("lpt" | "contiguous"), model_hash, config_hash, model (shape summary),
  ranks, redundant, load_source ("uniform" | "calibration"), dtype, bytes_per_param,
  layers: [{layer, rank_experts [[expert id, ...] per rank], replicas [count per expert],
            expert_load [expected tokens per expert], rank_load [per rank], imbalance}],
  imbalance {max, mean} over layers, memory {replicated_bytes, expert_bytes (one expert),
  rank_slots [expert slots held per rank, all layers], rank_bytes [per rank], max_rank_bytes,
  mean_rank_bytes}.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from models.config import DeepseekConfig
from models.errors import MlamoeError

SCHEMA_VERSION = 1
GIB = 2**30


class PartitionError(MlamoeError):
    pass


# ---- model identity --------------------------------------------------------------------------------
def config_hash(cfg: DeepseekConfig) -> str:
    """sha256 of the config (same formula as pipeline.compile.config_sha256)."""
    return hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def moe_layers(cfg: DeepseekConfig) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


# ---- parameter accounting (config shapes only) -----------------------------------------------------
def expert_params(cfg: DeepseekConfig) -> int:
    """Parameters of one routed expert: gate, up [moe_inter, hidden] and down [hidden, moe_inter]."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def replicated_params(cfg: DeepseekConfig) -> int:
    """Parameters every rank holds: everything except the routed experts."""
    return cfg.param_count() - len(moe_layers(cfg)) * cfg.n_routed_experts * expert_params(cfg)


# ---- routing statistics ----------------------------------------------------------------------------
def routing_stats(model, token_batches) -> np.ndarray:
    """Tokens routed to each expert, per MoE layer: int64 [n_moe_layers, n_routed_experts].

    Runs the eager model on each batch (token ids [B, S] or [S]; tensors, arrays or lists) with a
    forward hook on every Router; a token counts once for each of its k chosen experts.
    """
    import torch
    from models.moe import Router

    cfg = model.config
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if len(routers) != len(moe_layers(cfg)):
        raise PartitionError(f"routing_stats: found {len(routers)} routers, expected {len(moe_layers(cfg))} MoE layers")
    counts = np.zeros((len(routers), cfg.n_routed_experts), dtype=np.int64)

    def hook(i):
        def f(_mod, _inp, out):
            counts[i] += np.bincount(out[1].reshape(-1).cpu().numpy(), minlength=cfg.n_routed_experts)
        return f

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            for ids in token_batches:
                ids = torch.as_tensor(ids, dtype=torch.long)
                model(ids.unsqueeze(0) if ids.dim() == 1 else ids)
    finally:
        for h in handles:
            h.remove()
    return counts


def save_routing_stats(path, counts: np.ndarray, model_hash: str | None = None) -> Path:
    """routing_stats.json: {"model_hash", "counts": [[tokens per expert] per MoE layer]}."""
    path = Path(path)
    path.write_text(json.dumps({"model_hash": model_hash, "counts": np.asarray(counts).tolist()}, indent=1) + "\n")
    return path


def load_routing_stats(path) -> np.ndarray:
    """A .npy array or a routing_stats.json ({"counts": ...} or a bare nested list)."""
    path = Path(path)
    if not path.is_file():
        raise PartitionError(f"{path}: routing statistics file not found")
    if path.suffix == ".npy":
        return np.load(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PartitionError(f"{path}: not valid JSON ({e})") from None
    return np.asarray(d["counts"] if isinstance(d, dict) else d, dtype=np.float64)


def _layer_loads(cfg: DeepseekConfig, load) -> tuple[np.ndarray, str]:
    n_layers, E = len(moe_layers(cfg)), cfg.n_routed_experts
    if load is None:
        return np.full((n_layers, E), 1.0 / E), "uniform"
    a = np.asarray(load, dtype=np.float64)
    if a.ndim == 1:
        a = np.broadcast_to(a, (n_layers, a.shape[0]))
    if a.shape != (n_layers, E):
        raise PartitionError(f"routing statistics have shape {list(a.shape)}, expected [{n_layers} MoE layers, "
                             f"{E} experts] for this model (statistics from another model?)")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise PartitionError("routing statistics must be finite and non-negative")
    return a, "calibration"


def _check_ranks(cfg: DeepseekConfig, ranks: int, redundant: int) -> None:
    E = cfg.n_routed_experts
    if not isinstance(ranks, (int, np.integer)) or ranks < 1:
        raise PartitionError(f"ranks = {ranks!r}: must be a positive integer")
    if not isinstance(redundant, (int, np.integer)) or redundant < 0:
        raise PartitionError(f"redundant = {redundant!r}: must be a non-negative integer")
    if ranks > E + redundant:
        raise PartitionError(
            f"{ranks} ranks but only {E} routed experts per layer"
            + (f" + {redundant} redundant replicas" if redundant else "")
            + f": every rank must hold at least one expert; use at most {E + redundant} ranks or at least "
              f"{ranks - E} redundant replicas")
    if redundant > E * (ranks - 1):
        raise PartitionError(f"redundant = {redundant}: at most {E * (ranks - 1)} replicas fit on {ranks} ranks "
                             "(an expert is held at most once per rank)")


# ---- planning --------------------------------------------------------------------------------------
def _replicate(load: np.ndarray, redundant: int, ranks: int) -> np.ndarray:
    reps = np.ones(load.shape[0], dtype=np.int64)
    for _ in range(redundant):
        per = np.where(reps < ranks, load / reps, -np.inf)
        reps[int(np.argmax(per))] += 1  # argmax: lowest index among ties
    return reps


def _quota(n_slots: int, ranks: int, layer_pos: int) -> np.ndarray:
    q = np.full(ranks, n_slots // ranks, dtype=np.int64)
    extra = n_slots % ranks
    q[[(layer_pos * extra + j) % ranks for j in range(extra)]] += 1
    return q


def _lpt(load: np.ndarray, reps: np.ndarray, quota: np.ndarray) -> list[list[int]]:
    ranks = quota.shape[0]
    items = [(load[e] / reps[e], e) for e in range(load.shape[0]) for _ in range(reps[e])]
    items.sort(key=lambda t: (-t[0], t[1]))
    rank_load = np.zeros(ranks)
    held: list[list[int]] = [[] for _ in range(ranks)]
    for share, e in items:
        free = [r for r in range(ranks) if len(held[r]) < quota[r]]
        ok = [r for r in free if e not in held[r]] or free
        r = min(ok, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += share
    _repair_duplicates(held)
    _refine(held, load / reps)
    return [sorted(h) for h in held]


def _repair_duplicates(held: list[list[int]]) -> None:
    """LPT's last replicas can land on the only rank with a free slot, which may already hold that
    expert; swap such a copy with an expert of another rank so no rank holds an expert twice."""
    for r, h in enumerate(held):
        for i, e in enumerate(h):
            if h.index(e) == i:
                continue  # first copy on this rank
            for r2, h2 in enumerate(held):
                if r2 == r or e in h2:
                    continue
                b = next((b for b in h2 if b not in h), None)
                if b is not None:
                    h[i], h2[h2.index(b)] = b, e
                    break
            else:
                raise PartitionError(f"cannot place the replicas of expert {e} on distinct ranks")


def _refine(held: list[list[int]], share: np.ndarray, max_iter: int = 1000) -> None:
    """Local search after LPT: swap one replica of the most loaded rank with a lighter replica on
    another rank while that lowers the pair's maximum (slot counts unchanged). Deterministic."""
    for _ in range(max_iter):
        loads = np.array([share[h].sum() if h else 0.0 for h in held])
        top = int(np.argmax(loads))
        best = None  # (new pair max, a, r, b)
        for a in held[top]:
            for r, h in enumerate(held):
                if r == top or a in h:
                    continue
                for b in h:
                    if share[b] >= share[a] or b in held[top]:
                        continue
                    pair_max = max(loads[top] - share[a] + share[b], loads[r] + share[a] - share[b])
                    if pair_max < loads[top] - 1e-12 and (best is None or pair_max < best[0] - 1e-12):
                        best = (pair_max, a, r, b)
        if best is None:
            return
        _, a, r, b = best
        held[top][held[top].index(a)] = b
        held[r][held[r].index(b)] = a


def _layer_entry(layer: int, load: np.ndarray, rank_experts: list[list[int]]) -> dict:
    E = load.shape[0]
    reps = np.zeros(E, dtype=np.int64)
    for h in rank_experts:
        for e in h:
            reps[e] += 1
    share = np.where(reps > 0, load / np.maximum(reps, 1), 0.0)
    rank_load = np.array([sum(share[e] for e in h) for h in rank_experts])
    mean = rank_load.mean()
    return {"layer": layer, "rank_experts": [list(map(int, h)) for h in rank_experts],
            "replicas": reps.tolist(), "expert_load": [float(x) for x in load],
            "rank_load": [float(x) for x in rank_load],
            "imbalance": float(rank_load.max() / mean) if mean > 0 else 1.0}


def _finish(cfg, ranks, redundant, layers, algorithm, load_source, model_hash, bytes_per_param) -> dict:
    slots = np.zeros(ranks, dtype=np.int64)
    for L in layers:
        slots += [len(h) for h in L["rank_experts"]]
    rep_bytes = replicated_params(cfg) * bytes_per_param
    exp_bytes = expert_params(cfg) * bytes_per_param
    rank_bytes = [int(rep_bytes + s * exp_bytes) for s in slots]
    imb = [L["imbalance"] for L in layers]
    chash = config_hash(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "algorithm": algorithm,
        "model_hash": model_hash or chash,
        "config_hash": chash,
        "model": {"model_type": cfg.model_type, "n_routed_experts": cfg.n_routed_experts,
                  "num_experts_per_tok": cfg.num_experts_per_tok, "n_shared_experts": cfg.n_shared_experts,
                  "hidden_size": cfg.hidden_size, "moe_intermediate_size": cfg.moe_intermediate_size,
                  "moe_layers": moe_layers(cfg)},
        "ranks": int(ranks),
        "redundant": int(redundant),
        "load_source": load_source,
        "dtype": {1: "fp8/int8", 2: "bf16", 4: "fp32"}.get(bytes_per_param, f"{bytes_per_param}-byte"),
        "bytes_per_param": bytes_per_param,
        "layers": layers,
        "imbalance": {"max": float(max(imb)) if imb else 1.0, "mean": float(np.mean(imb)) if imb else 1.0},
        "memory": {"replicated_bytes": int(rep_bytes), "expert_bytes": int(exp_bytes),
                   "rank_slots": slots.tolist(), "rank_bytes": rank_bytes,
                   "max_rank_bytes": max(rank_bytes), "mean_rank_bytes": float(np.mean(rank_bytes))},
    }


def plan_partition(cfg: DeepseekConfig, ranks: int, redundant: int = 0, load=None, model_hash: str | None = None,
                   bytes_per_param: int = 2) -> dict:
    """Balanced plan: EPLB replicas of the hottest experts + slot-quota LPT (module docstring).

    load: expected tokens per expert, [n_moe_layers, n_routed_experts] (or [n_routed_experts] for all
    layers), e.g. from `routing_stats`; None means uniform. model_hash: the identity the plan is
    checked against (default: the config hash).
    """
    _check_ranks(cfg, ranks, redundant)
    loads, source = _layer_loads(cfg, load)
    n_slots = cfg.n_routed_experts + redundant
    layers = []
    for pos, layer in enumerate(moe_layers(cfg)):
        reps = _replicate(loads[pos], redundant, ranks)
        held = _lpt(loads[pos], reps, _quota(n_slots, ranks, pos))
        layers.append(_layer_entry(layer, loads[pos], held))
    return _finish(cfg, ranks, redundant, layers, "lpt", source, model_hash, bytes_per_param)


def contiguous_plan(cfg: DeepseekConfig, ranks: int, load=None, model_hash: str | None = None,
                    bytes_per_param: int = 2) -> dict:
    """Baseline: rank r holds a contiguous block of experts (np.array_split order), no replicas."""
    _check_ranks(cfg, ranks, 0)
    loads, source = _layer_loads(cfg, load)
    blocks = [b.tolist() for b in np.array_split(np.arange(cfg.n_routed_experts), ranks)]
    layers = [_layer_entry(layer, loads[pos], blocks) for pos, layer in enumerate(moe_layers(cfg))]
    return _finish(cfg, ranks, 0, layers, "contiguous", source, model_hash, bytes_per_param)


# ---- validation ------------------------------------------------------------------------------------
def validate_plan(plan: dict, cfg: DeepseekConfig, model_hash: str | None = None) -> dict:
    """Check a plan (e.g. a loaded partition.json) against the model it is used with; returns it.

    Raises PartitionError: not a plan, stale (model_hash / config hash mismatch, both hashes named),
    wrong layer set, wrong rank count in a layer, an expert id out of range, an expert on no rank,
    an expert held twice by one rank, a rank holding no expert (more ranks than expert slots).
    """
    if not isinstance(plan, dict) or "layers" not in plan or "ranks" not in plan:
        raise PartitionError("not a partition plan: expected a JSON object with 'ranks' and 'layers'")
    if plan.get("schema_version") != SCHEMA_VERSION:
        raise PartitionError(f"partition plan schema_version {plan.get('schema_version')!r} is not supported "
                             f"(expected {SCHEMA_VERSION}); re-run `mlamoe plan`")
    want_cfg = config_hash(cfg)
    if model_hash is not None and plan.get("model_hash") != model_hash:
        raise PartitionError(f"stale partition plan: it was made for model {plan.get('model_hash')} but this model "
                             f"is {model_hash}; re-run `mlamoe plan` for this model")
    if plan.get("config_hash") != want_cfg:
        raise PartitionError(f"stale partition plan: it was made for config {plan.get('config_hash')} but this "
                             f"model's config is {want_cfg}; re-run `mlamoe plan` for this model")
    ranks, E = plan["ranks"], cfg.n_routed_experts
    if not isinstance(ranks, int) or ranks < 1:
        raise PartitionError(f"partition plan: ranks = {ranks!r} must be a positive integer")
    got_layers = [L.get("layer") for L in plan["layers"]]
    if got_layers != moe_layers(cfg):
        raise PartitionError(f"partition plan covers layers {got_layers}, but the model's MoE layers are "
                             f"{moe_layers(cfg)}")
    for L in plan["layers"]:
        held = L.get("rank_experts")
        if not isinstance(held, list) or len(held) != ranks:
            raise PartitionError(f"partition plan, layer {L['layer']}: rank_experts must list {ranks} ranks, "
                                 f"got {len(held) if isinstance(held, list) else held!r}")
        seen = set()
        for r, h in enumerate(held):
            if not h:
                raise PartitionError(f"partition plan, layer {L['layer']}: rank {r} holds no expert (more ranks "
                                     f"than expert slots: {E} experts + {plan.get('redundant', 0)} redundant)")
            bad = [e for e in h if not isinstance(e, int) or not 0 <= e < E]
            if bad:
                raise PartitionError(f"partition plan, layer {L['layer']}, rank {r}: expert ids {bad} out of range "
                                     f"0..{E - 1}")
            if len(set(h)) != len(h):
                raise PartitionError(f"partition plan, layer {L['layer']}, rank {r}: holds an expert twice ({h})")
            seen.update(h)
        missing = sorted(set(range(E)) - seen)
        if missing:
            raise PartitionError(f"partition plan does not cover every expert: layer {L['layer']} has no rank for "
                                 f"experts {missing}")
    return plan


def save_plan(plan: dict, path) -> Path:
    """Write partition.json (sorted keys, stable bytes)."""
    path = Path(path)
    path.write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return path


def load_plan(path, cfg: DeepseekConfig | None = None, model_hash: str | None = None) -> dict:
    """Read partition.json; validated against `cfg` (and `model_hash`) when given."""
    path = Path(path)
    if not path.is_file():
        raise PartitionError(f"{path}: partition plan not found; create it with `mlamoe plan`")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PartitionError(f"{path}: not valid JSON ({e})") from None
    return validate_plan(plan, cfg, model_hash) if cfg is not None else plan


# ---- CLI -------------------------------------------------------------------------------------------
def _rank_ranges(values: list[str]) -> list[str]:
    """Group consecutive ranks with the same text: ['ranks 0-3: x', ...]."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            who = f"rank {start}" if i - 1 == start else f"ranks {start}-{i - 1}"
            out.append(f"  {who}: {values[start]}")
            start = i
    return out


def format_plan(plan: dict, baseline: dict | None = None) -> str:
    m, mem = plan["model"], plan["memory"]
    lines = [
        f"partition plan ({plan['algorithm']}): {m['n_routed_experts']} routed experts x {len(m['moe_layers'])} MoE "
        f"layers over {plan['ranks']} ranks, {plan['redundant']} redundant replicas per layer "
        f"(load: {plan['load_source']})",
        f"model hash {plan['model_hash'][:16]}...  weights counted as {plan['dtype']} "
        f"({plan['bytes_per_param']} bytes/param; activations and KV cache not counted)",
        f"replicated on every rank (attention, router, shared experts, dense layers, embeddings/lm_head): "
        f"{mem['replicated_bytes'] / GIB:.2f} GiB; one routed expert: {mem['expert_bytes'] / 2**20:.2f} MiB",
        "memory per rank (GiB, expert slots over all layers):",
    ]
    lines += _rank_ranges([f"{b / GIB:.2f} GiB ({s} experts)" for b, s in zip(mem["rank_bytes"], mem["rank_slots"])])
    lines.append(f"max {mem['max_rank_bytes'] / GIB:.2f} GiB, mean {mem['mean_rank_bytes'] / GIB:.2f} GiB per rank")
    lines.append(f"expected load imbalance (max/mean rank load): worst layer {plan['imbalance']['max']:.3f}, "
                 f"mean over layers {plan['imbalance']['mean']:.3f}")
    if baseline is not None:
        lines.append(f"contiguous assignment for comparison: worst layer {baseline['imbalance']['max']:.3f}, "
                     f"mean {baseline['imbalance']['mean']:.3f}")
    return "\n".join(lines)


def plan_command(model_spec, ranks: int, redundant: int = 0, stats_path=None, bytes_per_param: int = 2,
                 model_hash: str | None = None) -> tuple[dict, str]:
    """`mlamoe plan --model M --ranks R --redundant N [--stats F]` -> (partition.json content, text to print).

    Works from the config alone (config-only presets included). Without statistics the load is
    uniform; the contiguous baseline is computed on the same load and shown for comparison.
    """
    import models
    cfg = models.load_config(model_spec)
    load = load_routing_stats(stats_path) if stats_path else None
    plan = plan_partition(cfg, ranks, redundant, load=load, model_hash=model_hash, bytes_per_param=bytes_per_param)
    baseline = contiguous_plan(cfg, ranks, load=load, bytes_per_param=bytes_per_param) if ranks <= cfg.n_routed_experts else None
    return plan, f"model {model_spec}\n" + format_plan(plan, baseline)
