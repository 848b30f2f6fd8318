"""DeepSeek-V4 checkpoints as transformers saves them, unquantized: load and save.

transformers 5.24's save_pretrained does NOT write DeepseekV4ForCausalLM's state-dict names: it applies its
conversion mapping backwards and writes DeepSeek's leaf names under the model prefix (model.layers.N.attn.wq_a,
.attn.attn_sink, .attn.indexer.compressor.ape, .ffn.experts.E.w1/w2/w3, .hc_attn_fn, head.weight, ...).
`saved_to_module_names` undoes that (the renames of transformers' conversion_mapping.py "deepseek_v4", the
per-expert w1/w3 stacked into gate_up_proj [E, 2I, H], w2 into down_proj [E, H, I]); names already in the
module's form pass through, so either spelling loads. DeepSeek's released checkpoints (no "model." prefix,
FP8 / FP4 weights) are models/v4_checkpoint.py's. Safetensors only (models/checkpoint.py's scan refuses pickle).
The whole state is read into memory before the experts are stacked: meant for the tiny / small models this
format is used for here, not for the real ones.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .checkpoint import CheckpointSource, _check_file_sizes, _open, _scan
from .errors import CheckpointError
from .v4 import DeepseekV4ForCausalLM
from .v4_config import DeepseekV4Config
from .v4_rope import inv_freq

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# transformers' conversion_mapping.py "deepseek_v4" renames, in its order, applied inside model.layers.N.
_LAYER_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"), (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"), (r"\.hc_ffn_base", ".ffn_hc.base"), (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."), (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."))]
_TOP_RENAMES = {"head.weight": "lm_head.weight", "embed.weight": "model.embed_tokens.weight",
                "model.embed.weight": "model.embed_tokens.weight", "hc_head_fn": "model.hc_head.hc_fn",
                "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w[123])\.weight$")


def saved_to_module_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name as transformers' save_pretrained writes it: tensor} -> {DeepseekV4ForCausalLM state-dict name: tensor}."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in tensors.items():
        name = _TOP_RENAMES.get(name, name)
        if _LAYER_RE.match(name):
            for pattern, repl in _LAYER_RENAMES:
                name = pattern.sub(repl, name)
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        if set(parts) != {"w1", "w2", "w3"} or len({tuple(sorted(v)) for v in parts.values()}) != 1:
            raise CheckpointError(f"{prefix}: the per-expert w1 / w2 / w3 tensors are incomplete")
        ids = sorted(parts["w1"])
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([parts["w1"][e], parts["w3"][e]], 0) for e in ids])
        out[prefix + ".down_proj"] = torch.stack([parts["w2"][e] for e in ids])
    return out
_IGNORED_RE = re.compile(r"(rotary_emb\..*inv_freq$|(^|\.)mtp\.)")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def empty_model(cfg: DeepseekV4Config, attention: str = "naive") -> DeepseekV4ForCausalLM:
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, attention)
    model = model.to_empty(device="cpu").requires_grad_(False)
    model.freqs = {k: inv_freq(cfg, k) for k in ("main", "compress")}  # built on meta above
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(path: str | os.PathLike, attention: str = "naive") -> DeepseekV4ForCausalLM:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint folder needs config.json "
                              "beside its safetensors files")
    cfg = DeepseekV4Config.from_json(path / "config.json")
    weight_map = _scan(path)
    _check_file_sizes(path, set(weight_map.values()))

    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        with _open(path / fname) as f:
            for name in f.keys():
                if weight_map[name] != fname or _IGNORED_RE.search(name):
                    continue
                try:
                    tensors[name] = f.get_tensor(name)
                except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
                    raise CheckpointError(f"{path / fname}: tensor {name!r} cannot be read ({e}); the file is "
                                          "corrupt: copy or re-save it") from None
    quantized = (torch.float8_e4m3fn, torch.int8, torch.uint8)
    if cfg.quantization_config or any(n.endswith("_scale_inv") or t.dtype in quantized for n, t in tensors.items()):
        raise CheckpointError(f"{path}: holds quantized (FP8 / FP4) weights; this loader reads unquantized "
                              "transformers-format DeepSeek-V4 checkpoints (DeepSeek's own: models/v4_checkpoint.py)")
    tensors = saved_to_module_names(tensors)
    tensors = {k: v for k, v in tensors.items()
               if not ((m := _LAYER_RE.match(k)) and int(m.group(1)) >= cfg.num_hidden_layers)}
    model = empty_model(cfg, attention)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}; the "
                              "checkpoint does not match its config.json")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}; the "
                              "checkpoint does not match its config.json (layer_types, n_routed_experts?)")
    with torch.no_grad():
        for name, target in expected.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the config implies "
                                      f"{list(target.shape)}; config.json and the weights do not match")
            integer = t.dtype in (torch.int64, torch.int32)
            if (target.dtype == torch.long) != integer or (not integer and t.dtype not in FLOAT_DTYPES):
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected "
                                      f"{'an integer table' if target.dtype == torch.long else 'fp32 / bf16 / fp16'}")
            target.copy_(t.to(target.dtype))
    model.checkpoint = CheckpointSource(path, dict(weight_map), ())
    return model.eval()


def save_checkpoint(model: DeepseekV4ForCausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """config.json + model.safetensors in transformers' names (router, tid2eid, sinks, biases kept as they are)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty; choose a new folder")
    tensors = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().contiguous()
        tensors[name] = t if t.dtype == torch.long or ".mlp.gate." in name or t.dim() < 2 else t.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.config.to_json(tmp / "config.json")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
