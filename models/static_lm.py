"""The family's fixed-shape step as one torch module (StaticCausalLM): every shape fixed at export time, the
cache preallocated at a length M and this step's rows written in place. Target-agnostic: the Ascend target's
ATC-ready graphs (targets/ascend) and the ort-cuda target's CUDA-graph decode gears (targets/ort_cuda/gears.py) both
trace it, through pipeline/static_export.py (torch -> ONNX, opset conversion, an ORT runner).
It lives in models/ beside the family's static attention step (models/mla_static.py, models.family.StaticStep):
torch only, no ONNX, so any target may use it without importing another target.

ATC compiles static graphs (or a few `--dynamic_dims` gears of one) and a CUDA graph replays fixed shapes and
addresses, so the dynamic-shape graphs of `pipeline.export` (growing cache, data-dependent MoE loop with NonZero)
fit neither. This module wraps the `models/` submodules (their weights, unchanged) in :class:`StaticCausalLM`, a torch
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

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheSpec
from .errors import MlamoeError
from .family import family_for, family_of
from .moe import MoE
from .rope import rope_cos_sin

MASK_VALUE = -65504.0  # fp16 lowest finite value: masked scores, exact zero after softmax
MOE_FORMS = ("gather", "dense")


class StaticExportError(MlamoeError):
    pass

def static_cache_spec(cfg) -> CacheSpec:
    """The cache spec of the family's fixed-shape form (its static step's layout)."""
    family = family_for(cfg.model_type)
    if family.static_step is None:
        why = f": {family.no_static_step}" if family.no_static_step else ""
        raise StaticExportError(f"model family {family.name!r} has no fixed-shape form (Family.static_step), "
                                f"so it has no static graphs (ascend, ort-cuda decode gears){why}")
    return family.cache_spec(cfg, family.static_step.layout)



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
                if self.static_step.modules is not None:
                    for name, module in self.static_step.modules(layer.self_attn).items():
                        self.add_module(f"{name}_{i}", module)
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
