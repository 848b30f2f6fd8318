"""Eager greedy generation: prefill, then one-token decode steps with the cache."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, prompt_ids, max_new_tokens: int, layout: str | None = None):
    """prompt_ids [B, S] (or a list of ints) -> (tokens [B, N] int64, step_logits [B, N, vocab] fp32).

    step_logits[:, i] are the logits that chose tokens[:, i]; layout: the model's default cache layout
    unless given.
    """
    layout = layout or model.cache_spec().layout
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    cache = model.empty_cache(ids.shape[0], layout)
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        logits, cache = model.step(ids, cache, layout)
        last = logits[:, -1]
        ids = last.argmax(dim=-1, keepdim=True)
        tokens.append(ids)
        step_logits.append(last)
    if not tokens:
        return torch.zeros(ids.shape[0], 0, dtype=torch.long), torch.zeros(ids.shape[0], 0, model.config.vocab_size)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)
