"""A DeepSeek-V2/V3 checkpoint read one decoder layer at a time: the eager reference of a model that does not fit in
memory (issue 16's streaming compile, pipeline/layerwise.py).

`LayerStream(path)` checks the whole folder up front as models.load does (every shard's header, names, shapes the
config implies: models/checkpoint.checked_weight_map) without allocating a weight, then builds modules on demand:

    stream.embed()        -> nn.Embedding (model.embed_tokens)
    stream.layer(i)       -> the family's decoder layer i, its weights read from the safetensors shards (fp32;
                             FP8 e4m3 blocks dequantized with their weight_scale_inv, as models.load does)
    stream.head()         -> (model.norm, lm_head)
    stream.step_layer(layer, h, past, layout) -> (h, present): the layer as DeepseekForCausalLM.step runs it

Each module lives only as long as its caller keeps it, so a loop over layers holds one layer's weights at a time.
The module classes are the family's (a DeepseekForCausalLM built on the meta device gives them), so the eager
numbers are those of models.load's model, layer for layer (tests/test_layerwise.py checks it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import _open, checked_weight_map, checkpoint_folder, read_weight
from .decoder import DeepseekForCausalLM, step_rope_mask
from .errors import CheckpointError
from .rope import attention_factor, inv_freq, softmax_scale


class LayerStream:
    def __init__(self, path: str | Path, attention: str = "naive", *, config=None, module=None):
        """config: config.json -> the family's config (default DeepseekConfig.from_json); module: (config, attention)
        -> the family's reference module (default DeepseekForCausalLM), built here on the meta device only."""
        from .config import DeepseekConfig
        self.path = path = checkpoint_folder(path)
        self.config = cfg = (config or DeepseekConfig.from_json)(path / "config.json")
        with torch.device("meta"):
            self._meta = (module or DeepseekForCausalLM)(cfg, attention)
        if not isinstance(self._meta, DeepseekForCausalLM):
            raise CheckpointError(f"{path}: model_type {cfg.model_type!r} is not an MLA decoder (DeepSeek-V2/V3); "
                                  "the layer-by-layer reader takes those only")
        self.available = checked_weight_map(path, cfg, self._meta.state_dict())
        self.attention = attention
        self.rope_inv_freq = inv_freq(cfg)
        self.rope_factor = attention_factor(cfg)
        self.softmax_scale = softmax_scale(cfg)
        self.fp8_names: set[str] = set()

    def is_fp8(self) -> bool:
        """The config declares FP8 e4m3 weights (quantization_config)."""
        return bool(self.config.fp8)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def cache_spec(self, layout: str = "latent"):
        return self._meta.cache_spec(layout)

    def empty_cache(self, batch: int, layout: str = "latent", dtype=torch.float32):
        return self.cache_spec(layout).empty(batch, dtype)

    def _materialize(self, make, prefix: str) -> nn.Module:
        """A fresh module (make() builds it on the meta device), its tensors read from the checkpoint under
        `prefix`."""
        with torch.device("meta"):
            module = make()
        module = module.to_empty(device="cpu").requires_grad_(False)
        names = {n: prefix + n for n in module.state_dict()}
        by_file: dict[str, list[str]] = {}
        for local, full in names.items():
            if full in self.available:
                by_file.setdefault(self.available[full], []).append(local)
        state = module.state_dict()
        with torch.no_grad():
            for fname in sorted(by_file):
                with _open(self.path / fname) as f:
                    for local in by_file[fname]:
                        full = names[local]
                        t, fp8 = read_weight(self.path, f, fname, full, self.available, tuple(state[local].shape))
                        state[local].copy_(t.to(state[local].dtype))
                        if fp8:
                            self.fp8_names.add(full)
                        del t
        for local, full in names.items():  # buffers the checkpoint does not hold (e_score_correction_bias is held)
            if full not in self.available and local in dict(module.named_parameters()):
                raise CheckpointError(f"{self.path}: tensor {full!r} missing")
        return module.eval()

    def embed(self) -> nn.Embedding:
        cfg = self.config
        return self._materialize(lambda: nn.Embedding(cfg.vocab_size, cfg.hidden_size), "model.embed_tokens.")

    def layer(self, i: int) -> nn.Module:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i}: the model has {self.num_layers}")
        cls = type(self._meta.model.layers[i])
        return self._materialize(lambda: cls(self.config, i), f"model.layers.{i}.")

    def head(self) -> tuple[nn.Module, nn.Linear]:
        cfg = self.config
        norm = self._materialize(lambda: type(self._meta.model.norm)(cfg.hidden_size, cfg.rms_norm_eps), "model.norm.")
        if cfg.tie_word_embeddings:  # lm_head.weight is the embedding's
            lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False).requires_grad_(False)
            lm_head.weight = self.embed().weight
        else:
            lm_head = self._materialize(lambda: nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False), "lm_head.")
        return norm, lm_head

    @torch.no_grad()
    def step_layer(self, layer: nn.Module, h: torch.Tensor, past: tuple, layout: str = "latent"
                   ) -> tuple[torch.Tensor, tuple]:
        """One layer of DeepseekForCausalLM.step: h [B, S, hidden] after the layer's `past` -> (h, present)."""
        past_len = self.cache_spec(layout).length([past])
        cos, sin, mask = step_rope_mask(h.shape[1], past_len, self.rope_inv_freq, self.rope_factor)
        return layer(h, cos, sin, mask, self.softmax_scale, past, layout, self.attention == "absorbed")
