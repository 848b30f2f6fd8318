"""Fixed-shape ("ATC-ready") graphs for the Ascend target, traced from the eager model.

ATC compiles static graphs (or a few `--dynamic_dims` gears of one), so the dynamic-shape graphs of
`pipeline.export` (growing cache, data-dependent MoE loop with NonZero) do not fit. This module
wraps the `models/` submodules (their weights, unchanged) in :class:`StaticCausalLM`, a torch
module whose every shape is fixed at export time, and exports it with `torch.onnx.export` (dynamo,
no dynamic shapes), then converts the graph to opset 18 with onnx's version converter.

One wrapper, two uses (the same IO for both, so graphs chain without host-side reshaping):

    inputs : input_ids   int32 [B, S]      S = 1 for decode, S = bucket length for prefill
             position    int32 [B]         position of input_ids[:, 0] (= tokens already cached)
             past.{i}.{name}  fp32          the family's cache spec (models/cache.py) in its static
                                            layout, the growing axis fixed to the maximum length M
    outputs: logits      fp32 [B, S, vocab]
             present.{i}.{name}  same shapes  = past with rows position .. position+S-1 replaced

Decisions (and why):

- **input_ids / position are int32.** ATC's Cast has no int64 target, and ONNX Gather takes int32
  indices directly, so the ids feed the embedding Gather as they are. No tensor derived from a
  graph input is ever cast to int64. The only int64 tensors left are constant shape operands
  (Reshape/Slice/Split constants, which ATC folds) and TopK's index output (ONNX fixes it to int64);
  the router casts those indices to int32 (an allowed Cast target) before any further use.
- **Attention mask from the position, in the graph.** Query s of row b sits at position
  p = position[b] + s and may attend cache rows t <= p (`key_pos <= p`, an int32 LessOrEqual
  against a constant [M] table). Masked scores are replaced (Where) by -65504 (the fp16 minimum,
  finite, so the same graph is safe when ATC runs it in fp16). Rows past the position may hold
  anything (zeros, padding of a shorter prompt): they get exactly zero weight.
- **Cache written in place with Where, not ScatterND.** ONNX ScatterND takes int64 indices only;
  building them from the int32 position needs a Cast to int64 (forbidden) or an extra int64 input.
  This wrapper builds `write` = the one-hot [B, S, M] matrix `key_pos == position + s` and `covered`
  (rows position .. position+S-1); the family's static step (for MLA models/mla_static.py) selects
  the new rows into the cache with them. Writes past M - 1 are dropped: the caller keeps
  position + S <= M.
- **Prefill in fixed buckets, one graph per bucket.** A prompt shorter than its bucket is padded on
  the right (any token id); its logits are read at column len-1 and the next decode step uses
  position = len, which overwrites the first padded cache row; the others stay masked. Chunked
  prefill is the same graph with position > 0. One graph per bucket rather than `--dynamic_dims`
  gears: the static trace bakes S into reshape constants, and one OM per bucket is what public
  LLM conversions for Ascend ship (REFERENCE.md section 3).
- **RoPE from constant cos/sin tables [M, rope/2]** gathered by position (int32 Gather), so no
  angle is ever computed in fp16 (position * inv_freq loses whole radians in fp16 past ~2K).
- **Attention is the family's static step** (models.family.StaticStep; for MLA the absorbed form in
  models/mla_static.py), its per-layer constants registered here as buffers `{name}_{layer}`.
- **MoE without data-dependent shapes** (REFERENCE.md section 2): written here in torch until the
  static MoE lowering passes (passes/moe_lowering.py) exist; then this can be swapped for them.
  The router is re-expressed with one-hot compares instead of ScatterElements/GatherElements.
    "gather" (decode default): per token, Gather the top-k experts' stacked weights
             [E, inter, hidden] by the router's indices, then batched MatMul; cost ~ k experts/token.
    "dense"  (prefill default): every expert on every token as three stacked MatMuls, combined by a
             [N, E] weight matrix that is zero outside each token's top-k; static and the same sum,
             E/k times the expert FLOPs (the static-capacity form will replace it for large E).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from models.cache import CacheSpec
from models.errors import MlamoeError
from models.family import family_for, family_of
from models.moe import MoE
from models.rope import rope_cos_sin

MASK_VALUE = -65504.0  # fp16 lowest finite value: masked scores, exact zero after softmax
MOE_FORMS = ("gather", "dense")
TARGET_OPSET = 18
INDEX_DTYPE = np.int32


class StaticExportError(MlamoeError):
    pass


@dataclasses.dataclass(frozen=True)
class StaticGraphSpec:
    """One fixed-shape graph: name (decode, prefill_s16, ...), batch B, sequence S, cache M."""

    name: str
    batch: int
    seq: int
    max_cache: int
    moe_form: str

    @property
    def kind(self) -> str:
        return "decode" if self.seq == 1 else "prefill"


def graph_specs(batch: int, max_cache: int, buckets: tuple[int, ...]) -> list[StaticGraphSpec]:
    """decode (S=1, MoE gather form) + one prefill graph per bucket (MoE dense form)."""
    if batch < 1:
        raise StaticExportError(f"batch {batch}: must be >= 1")
    if max_cache < 2:
        raise StaticExportError(f"max_cache {max_cache}: must be >= 2")
    bad = [b for b in buckets if not (isinstance(b, int) and 1 < b <= max_cache)]
    if bad:
        raise StaticExportError(f"prefill buckets {bad}: each must be an integer in 2..max_cache ({max_cache}); "
                                "a bucket longer than the cache cannot be written into it")
    if len(set(buckets)) != len(buckets):
        raise StaticExportError(f"prefill buckets {list(buckets)}: duplicates")
    specs = [StaticGraphSpec("decode", batch, 1, max_cache, "gather")]
    specs += [StaticGraphSpec(f"prefill_s{b}", batch, b, max_cache, "dense") for b in sorted(buckets)]
    return specs


def static_cache_spec(cfg) -> CacheSpec:
    """The cache spec of the family's fixed-shape form (its static step's layout)."""
    family = family_for(cfg.model_type)
    if family.static_step is None:
        why = f": {family.no_static_step}" if family.no_static_step else ""
        raise StaticExportError(f"model family {family.name!r} has no fixed-shape form (Family.static_step), "
                                f"so it has no static graphs for the ascend target{why}")
    return family.cache_spec(cfg, family.static_step.layout)


def input_names(cache: CacheSpec) -> list[str]:
    return ["input_ids", "position"] + cache.input_names()


def output_names(cache: CacheSpec) -> list[str]:
    return ["logits"] + cache.output_names()


# ------------------------------------------------------------------------------------ the wrapper
class AttnSoftmax(nn.Module):
    """softmax(scale * scores, masked) in fp32; masked entries replaced by MASK_VALUE (finite)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, scores, mask):
        scores = torch.where(mask, scores.float() * self.scale, MASK_VALUE)
        return torch.softmax(scores, dim=-1)


class StaticRouter(nn.Module):
    """The DeepSeekMoE gate (models.moe.Router's math) with one-hot compares instead of
    ScatterElements / GatherElements, in fp32. -> weights [N, k] fp32, one-hot [N, k, E] fp32,
    expert ids [N, k] int32 (TopK's int64 indices cast to int32, an allowed ATC Cast target)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("expert_ids", torch.arange(cfg.n_routed_experts, dtype=torch.int32), persistent=False)
        self.register_buffer("group_ids", torch.arange(cfg.n_group, dtype=torch.int32), persistent=False)

    def forward(self, flat, weight, bias):
        cfg = self.cfg
        N = flat.shape[0]
        logits = F.linear(flat.float(), weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if bias is None else scores + bias
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            per = cfg.n_routed_experts // cfg.n_group
            grouped = choice.view(N, cfg.n_group, per)
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            gidx = group_scores.topk(cfg.topk_group, dim=-1).indices.to(torch.int32)  # [N, topk_group]
            keep = (gidx.unsqueeze(-1) == self.group_ids).to(torch.float32).sum(dim=1)  # [N, G] 0/1
            keep = keep.unsqueeze(-1).expand(N, cfg.n_group, per).reshape(N, cfg.n_routed_experts)
            choice = torch.where(keep > 0, choice, float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices.to(torch.int32)  # [N, k]
        onehot = (idx.unsqueeze(-1) == self.expert_ids).to(torch.float32)  # [N, k, E]
        weights = (onehot * scores.unsqueeze(1)).sum(dim=-1)  # = scores.gather(1, idx), exactly
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, onehot, idx


class StaticCausalLM(nn.Module):
    """Fixed-shape decode / prefill-bucket step over a cache of fixed length M (see module docstring)."""

    def __init__(self, model, seq: int, max_cache: int, moe_form: str = "gather"):
        super().__init__()
        if moe_form not in MOE_FORMS:
            raise StaticExportError(f"moe_form {moe_form!r}: expected one of {MOE_FORMS}")
        cfg = model.config
        self.cache = static_cache_spec(cfg)
        self.static_step = family_of(model).static_step
        self.cfg, self.model, self.S, self.M, self.moe_form = cfg, model, seq, max_cache, moe_form
        cos, sin = rope_cos_sin(torch.arange(max_cache), model.rope_inv_freq, model.rope_factor)
        self.register_buffer("rope_cos", cos.contiguous(), persistent=False)  # [M, rope/2]
        self.register_buffer("rope_sin", sin.contiguous(), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_cache, dtype=torch.int32), persistent=False)
        self.register_buffer("seq_offsets", torch.arange(seq, dtype=torch.int32), persistent=False)
        # fp32 islands as named submodules, so their ONNX nodes carry the scope in their names
        # (keep_dtype lists them for ATC's mixed precision): attn_softmax.{i}, router.{i}
        self.attn_softmax = nn.ModuleList(AttnSoftmax(model.softmax_scale) for _ in model.model.layers)
        self.routers = nn.ModuleList(StaticRouter(cfg) for _ in model.model.layers)
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                for name, t in self.static_step.constants(layer.self_attn).items():
                    self.register_buffer(f"{name}_{i}", t, persistent=False)
                if isinstance(layer.mlp, MoE):
                    ex = layer.mlp.experts
                    g = torch.stack([e.gate_proj.weight for e in ex])  # [E, inter, h]
                    u = torch.stack([e.up_proj.weight for e in ex])
                    d = torch.stack([e.down_proj.weight for e in ex])  # [E, h, inter]
                    if moe_form == "gather":  # flattened per expert: [E, inter*h], Gather'd by id
                        self.register_buffer(f"moe_gate_{i}", g.flatten(1).contiguous(), persistent=False)
                        self.register_buffer(f"moe_up_{i}", u.flatten(1).contiguous(), persistent=False)
                        self.register_buffer(f"moe_down_{i}", d.flatten(1).contiguous(), persistent=False)
                    else:
                        E, inter, h = g.shape
                        self.register_buffer(f"moe_gate_up_t_{i}", torch.cat([g, u], 1).reshape(E * 2 * inter, h)
                                             .t().contiguous(), persistent=False)  # [h, E*2*inter]
                        self.register_buffer(f"moe_down_t_{i}", d.transpose(1, 2).contiguous(), persistent=False)

    # ---- MoE ----------------------------------------------------------------------------------
    def _moe(self, i: int, moe: MoE, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, onehot, idx = self.routers[i](flat, moe.gate.weight, moe.gate.e_score_correction_bias)
        if self.moe_form == "gather":  # per token, the k selected experts' weights
            xg = flat.unsqueeze(1).unsqueeze(-1)  # [N, 1, h, 1]
            N, k = idx.shape
            h, inter = self.cfg.hidden_size, self.cfg.moe_intermediate_size

            def pick(w, rows, cols):  # [E, rows*cols] rows of the chosen experts: int32 Gather
                return F.embedding(idx, w).view(N, k, rows, cols)

            g = (pick(getattr(self, f"moe_gate_{i}"), inter, h) @ xg).squeeze(-1)  # [N, k, inter]
            u = (pick(getattr(self, f"moe_up_{i}"), inter, h) @ xg).squeeze(-1)
            a = F.silu(g) * u
            y = (pick(getattr(self, f"moe_down_{i}"), h, inter) @ a.unsqueeze(-1)).squeeze(-1)  # [N, k, h]
            out = (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
        else:  # dense: all experts, combined by a [N, E] matrix zero outside the top-k
            E, inter = self.cfg.n_routed_experts, self.cfg.moe_intermediate_size
            gu = (flat @ getattr(self, f"moe_gate_up_t_{i}")).view(-1, E, 2, inter)  # [N, E, 2, inter]
            a = F.silu(gu[:, :, 0]) * gu[:, :, 1]  # [N, E, inter]
            y = a.transpose(0, 1) @ getattr(self, f"moe_down_t_{i}")  # [E, N, h]
            combine = (onehot * weights.unsqueeze(-1)).sum(dim=1)  # [N, E]
            out = (y * combine.t().unsqueeze(-1).to(y.dtype)).sum(dim=0)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(flat)
        return out.view(shape)

    # ---- the step -----------------------------------------------------------------------------
    def forward(self, input_ids, position, *past):
        qpos = position.unsqueeze(1) + self.seq_offsets  # [B, S] int32
        cos = F.embedding(qpos, self.rope_cos)  # [B, S, rope/2], int32 Gather
        sin = F.embedding(qpos, self.rope_sin)
        keys = self.key_pos.view(1, 1, -1)
        mask = keys <= qpos.unsqueeze(-1)  # [B, S, M]
        write = keys == qpos.unsqueeze(-1)  # [B, S, M] one-hot per query row
        covered = ((keys >= position.view(-1, 1, 1)) & (keys < position.view(-1, 1, 1) + self.S)).transpose(1, 2)
        h = F.embedding(input_ids, self.model.model.embed_tokens.weight)
        present = []
        for i, (layer, layer_past) in enumerate(zip(self.model.model.layers, self.cache.group(past))):
            a, layer_present = self.static_step.attention(
                layer.self_attn, layer.input_layernorm(h), cos, sin, mask, write, covered, layer_past,
                lambda name, i=i: getattr(self, f"{name}_{i}"), self.attn_softmax[i])
            h = h + a
            x = layer.post_attention_layernorm(h)
            h = h + (self._moe(i, layer.mlp, x) if isinstance(layer.mlp, MoE) else layer.mlp(x))
            present += layer_present
        logits = self.model.lm_head(self.model.model.norm(h)).float()
        return (logits, *present)


# ------------------------------------------------------------------------------------ inputs
def zero_inputs(cfg, spec: StaticGraphSpec) -> dict[str, np.ndarray]:
    """Inputs of the right names/dtypes/shapes: position 0, empty (zero) caches."""
    B, S, M = spec.batch, spec.seq, spec.max_cache
    feeds = {"input_ids": np.zeros((B, S), INDEX_DTYPE), "position": np.zeros((B,), INDEX_DTYPE)}
    feeds.update(static_cache_spec(cfg).static_empty(B, M))
    return feeds


def _example_args(cfg, spec: StaticGraphSpec):
    g = torch.Generator().manual_seed(0)
    feeds = zero_inputs(cfg, spec)
    ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq), generator=g, dtype=torch.int32)
    pos = torch.full((spec.batch,), 1 if spec.seq == 1 else 0, dtype=torch.int32)
    past = [torch.randn(v.shape, generator=g) for k, v in feeds.items() if k.startswith("past.")]
    return (ids, pos, *past)


# ------------------------------------------------------------------------------------ export
def convert_opset(model_ir: ir.Model, target: int = TARGET_OPSET) -> ir.Model:
    """onnx's version converter (default domain) -> onnx-ir model; fails with the converter's text."""
    from onnx import version_converter
    proto = ir.to_proto(model_ir)
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == target:
        return model_ir
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as e:  # the converter raises RuntimeError / ConvertError with the op at fault
        raise StaticExportError(f"onnx version converter {current} -> {target} failed: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    onnx.checker.check_model(converted)
    return ir.from_proto(converted)


def name_nodes_by_scope(model_ir: ir.Model) -> None:
    """Prefix each node's name with the torch module it came from ("layers.1.router.1/topk"...),
    from the exporter's name-scope metadata, so names survive later passes and read well in ATC's
    logs, the keep_dtype list and msit's per-op comparison."""
    import ast
    for node in model_ir.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            path = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        module = ".".join(p for p in path[:-1] if p)
        if module.startswith("model.model."):
            module = module[len("model."):]
        elif module.startswith("model."):
            module = module[len("model."):]
        if module and not (node.name or "").startswith(module + "/"):
            node.name = f"{module}/{node.name}"


FP32_ISLANDS = {
    "softmax": ("attn_softmax.",),
    "norm": ("layernorm/", "model.norm/"),
    "router": ("routers.",),
}
"""Name fragments of the nodes ATC must keep in fp32 under mixed precision (--keep_dtype)."""


def fp32_island_nodes(model_ir: ir.Model) -> dict[str, list[str]]:
    """{island kind: [node names]} for the attention softmax, every RMSNorm and the MoE router."""
    out: dict[str, list[str]] = {k: [] for k in FP32_ISLANDS}
    for node in model_ir.graph:
        name = node.name or ""
        for kind, frags in FP32_ISLANDS.items():
            if any(f in name for f in frags):
                out[kind].append(name)
                break
    return out


def export_static_graph(model, spec: StaticGraphSpec, opset: int = TARGET_OPSET,
                        verbose: bool = False) -> ir.Model:
    """Trace one fixed-shape graph (opset 20 from the exporter), fold it, convert it to `opset`."""
    from passes.cleanup import cleanup
    from pipeline.export import finish, trace
    cfg = model.config
    wrapper = StaticCausalLM(model, spec.seq, spec.max_cache, spec.moe_form).eval()
    args = _example_args(cfg, spec)
    program = trace(wrapper, args, f"the static {spec.name} graph", StaticExportError, verbose,
                    input_names=input_names(wrapper.cache), output_names=output_names(wrapper.cache))
    m = program.model
    name_nodes_by_scope(m)
    m = cleanup(m)
    m = finish(convert_opset(m, opset), spec.name)
    m.doc_string = (f"mlamoe ascend static graph {spec.name}: batch {spec.batch}, seq {spec.seq}, "
                    f"max_cache {spec.max_cache}, moe {spec.moe_form}")
    return m


def export_static_graphs(model, batch: int = 1, max_cache: int = 256,
                         buckets: tuple[int, ...] = (16, 64), opset: int = TARGET_OPSET) -> dict[str, tuple[StaticGraphSpec, ir.Model]]:
    """decode + one prefill graph per bucket: {name: (spec, model)}."""
    return {s.name: (s, export_static_graph(model, s, opset)) for s in graph_specs(batch, max_cache, tuple(buckets))}


def save_static_graph(model_ir: ir.Model, path: Path) -> Path:
    """Save with all weights inline (the static graphs of the presets are far below 2 GB; larger
    ones go to `<name>.onnx.data` like pipeline.export.save_graph, which ATC reads from beside it)."""
    from pipeline.export import save_graph
    save_graph(model_ir, Path(path))
    return Path(path)


# ------------------------------------------------------------------------------------ running
class StaticRunner:
    """Runs the static graphs on ORT (CPU) like a device would: prefill a (right-padded) prompt in
    the smallest bucket that holds it, then decode one token at a time, caches kept as [B, M, .]."""

    def __init__(self, sessions: dict, specs: dict[str, StaticGraphSpec], cfg, float_dtype=np.float32):
        self.sessions, self.specs, self.cfg, self.float_dtype = sessions, specs, cfg, float_dtype
        self.decode_spec = specs["decode"]
        self.buckets = sorted((s for s in specs.values() if s.kind == "prefill"), key=lambda s: s.seq)

    def empty_cache(self) -> dict[str, np.ndarray]:
        feeds = zero_inputs(self.cfg, self.decode_spec)
        return {k: v.astype(self.float_dtype) for k, v in feeds.items() if k.startswith("past.")}

    def _run(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        sess = self.sessions[name]
        feeds = {"input_ids": ids.astype(INDEX_DTYPE), "position": position.astype(INDEX_DTYPE), **cache}
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, outs))
        present = {k.replace("present.", "past.", 1): v for k, v in res.items() if k.startswith("present.")}
        return res["logits"], present

    def prefill(self, prompt: np.ndarray, cache: dict | None = None, start: int = 0):
        """prompt [B, L] -> logits [B, L, V] (padding dropped), cache with rows start..start+L-1."""
        B, L = prompt.shape
        fitting = [s for s in self.buckets if s.seq >= L]
        if not fitting:
            raise StaticExportError(f"prompt length {L} exceeds the largest prefill bucket "
                                    f"({self.buckets[-1].seq if self.buckets else 0})")
        spec = fitting[0]
        if start + spec.seq > spec.max_cache:
            raise StaticExportError(f"prefill at position {start} with bucket {spec.seq} passes the cache "
                                    f"length {spec.max_cache}")
        ids = np.zeros((B, spec.seq), INDEX_DTYPE)
        ids[:, :L] = prompt
        cache = self.empty_cache() if cache is None else cache
        logits, cache = self._run(spec.name, ids, np.full((B,), start, INDEX_DTYPE), cache)
        return logits[:, :L], cache

    def decode(self, token: np.ndarray, position: int, cache: dict):
        B = token.shape[0]
        if position >= self.decode_spec.max_cache:
            raise StaticExportError(f"decode position {position} is past the cache length {self.decode_spec.max_cache}")
        return self._run("decode", token.reshape(B, 1), np.full((B,), position, INDEX_DTYPE), cache)

    def generate(self, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy: -> tokens [B, n] int64, step_logits [B, n, V] fp32 (as models.greedy_generate)."""
        logits, cache = self.prefill(prompt)
        pos = prompt.shape[1]
        tokens, steps = [], []
        last = logits[:, -1].astype(np.float32)
        for i in range(n):
            tok = last.argmax(-1)
            tokens.append(tok)
            steps.append(last)
            if i == n - 1:
                break
            logits, cache = self.decode(tok, pos, cache)
            last = logits[:, -1].astype(np.float32)
            pos += 1
        return np.stack(tokens, 1).astype(np.int64), np.stack(steps, 1)


def ort_sessions(paths: dict[str, Path], threads: int = 1) -> dict:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
