"""Latent-KV fusion: rewrite MLA attention from the naive form into the absorbed form on the ONNX graph.

The exported (naive) graph re-expands the whole cached latent through kv_b_proj at every step:

    c_all  = Concat(past c_kv, new c_kv)                  [B, T, r]        (the cache, r = kv_lora_rank)
    kv     = c_all @ W^T  -> Reshape [B, T, H, nope+v] -> Transpose -> Split -> k_nope, v   [B, H, T, .]
    s      = q_nope @ k_nope^T + q_pe @ k_pe^T             [B, H, S, T]     (k_pe: ONE shared rope head)
    p      = Softmax(s * scale + mask)                     fp32
    o      = p @ v  -> Transpose -> Reshape [B, S, H*v] -> o_proj

so decode costs T * r * H * (nope+v) multiply-adds per layer just to rebuild K and V. The absorbed
form (REFERENCE.md, MLA) folds W_UK into the query and W_UV behind the weighted sum:

    q_lat = q_nope @ W_UK                 W_UK [H, nope, r]  (precomputed initializer)
    s     = q_lat @ c_all^T + q_pe @ k_pe^T                  (same scale, same mask, fp32 softmax)
    o_lat = p @ c_all                     [B, H, S, r]
    o     = o_lat @ W_UV                  W_UV [H, r, v]     (precomputed initializer) -> same o_proj path

The cache IO (present c_kv / k_pe) is untouched: still kv_lora_rank + rope values per token per layer.

How a block is found. Candidates are the *cache expansions*: MatMul/Gemm nodes that multiply a
constant 2-D weight with a tensor computed from a graph input by data movement only (Concat of the
past cache with the new rows, Reshape, ...). From each candidate the matcher walks forward through
the computation (reshape/transpose/split into k_nope and v, the q_nope scores, the shared rope-key
scores, scale, mask, softmax, the weighted sum of v, the o_proj path), checking every op type,
attribute, constant and static dimension against the dimensions it derives (H and nope+v from the
reshape, nope and v from the split, r from the weight, rope from the rope scores). Node and value
names are never used to match; they only label the report. Anything unexpected skips the candidate
with the reason, and a skipped candidate is left exactly as it was.

Why graph walking and not an onnxscript rewriter rule: the rewriter matches backwards from a root and
reports nothing for a candidate whose structure differs (an op inserted after the softmax simply
does not match), while the pass must explain every cache expansion it leaves in place. The forward
walk from the expansion gives that reason at the exact step that fails.

Two rewrite forms (`LatentKVFusionPass(form=...)`):
  "matmul":    plain MatMul/Softmax; the batched score and weighted-sum MatMuls run with the heads
               flattened into the rows ([B, H*S, r] @ [B, r, T]) so the cache is read once per step,
               not once per head. The original scale/mask/Softmax nodes are kept as they were.
  "attention": ONNX opset-23 `Attention` with one KV head: Q = [q_lat, q_pe], K = [c_kv, k_pe],
               V = c_kv (a view of the same cache tensor, not a second cache), attn_mask = the
               graph's mask, scale = the graph's scale, softmax_precision = FLOAT. Raises the graph's
               default-domain opset to 23 (opsets 21-23 only add types to the ops these graphs use).
Sparse attention (DeepSeek-V3.2, form "topk-gather", whatever `form` says): when a block's mask is the lightning
indexer's top-k selection -- Unsqueeze(Where(ScatterElements(false, ids, true), causal, -inf)) with ids the
indices output of a TopK -- the block becomes absorbed attention over the selected rows only: GatherND (batch_dims
1) of c_all and k_pe_all by the ids -> [B, S, k, .], scores q_lat . rows + q_pe . k_pe_rows, the causal mask
gathered at the ids, fp32 Softmax over k, o_lat = p @ rows, @ W_UV. Decode then costs k rows per layer besides
the indexer's own scan of its T keys; the full-length mask and the kv_b_proj expansion over T rows go away.
Why the pass and not an eager absorbed-gather form in models/: the decode graph is the prefill trace specialised
(pipeline/export.py), so an eager gather form would also replace the prefill graph's masked naive form, which is
the faster one at S = T (as for V3); the pass rewrites decode only (graph_forms), matching by structure as for V3.
The indexer itself stays as plain ONNX ops (MatMul, Relu, MatMul by the head weights, Add of the causal mask,
TopK). Checked in ORT 1.32's registered schemas and kernels: com.microsoft.SparseAttentionIndexer exists but its
policies are "qsa" (mean-pooled blocks of compress_ratio tokens, RMSNorm keys) and "csa" (V4's compressed
entries), not V3.2's per-token LayerNorm keys weighted by weights_proj; it and DynamicSparseAttention (attention
by selected_indices) have no CPU kernel in 1.32 (get_all_opkernel_def lists only SparseAttention, the block-sparse
Phi-3 op, for CPU). The ids TopK is models/indexer.py tie_exact_top_ids's last one (distinct values, ids in
ascending key order, the set independent of TopK's tie order); the gathered form attends over the set: order-free.
"matmul" is the fastest decode form on ORT CPU and the default; prefill of a fresh prompt (past = 0)
is faster left naive, see PREFILL_FUSION; graph_forms() / fuse_graphs() give that choice per graph
(figures: docs/benchmarks.md, benchmarks/cpu_small_latent-kv.json). Postcondition (`ensures`): no
cache expansion remains except the ones reported skipped; `expansions_of_cache(model)` lists them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from .graph_utils import const_array as _const, consumers as _consumers

FORMS = ("matmul", "attention")
# the fastest decode form measured on ORT CPU (figures: docs/benchmarks.md)
DEFAULT_FORM = "matmul"
# Whether to fuse the prefill graph as well: no, naive prefill is faster from a few hundred prompt tokens on
# (the absorbed form does 3x the multiply-adds at S = T on `small`); figures in docs/benchmarks.md.
PREFILL_FUSION = False

ATTENTION_OPSET = 23

# A block whose mask is a top-k selection (DeepSeek-V3.2's lightning indexer: Where(ScatterElements(ids from
# TopK)) over all T keys) is rewritten to attend over the gathered rows only, whatever `form` says.
GATHER_FORM = "topk-gather"
GATHER_NOTE = ("mask is a TopK selection (sparse attention): absorbed attention over the k gathered latent rows "
               "(GatherND of c_kv and k_pe by the TopK ids), the full-length mask dropped")

# Ops that only move or reshape data: a MatMul on a tensor reached from a graph input through these
# alone is a projection of the input itself (here: of the cached latent).
_DATA_MOVEMENT = frozenset({"Concat", "Reshape", "Flatten", "Transpose", "Unsqueeze", "Squeeze",
                            "Identity", "Cast", "Slice", "Expand"})


class _Skip(Exception):
    """A candidate does not match; the message is the reason for the report."""


# ---- small graph helpers -----------------------------------------------------------------------



def _producer(value: ir.Value | None, op_type: str | None = None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if op_type is not None and node.op_type != op_type:
        return None
    return node




def _sole_consumer(value: ir.Value, what: str) -> ir.Node:
    users = _consumers(value)
    if value.is_graph_output():
        raise _Skip(f"{what} is a graph output")
    if len(users) != 1:
        raise _Skip(f"{what} has {len(users)} consumers, expected 1")
    return users[0]


def _dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    p = _attr(node, "perm")
    return None if p is None else tuple(int(x) for x in p)


def _label(value: ir.Value | None) -> str | None:
    """A human name for a weight: the checkpoint name it was folded from, else its own name."""
    if value is None:
        return None
    folded = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from")
    if folded:
        return folded.strip("[]'\" ")
    return value.name


def _from_graph_input(value: ir.Value) -> ir.Value | None:
    """The graph input `value` is computed from by data movement alone (first found), else None."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            return v
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _DATA_MOVEMENT:
            continue
        stack.extend(node.inputs[:1] if node.op_type != "Concat" else node.inputs)
    return None


@dataclasses.dataclass
class _Weight:
    array: np.ndarray        # [out_features, in_features] = [H*(nope+v), r]
    value: ir.Value          # the stored constant (for the label)


def _projection_weight(node: ir.Node) -> tuple[ir.Value, _Weight] | None:
    """(data operand, weight [out, in]) of a MatMul/Gemm by a constant 2-D weight, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    a, b = node.inputs[0], node.inputs[1]
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None
        w = _const(b)
        if w is None or w.ndim != 2:
            return None
        w = w * np.asarray(_attr(node, "alpha", 1.0), dtype=w.dtype)
        return a, _Weight(w if _attr(node, "transB", 0) else w.T, b)
    w = _const(b)
    if w is not None:
        return (a, _Weight(w.T, b)) if w.ndim == 2 else None
    t = _producer(b, "Transpose")
    if t is not None and _perm(t) in (None, (1, 0)):
        w = _const(t.inputs[0])
        if w is not None and w.ndim == 2:
            return a, _Weight(w, t.inputs[0])
    return None


def _expansion_candidates(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value, _Weight, ir.Value]]:
    """(node, data operand, weight, cache graph input) for each projection of a cached input."""
    out = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or not node.inputs or node.inputs[0] is None:
            continue
        cache = _from_graph_input(node.inputs[0])  # before touching weights (they may be external data)
        if cache is None:
            continue
        pw = _projection_weight(node)
        if pw is not None:
            out.append((node, pw[0], pw[1], cache))
    return out


def expansions_of_cache(model: ir.Model) -> list[str]:
    """One line per MatMul/Gemm that expands a cached input through a constant weight.

    A cache expansion is a MatMul/Gemm whose one operand is a constant 2-D weight (possibly behind a
    Transpose, or Gemm's transB) and whose other operand comes from a graph input by data movement
    only (Concat with the new rows, Reshape, Transpose, ...): kv_b_proj applied to the cached latent.
    Empty after a complete latent-KV fusion.
    """
    return [f"{node.op_type} {node.name!r}: {cache.name} [{', '.join(str(d) for d in (cache.shape or []))}] "
            f"x weight {_label(w.value)} {list(w.array.shape)}"
            for node, _, w, cache in _expansion_candidates(model.graph)]


# ---- matching ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Block:
    expansion: ir.Node
    cache: ir.Value          # the graph input (past c_kv)
    c_all: ir.Value          # [B, T, r] the latent the expansion reads
    weight: _Weight
    H: int
    r: int
    nope: int
    v: int
    rope: int
    q_nope: ir.Value
    scores_nope: ir.Value    # q_nope @ k_nope^T; replaced by q_lat @ c_all^T
    rope_scores: ir.Value
    q_pe: ir.Value
    k_pe_all: ir.Value
    scale: float
    scale_first: bool        # scale applied before the mask add (always true for these exports)
    mask: ir.Value | None
    softmax: ir.Node
    probs_users: int
    attn_out: ir.Value       # p @ v; replaced by the absorbed o
    o_proj: ir.Value
    topk: "_TopKMask | None" = None  # the mask is a top-k selection (DeepSeek-V3.2's indexer): gather form


@dataclasses.dataclass
class _TopKMask:
    """mask = Unsqueeze(Where(ScatterElements(false, ids, true, axis=-1), causal, -inf), 1): attention restricted
    per query to the TopK `ids` [B, S, k] (DeepSeek Sparse Attention's indexer), causal [S, T] or [B, S, T]."""
    ids: ir.Value
    causal: ir.Value


def _topk_mask(mask: ir.Value | None) -> _TopKMask | None:
    """The top-k selection a mask is built from, when it is one (by structure, see _TopKMask), else None."""
    un = _producer(mask, "Unsqueeze")
    axes = _const(un.inputs[1]) if un is not None and len(un.inputs) > 1 else None
    if un is None or axes is None or axes.reshape(-1).tolist() != [1]:
        return None
    wh = _producer(un.inputs[0], "Where")
    if wh is None:
        return None
    cond, causal, neg = wh.inputs
    n = _const(neg)
    if n is None or n.size != 1 or not np.isneginf(n.reshape(())):
        return None
    sc = _producer(cond, "ScatterElements")
    if sc is None or _attr(sc, "reduction", "none") != "none" or _attr(sc, "axis", 0) not in (-1, 2):
        return None
    upd = _producer(sc.inputs[2])
    upd_const = _const(sc.inputs[2])
    if upd_const is not None:
        if not np.all(upd_const):
            return None
    elif upd is None or upd.op_type != "ConstantOfShape" or not np.all(_attr(upd, "value").numpy()):
        return None
    base = _const(sc.inputs[0])
    if base is not None and np.any(base):
        return None
    ids = sc.inputs[1]
    tk = _producer(ids, "TopK")
    if tk is None or ids is not tk.outputs[1] or _attr(tk, "axis", -1) not in (-1, 2) or not _attr(tk, "largest", 1):
        return None
    return _TopKMask(ids, causal)


def _head_split(rs: ir.Node) -> tuple[int, int]:
    """(H, nope+v) from a Reshape to [batch, tokens, H, nope+v]: read from its target (a constant, or
    a Concat whose last two pieces are constants) and from the recorded output shape; both must agree."""
    found = []
    target = _const(rs.inputs[1])
    if target is not None:
        if target.size == 4 and target[-1] > 0 and target[-2] > 0:
            found.append((int(target[-2]), int(target[-1])))
    else:
        cat = _producer(rs.inputs[1], "Concat")
        tail = [_const(x) for x in cat.inputs[-2:]] if cat is not None and len(cat.inputs) >= 2 else []
        if len(tail) == 2 and all(t is not None and t.size == 1 and t.reshape(()) > 0 for t in tail):
            found.append((int(tail[0].reshape(())), int(tail[1].reshape(()))))
    out_dims = _dims(rs.outputs[0])
    if out_dims is not None and len(out_dims) == 4 and out_dims[2] and out_dims[3]:
        found.append((out_dims[2], out_dims[3]))
    if not found:
        raise _Skip("cannot read the head split of the kv_b_proj output (its Reshape target is not "
                    "[batch, tokens, H, nope+v] with static H and nope+v)")
    if len(set(found)) > 1:
        raise _Skip(f"the kv_b_proj head Reshape's target {list(found[0])} disagrees with its recorded "
                    f"output shape {list(found[1])}")
    return found[0]


def _match(node: ir.Node, data: ir.Value, weight: _Weight, cache: ir.Value) -> _Block:
    W = weight.array
    n_out, r = W.shape
    # kv_b_proj on the latent: the data operand is [B, T, r] (MatMul) or its [B*T, r] flattening (Gemm).
    c_all = data
    if node.op_type == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and _attr(node, "beta", 1.0) != 0:
            b = _const(bias)
            if b is None or np.any(b != 0):
                raise _Skip("kv_b_proj (Gemm) has a bias; the absorbed form has no place for it")
        flat = data.producer()
        if flat is None or flat.op_type not in ("Reshape", "Flatten"):
            raise _Skip("Gemm on the cache does not take a flattened [B*T, r] latent")
        c_all = flat.inputs[0]
    c_dims = _dims(c_all)
    if c_dims is None or len(c_dims) != 3:
        raise _Skip(f"the expanded latent is not a rank-3 [batch, tokens, r] tensor (shape {c_all.shape})")
    if c_dims[2] not in (None, r):
        raise _Skip(f"the latent has width {c_dims[2]}, the weight contracts {r}")
    kv = node.outputs[0]

    # Reshape to [B, T, H, nope+v].
    rs = _sole_consumer(kv, "the kv_b_proj output")
    if rs.op_type != "Reshape":
        raise _Skip(f"kv_b_proj output feeds {rs.op_type}, expected the Reshape into heads")
    H, D = _head_split(rs)
    # [B, H, T, nope+v]
    tr = _sole_consumer(rs.outputs[0], "the per-head kv")
    if tr.op_type != "Transpose" or _perm(tr) != (0, 2, 1, 3):
        raise _Skip(f"per-head kv feeds {tr.op_type} {_perm(tr) if tr.op_type == 'Transpose' else ''}, "
                    "expected Transpose perm [0, 2, 1, 3]")
    sp = _sole_consumer(tr.outputs[0], "the transposed kv")
    if sp.op_type != "Split" or len(sp.outputs) != 2 or _attr(sp, "axis", 0) not in (3, -1):
        raise _Skip(f"transposed kv feeds {sp.op_type}, expected a Split into k_nope and v on the last axis")
    sizes = _const(sp.inputs[1]) if len(sp.inputs) > 1 and sp.inputs[1] is not None else _attr(sp, "split")
    if sizes is None:
        if D % 2:
            raise _Skip("Split of kv has no sizes and an odd width")
        sizes = [D // 2, D // 2]
    nope, v = (int(s) for s in np.asarray(sizes).reshape(-1))
    if nope + v != D:
        raise _Skip(f"Split sizes {nope}+{v} do not add up to the per-head width {D}")
    if n_out != H * (nope + v):
        raise _Skip(f"kv_b_proj weight has {n_out} rows, not H*(nope+v)={H}*({nope}+{v})={H * (nope + v)}")
    k_nope, v_val = sp.outputs

    # scores against q_nope: q_nope @ Transpose(k_nope, [0, 1, 3, 2])
    kt = _sole_consumer(k_nope, "k_nope")
    if kt.op_type != "Transpose" or _perm(kt) != (0, 1, 3, 2):
        raise _Skip(f"k_nope feeds {kt.op_type}, expected Transpose perm [0, 1, 3, 2]")
    qk = _sole_consumer(kt.outputs[0], "k_nope^T")
    if qk.op_type != "MatMul" or qk.inputs[1] is not kt.outputs[0]:
        raise _Skip(f"k_nope^T feeds {qk.op_type}, expected MatMul(q_nope, k_nope^T)")
    q_nope = qk.inputs[0]
    qd = _dims(q_nope)
    if qd is None or len(qd) != 4 or qd[1] != H or qd[3] not in (None, nope):
        raise _Skip(f"q_nope has shape {q_nope.shape}, expected [batch, {H}, seq, {nope}]")
    scores_nope = qk.outputs[0]

    # + the shared rope-key scores: q_pe @ Transpose(Unsqueeze(k_pe_all, 1), [0, 1, 3, 2])
    add = _sole_consumer(scores_nope, "the q_nope scores")
    if add.op_type != "Add":
        raise _Skip(f"the q_nope scores feed {add.op_type}, expected Add with the rope scores")
    rope_scores = add.inputs[1] if add.inputs[0] is scores_nope else add.inputs[0]
    rmm = _producer(rope_scores, "MatMul")
    if rmm is None:
        raise _Skip("the scores are not added to a MatMul of q_pe with the shared rope key")
    q_pe = rmm.inputs[0]
    rt = _producer(rmm.inputs[1], "Transpose")
    ru = _producer(rt.inputs[0], "Unsqueeze") if rt is not None and _perm(rt) == (0, 1, 3, 2) else None
    axes = _const(ru.inputs[1]) if ru is not None and len(ru.inputs) > 1 else None
    if ru is None or axes is None or axes.reshape(-1).tolist() != [1]:
        raise _Skip("the rope scores' key is not one shared head (Transpose(Unsqueeze(k_pe, 1)))")
    k_pe_all = ru.inputs[0]
    kd, pd = _dims(k_pe_all), _dims(q_pe)
    if kd is None or len(kd) != 3 or kd[2] is None:
        raise _Skip(f"the shared rope key has shape {k_pe_all.shape}, expected [batch, tokens, rope]")
    rope = kd[2]
    if pd is None or len(pd) != 4 or pd[1] != H or pd[3] != rope:
        raise _Skip(f"q_pe has shape {q_pe.shape}, expected [batch, {H}, seq, {rope}]")

    # scale, mask, softmax
    cur, scale, mask, scale_first = add.outputs[0], None, None, True
    for _ in range(2):
        nxt = _sole_consumer(cur, "the attention scores")
        other = nxt.inputs[1] if nxt.inputs[0] is cur else nxt.inputs[0]
        c = _const(other) if nxt.op_type in ("Mul", "Div") else None
        if nxt.op_type in ("Mul", "Div") and scale is None:
            if c is None or c.size != 1:
                raise _Skip(f"the scores are scaled by a non-scalar or non-constant {nxt.op_type}")
            scale = float(c.reshape(())) if nxt.op_type == "Mul" else 1.0 / float(c.reshape(()))
            if nxt.op_type == "Div" and nxt.inputs[0] is not cur:
                raise _Skip("the scores are a divisor, not scaled")
        elif nxt.op_type == "Add" and mask is None:
            mask, scale_first = other, scale is not None
        else:
            break
        cur = nxt.outputs[0]
    sm = _sole_consumer(cur, "the scaled, masked scores")
    if sm.op_type != "Softmax" or _attr(sm, "axis", -1) not in (-1, 3):
        raise _Skip(f"the scaled, masked scores feed {sm.op_type}, expected Softmax over the keys")
    if sm.inputs[0].dtype not in (None, ir.DataType.FLOAT):
        raise _Skip(f"softmax runs in {sm.inputs[0].dtype}, not fp32")
    probs = sm.outputs[0]

    # weighted sum of v: MatMul(probs, v) straight off the softmax
    pv = _sole_consumer(v_val, "v")
    if pv.op_type != "MatMul" or pv.inputs[1] is not v_val:
        raise _Skip(f"v feeds {pv.op_type}, expected MatMul(probs, v)")
    if pv.inputs[0] is not probs:
        src = pv.inputs[0].producer()
        raise _Skip(f"the weighted sum of v does not take the softmax output directly "
                    f"({src.op_type if src is not None else 'an input'} {src.name if src is not None else ''!s} "
                    "sits between the softmax and the V MatMul)")
    attn_out = pv.outputs[0]

    # ... feeding o_proj: Transpose [0, 2, 1, 3] -> Reshape [B, S, H*v] -> MatMul/Gemm by [H*v, hidden]
    t2 = _sole_consumer(attn_out, "the attention output")
    if t2.op_type != "Transpose" or _perm(t2) != (0, 2, 1, 3):
        raise _Skip(f"the attention output feeds {t2.op_type}, expected Transpose perm [0, 2, 1, 3] into o_proj")
    r2 = _sole_consumer(t2.outputs[0], "the transposed attention output")
    if r2.op_type not in ("Reshape", "Flatten"):
        raise _Skip(f"the transposed attention output feeds {r2.op_type}, expected the Reshape to [B, S, H*v]")
    op_node = _sole_consumer(r2.outputs[0], "the merged heads")
    pw = _projection_weight(op_node)
    if pw is None or pw[0] is not r2.outputs[0] or pw[1].array.shape[1] != H * v:
        raise _Skip(f"the merged heads feed {op_node.op_type}, expected o_proj with a [hidden, {H * v}] weight")
    return _Block(node, cache, c_all, weight, H, r, nope, v, rope, q_nope, scores_nope, rope_scores, q_pe,
                  k_pe_all, 1.0 if scale is None else scale, scale_first, mask, sm, len(_consumers(probs)),
                  attn_out, pw[1].value, _topk_mask(mask))


# ---- rewriting ---------------------------------------------------------------------------------

class _Names:
    def __init__(self, graph: ir.Graph):
        self.consts: dict = {}
        self.used = {v.name for v in graph.initializers.values()} | {i.name for i in graph.inputs}
        for n in graph:
            self.used.update(o.name for o in n.outputs if o.name)
            if n.name:
                self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


class _Builder:
    """Appends nodes before an anchor node, with unique names."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, names: _Names, prefix: str):
        self.graph, self.anchor, self.names, self.prefix = graph, anchor, names, prefix

    def init(self, array: np.ndarray, what: str) -> ir.Value:
        small = array.size <= 8  # shape constants: one initializer for all blocks
        key = (what, array.dtype.str, array.shape, array.tobytes()) if small else None
        if key in self.names.consts:
            return self.names.consts[key]
        name = self.names(f"latent_kv.{what}" if small else f"{self.prefix}.{what}")
        # np.ascontiguousarray makes a 0-d array 1-d: reshape back, so that the tensor's shape is the declared one
        # (a scalar scale declared [] but stored [1] fails ONNX shape inference, which the fp16 conversion runs)
        data = np.ascontiguousarray(array).reshape(array.shape)
        value = ir.Value(name=name, shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(data, name=name))
        self.graph.register_initializer(value)
        if small:
            self.names.consts[key] = value
        return value

    def op(self, op_type: str, inputs, what: str, num_outputs: int = 1, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs or None, num_outputs=num_outputs,
                       name=self.names(f"{self.prefix}/{what}"))
        for i, out in enumerate(node.outputs):
            out.name = self.names(f"{self.prefix}.{what}" + (f".{i}" if i else ""))
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]


def _rewrite_topk(graph: ir.Graph, b: _Block, names: _Names, prefix: str, w_uk: np.ndarray,
                  w_uv: np.ndarray) -> None:
    """The absorbed form over the k selected latent rows per query (the "gather" form):

        rows   = GatherND(c_all, ids, batch_dims=1)  [B, S, k, r]     (k_pe rows likewise [B, S, k, rope])
        s      = (q_lat @ rows^T + q_pe @ k_pe_rows^T) * scale + causal[ids]   [B, S, H, k]
        o_lat  = Softmax(s) @ rows                  [B, S, H, r] -> [B, H, S, r] @ W_UV -> [B, H, S, v]

    The cost per query is k rows, not T; the full-length mask (ScatterElements/Where) and the kv_b_proj
    expansion over T rows become unused and are removed."""
    bo = _Builder(graph, b.attn_out.producer(), names, prefix)
    ids = b.topk.ids
    ids_rows = bo.op("Reshape", [ids, bo.init(np.array([0, -1, 1], np.int64), "rows_1")], "ids_rows")
    ids_shape = bo.op("Shape", [ids], "ids_shape")

    def gather(cache: ir.Value, width: int, what: str) -> ir.Value:
        rows = bo.op("GatherND", [cache, ids_rows], f"{what}_rows", batch_dims=1)  # [B, S*k, width]
        shape = bo.op("Concat", [ids_shape, bo.init(np.array([width], np.int64), f"width_{width}")],
                      f"{what}_rows_shape", axis=0)
        return bo.op("Reshape", [rows, shape], f"{what}_sel")  # [B, S, k, width]

    c_sel, pe_sel = gather(b.c_all, b.r, "c_kv"), gather(b.k_pe_all, b.rope, "k_pe")
    q_lat = bo.op("Transpose", [bo.op("MatMul", [b.q_nope, bo.init(w_uk, "w_uk")], "q_lat")], "q_lat_t",
                  perm=[0, 2, 1, 3])  # [B, S, H, r]
    q_pe = bo.op("Transpose", [b.q_pe], "q_pe_t", perm=[0, 2, 1, 3])  # [B, S, H, rope]
    scores = bo.op("Add", [bo.op("MatMul", [q_lat, bo.op("Transpose", [c_sel], "c_sel_t", perm=[0, 1, 3, 2])],
                                 "scores_latent"),
                           bo.op("MatMul", [q_pe, bo.op("Transpose", [pe_sel], "k_pe_sel_t", perm=[0, 1, 3, 2])],
                                 "scores_rope")], "scores")  # [B, S, H, k]
    # the causal mask at the selected keys: -inf where a short query selected keys it may not see
    full = bo.op("Concat", [bo.op("Shape", [ids], "bs", start=0, end=2),
                            bo.op("Shape", [b.topk.causal], "keys", start=-1)], "mask_shape", axis=0)
    causal = bo.op("Expand", [b.topk.causal, full], "causal")
    mask = bo.op("Unsqueeze", [bo.op("GatherElements", [causal, ids], "mask_sel", axis=-1),
                               bo.init(np.array([2], np.int64), "head_axis_2")], "mask")  # [B, S, 1, k]
    scale = bo.init(np.array(b.scale, np.float32), "scale")
    if b.scale_first:
        logits = bo.op("Add", [bo.op("Mul", [scores, scale], "scaled"), mask], "masked")
    else:
        logits = bo.op("Mul", [bo.op("Add", [scores, mask], "masked"), scale], "scaled")
    probs = bo.op("Softmax", [logits], "probs", axis=-1)  # fp32, over the k selected keys
    o_lat = bo.op("Transpose", [bo.op("MatMul", [probs, c_sel], "o_lat_sel")], "o_lat", perm=[0, 2, 1, 3])
    o = bo.op("MatMul", [o_lat, bo.init(w_uv, "w_uv")], "o")  # [B, H, S, v]
    o.dtype, o.shape = ir.DataType.FLOAT, b.attn_out.shape
    b.attn_out.replace_all_uses_with(o)


def _rewrite(graph: ir.Graph, b: _Block, form: str, names: _Names, prefix: str) -> str:
    W3 = b.weight.array.reshape(b.H, b.nope + b.v, b.r)
    w_uk = np.ascontiguousarray(W3[:, :b.nope, :])                   # [H, nope, r]
    w_uv = np.ascontiguousarray(W3[:, b.nope:, :].transpose(0, 2, 1))  # [H, r, v]
    f32 = ir.DataType.FLOAT
    if b.topk is not None:
        if b.probs_users == 1:
            _rewrite_topk(graph, b, names, prefix, w_uk, w_uv)
            return GATHER_NOTE
        b.topk = None
        note = "top-k mask recognised but the probabilities have other users; absorbed over all T rows instead"
        return note + "; " + (_rewrite(graph, b, form, names, prefix) or "")
    if form == "attention" and (not b.scale_first or b.probs_users != 1):
        form, note = "matmul", ("attention form needs scale before mask and the probabilities used only by "
                                "the weighted sum; used the matmul form")
    else:
        note = ""
    # Everything is computed right before the weighted sum of v: all inputs are defined there.
    anchor = b.attn_out.producer()
    if form == "matmul":
        # Scores, heads flattened into rows so each cache tensor is read once per step:
        #   [B, H*S, r] @ [B, r, T] + [B, H*S, rope] @ [B, rope, T] -> Reshape [B, H, S, T]
        # replacing the q_nope + rope score Add (its scale/mask/Softmax consumers stay as they were).
        add = next(iter(_consumers(b.scores_nope)))
        bs = _Builder(graph, add, names, prefix)
        q_lat = bs.op("MatMul", [b.q_nope, bs.init(w_uk, "w_uk")], "q_lat")
        q_flat = bs.op("Reshape", [q_lat, bs.init(np.array([0, -1, b.r], np.int64), "rows_r")], "q_lat_rows")
        s_flat = bs.op("MatMul", [q_flat, bs.op("Transpose", [b.c_all], "c_kv_t", perm=[0, 2, 1])], "scores_rows")
        pe_flat = bs.op("Reshape", [b.q_pe, bs.init(np.array([0, -1, b.rope], np.int64), "rows_rope")],
                        "q_pe_rows")
        r_flat = bs.op("MatMul", [pe_flat, bs.op("Transpose", [b.k_pe_all], "k_pe_t", perm=[0, 2, 1])],
                       "rope_scores_rows")
        shape4 = bs.op("Concat", [bs.op("Shape", [b.q_pe], "bhs", start=0, end=3),
                                  bs.op("Shape", [b.k_pe_all], "t", start=1, end=2)], "scores_shape", axis=0)
        scores = bs.op("Reshape", [bs.op("Add", [s_flat, r_flat], "scores_sum"), shape4], "scores")
        scores.dtype, scores.shape = f32, add.outputs[0].shape
        add.outputs[0].replace_all_uses_with(scores)
        bo = _Builder(graph, anchor, names, prefix)
        rows_t = bo.op("Concat", [bo.op("Shape", [b.c_all], "batch", start=0, end=1),
                                  bo.init(np.array([-1], np.int64), "minus1"),
                                  bo.op("Shape", [b.c_all], "tokens", start=1, end=2)], "rows_t", axis=0)
        p_flat = bo.op("Reshape", [b.softmax.outputs[0], rows_t], "probs_rows")
        o_flat = bo.op("MatMul", [p_flat, b.c_all], "o_lat_rows")
        o_lat = bo.op("Reshape", [o_flat, bo.op("Shape", [q_lat], "q_lat_shape")], "o_lat")
    else:
        bo = _Builder(graph, anchor, names, prefix)
        q_lat = bo.op("MatMul", [b.q_nope, bo.init(w_uk, "w_uk")], "q_lat")
        q = bo.op("Concat", [q_lat, b.q_pe], "q", axis=-1)
        one = bo.init(np.array([1], np.int64), "head_axis")
        k = bo.op("Unsqueeze", [bo.op("Concat", [b.c_all, b.k_pe_all], "k_latent", axis=-1), one], "k")
        v = bo.op("Unsqueeze", [b.c_all, one], "v")
        inputs = [q, k, v] + ([b.mask] if b.mask is not None else [])
        o_lat = bo.op("Attention", inputs, "attention", scale=float(b.scale),
                      softmax_precision=int(ir.DataType.FLOAT))
    o = bo.op("MatMul", [o_lat, bo.init(w_uv, "w_uv")], "o")
    o.dtype, o.shape = f32, b.attn_out.shape
    b.attn_out.replace_all_uses_with(o)
    return note


@dataclasses.dataclass
class LatentKVFusionResult(ir.passes.PassResult):
    """PassResult plus the counts: candidates found, rewritten, skipped."""
    found: int = 0
    rewritten: int = 0
    skipped: int = 0
    form: str = DEFAULT_FORM


class LatentKVFusionPass(ir.passes.InPlacePass):
    """Rewrite every naive MLA block (kv_b_proj expansion of the latent cache) into the absorbed form.

    form: "matmul" (default, fastest measured on ORT CPU) or "attention" (ONNX opset-23 Attention,
    1 KV head). After a call, `self.report` lists every candidate: labels (cache input, kv_b_proj and
    o_proj weight names, expansion node), dims, status "rewritten" | "skipped" and the reason.
    """

    def __init__(self, form: str = DEFAULT_FORM):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"latent-KV fusion form {form!r}: expected one of {FORMS}")
        self.form = form
        self.report: list[dict] = []
        self._skipped_nodes: set[int] = set()

    def requires(self, model: ir.Model) -> None:
        """The rewrite emits Shape(start, end) and Unsqueeze/Split with tensor inputs: opset >= 15."""
        version = model.graph.opset_imports.get("", model.opset_imports.get("", 0))
        if version < 15:
            raise ir.passes.PreconditionError(
                f"latent-KV fusion needs a default-domain opset >= 15, the graph has {version}")

    def call(self, model: ir.Model) -> LatentKVFusionResult:
        graph = model.graph
        self.report, self._skipped_nodes = [], set()
        names = _Names(graph)
        blocks: list[tuple[dict, _Block]] = []
        for node, data, weight, cache in _expansion_candidates(graph):
            entry = {"cache": cache.name, "kv_b_proj": _label(weight.value), "node": node.name,
                     "weight_shape": list(weight.array.shape)}
            try:
                block = _match(node, data, weight, cache)
            except _Skip as e:
                entry.update(status="skipped", reason=str(e))
                self._skipped_nodes.add(id(node))
                self.report.append(entry)
                continue
            entry.update(o_proj=_label(block.o_proj),
                         dims={"H": block.H, "kv_lora_rank": block.r, "nope": block.nope, "v": block.v,
                               "rope": block.rope}, scale=block.scale)
            blocks.append((entry, block))
            self.report.append(entry)
        # Two candidates may not share ops (they cannot in a valid match: every step has one consumer).
        for i, (entry, block) in enumerate(blocks):
            note = _rewrite(graph, block, self.form, names, f"latent_kv.{i}")
            gathered = note == GATHER_NOTE
            entry.update(status="rewritten", form=GATHER_FORM if gathered else "matmul" if note else self.form)
            if note:
                entry["note"] = note
        rewritten = len(blocks)
        if rewritten:
            if self.form == "attention" and any(e.get("form") == "attention" for e, _ in blocks):
                _require_opset(model, ATTENTION_OPSET)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.TopologicalSortPass()(model)
        self._rewrote = rewritten > 0
        return LatentKVFusionResult(model, modified=rewritten > 0, found=len(self.report),
                                    rewritten=rewritten, skipped=len(self.report) - rewritten, form=self.form)

    def ensures(self, model: ir.Model) -> None:
        """No cache expansion remains except the ones reported as skipped."""
        left = [(node, cache) for node, _, _, cache in _expansion_candidates(model.graph)
                if id(node) not in self._skipped_nodes]
        if left:
            raise ir.passes.PostconditionError(
                "latent-KV fusion left kv_b_proj expansions of the cache in the graph: "
                + "; ".join(f"{n.op_type} {n.name!r} on {c.name}" for n, c in left))

    @property
    def counts(self) -> dict[str, int]:
        rewritten = sum(e["status"] == "rewritten" for e in self.report)
        return {"found": len(self.report), "rewritten": rewritten, "skipped": len(self.report) - rewritten}


def _require_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset to `version` (opsets 21-23 only widen types of existing ops)."""
    for owner in (model, model.graph):
        if owner.opset_imports.get("", 0) < version:
            owner.opset_imports[""] = version


def fuse_latent_kv(model: ir.Model, form: str = DEFAULT_FORM) -> tuple[ir.Model, list[dict]]:
    """Convenience: run the pass in place, return (model, report)."""
    p = LatentKVFusionPass(form)
    p(model)
    return model, p.report


def graph_forms(prefill: bool = PREFILL_FUSION, form: str = DEFAULT_FORM) -> dict[str, str | None]:
    """The measured per-graph choice: {"decode": form, "prefill": form or None (leave it naive)}."""
    return {"decode": form, "prefill": form if prefill else None}


def fuse_graphs(graphs: dict[str, ir.Model], forms: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Run the pass on each graph whose form is not None (default: graph_forms()), in place.

    Returns {graph name: {"form", "counts", "report"}} ({"form": None} for graphs left naive), for the
    stage's manifest entry.
    """
    forms = graph_forms() if forms is None else forms
    out: dict[str, dict] = {}
    for name, model in graphs.items():
        form = forms.get(name)
        if form is None:
            out[name] = {"form": None, "counts": None, "report": []}
            continue
        p = LatentKVFusionPass(form)
        p(model)
        out[name] = {"form": form, "counts": p.counts, "report": p.report}
    return out
