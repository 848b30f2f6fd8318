"""PyTorch's own fp16 on the same inputs: the independent reference parity.compare_fp16 judges the
ort-cuda fp16 graphs against (each error limit widened to FP16_REFERENCE_FACTOR x this run's error
vs eager fp32; see BUDGETS["target-ort-cuda-fp16"]).

The reference is `torch.autocast(float16)` over the eager model with every MoE router gate run
outside autocast: autocast would otherwise cast `F.linear(x.float(), weight.float())` to fp16, while
the graphs (and the model's intent) keep the router in fp32; softmax and the RMSNorm statistics are
fp32 under autocast already. The lightning indexer (DeepSeek-V3.2, models/indexer.py) runs outside autocast
too, on its inputs cast to fp32 (the graphs' topk-selection island, targets/ort_cuda/graphs.py). Works on CPU (compile) and CUDA (benchmarks), the model's own device.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from models.family import family_of
from models.indexer import LightningIndexer
from models.moe import Router

from passes.routing_probes import gate_name

NOTE = ("PyTorch autocast fp16 of the same model on the same inputs (router gate and lightning indexer fp32, as in "
        "the graphs), vs eager fp32")


def _device_type(model) -> str:
    return next(model.parameters()).device.type


@contextlib.contextmanager
def autocast_fp16(model, gate_logits: list | None = None):
    """torch.autocast(float16) on the model's device, the routers' gate projections kept fp32. gate_logits:
    appended with each router call's gate logits (fp32 [N, E], in call order: MoE layer order for one step)."""
    dev = _device_type(model)
    routers = [m for m in model.modules() if isinstance(m, Router)]

    def fp32(r, forward):
        def run(x, *args, **kwargs):
            with torch.autocast(dev, enabled=False):
                if gate_logits is not None:
                    gate_logits.append(torch.nn.functional.linear(x.float(), r.weight.float()))
                return forward(x, *args, **kwargs)
        return run

    def fp32_module(forward):
        def run(*args):
            with torch.autocast(dev, enabled=False):
                return forward(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        return run

    indexers = [m for m in model.modules() if isinstance(m, LightningIndexer)]
    for r in routers:
        r.forward = fp32(r, r.forward)
    for m in indexers:
        m.forward = fp32_module(m.forward)
    try:
        with torch.autocast(dev, dtype=torch.float16):
            yield
    finally:
        for m in routers + indexers:
            del m.forward  # back to the class's method


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@torch.no_grad()
def case_outputs(model, inputs: dict[str, np.ndarray], layout: str | None = None) -> dict[str, np.ndarray]:
    """The fp16 reference's outputs (logits, present.*, and each MoE layer's gate logits as routing.{i}.gate_logits,
    shaped like the graphs' [batch * seq, E]) for one golden case's inputs (input_ids, past.*)."""
    dev = next(model.parameters()).device
    layout = layout or family_of(model).cache_layouts[0]
    spec = model.cache_spec(layout)
    cache = [tuple(torch.from_numpy(np.asarray(a)).to(dev) for a in layer) for layer in spec.unflatten(inputs)]
    ids = torch.from_numpy(np.asarray(inputs["input_ids"])).to(dev)
    gates: list = []
    with autocast_fp16(model, gates):
        logits, present = model.step(ids, cache, layout)
    out = {"logits": _np(logits), **{gate_name(i): _np(g) for i, g in enumerate(gates)}}
    out.update(spec.flatten([tuple(_np(t) for t in layer) for layer in present], "present"))
    return out


@torch.no_grad()
def forced_step_logits(model, prompt, tokens, layout: str | None = None) -> np.ndarray:
    """[B, N, V]: the fp16 reference's next-token logits along the given tokens (step 0 after the
    prompt, step t after prompt + tokens[:, :t]): what it would have chosen from, on the same inputs."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=dev)
    if ids.ndim == 1:
        ids = ids[None]
    toks = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=dev).reshape(ids.shape[0], -1)
    layout = layout or family_of(model).cache_layouts[0]
    cache = [tuple(t.to(dev) for t in layer) for layer in model.empty_cache(ids.shape[0], layout)]
    steps = []
    with autocast_fp16(model):
        for t in range(toks.shape[1]):
            logits, cache = model.step(ids, cache, layout)
            steps.append(_np(logits[:, -1]))
            ids = toks[:, t:t + 1]
    return np.stack(steps, 1) if steps else np.zeros((ids.shape[0], 0, model.config.vocab_size), np.float32)
