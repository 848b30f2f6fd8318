"""`mlamoe bench`: prefill tokens/s and decode ms/token of a compiled package against eager PyTorch,
measured in one run with the same thread count, plus cache bytes per token for both cache layouts.

Numbers are medians of repeated runs after warm-up; decode is timed on a synthetic cache of the
requested length (the cost of a decode step depends on the cache's length, not its values).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import models

from pipeline.compile import compile_package
from pipeline.io_spec import cache_spec
from runtime.ort_runtime import PackageRuntime


def _median_ms(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def synthetic_cache(cfg, length: int, batch: int = 1, seed: int = 0, layout: str = "latent") -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    spec = models.family_for(cfg.model_type).cache_spec(cfg, layout)
    return [tuple(torch.randn(s, generator=g) for s in spec.symbolic_shapes(batch, length))
            for _ in range(spec.num_layers)]


def bench_package(package: Path, model, threads: int, cache_lengths=(128, 1024, 4096), prompt_len: int = 128,
                  repeat: int = 10) -> dict:
    cfg = model.config
    torch.set_num_threads(threads)
    rt = PackageRuntime(package, threads=threads)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    empty_np = rt.empty_cache(1)
    empty_t = model.empty_cache(1)
    res = {"threads": threads, "prompt_len": prompt_len, "prefill": {}, "decode_ms": {}}
    with torch.no_grad():
        ort_ms = _median_ms(lambda: rt.run("prefill", ids.numpy(), empty_np), max(3, repeat // 3))
        eager_ms = _median_ms(lambda: model.step(ids, empty_t), max(3, repeat // 3))
        res["prefill"] = {"package_tokens_per_s": prompt_len / ort_ms * 1e3, "eager_tokens_per_s": prompt_len / eager_ms * 1e3}
        tok = torch.tensor([[7]])
        for L in cache_lengths:
            cache = synthetic_cache(cfg, L)
            feeds = model.cache_spec().flatten(cache)
            ort_d = _median_ms(lambda: rt.run("decode", tok.numpy(), feeds), repeat)
            eager_d = _median_ms(lambda: model.step(tok, cache), repeat)
            res["decode_ms"][str(L)] = {"package": ort_d, "eager": eager_d, "eager_over_package": eager_d / ort_d}
    latent = rt.manifest["io"]["cache"]  # what the package declares (its IO spec)
    expanded = cache_spec(cfg, "expanded")
    res["cache_bytes_per_token"] = {"latent": latent["bytes_per_token"], "expanded": expanded["bytes_per_token"],
                                    "latent_per_layer": latent["bytes_per_token_per_layer"],
                                    "latent_over_expanded": latent["bytes_per_token"] / expanded["bytes_per_token"]}
    return res


V4_PRESETS = ("deepseek-v4-flash", "deepseek-v4-pro")
TABLE_CONTEXTS = (2**17, 2**20)  # 128K and 1M tokens


def _layer_type_names(spec_cfg, manifest: dict) -> list[str]:
    first = {k: manifest["layer_kind_of"].index(k) for k in set(manifest["layer_kind_of"])}
    return [spec_cfg.layer_types[first[k["kind"]]] for k in manifest["layer_kinds"]]


def v4_cache_rows(cfg, dtype_bytes: int = 2, contexts=TABLE_CONTEXTS) -> dict:
    """One V4 config's cache from its spec's manifest form (models/v4_cache.py to_manifest()): values a token
    adds per layer type in the long run (compressed(m) rows count 1/m), the bounded state (window W-1 rows,
    pending at most m-1 rows, the fixed overlap tensors) and totals at each context, re-priced at dtype_bytes
    per value (the manifest's own bytes are in its dtype, float32). `exact` counts each tensor's rows at T by
    its length rule (pending T % m, compressed T // m), the manifest total is growth * T + bounded at most."""
    spec = models.family_for(cfg.model_type).cache_spec(cfg)
    man = spec.to_manifest()
    itemsize = np.dtype(man["dtype"]).itemsize
    counts = [man["layer_kind_of"].count(k["kind"]) for k in man["layer_kinds"]]
    kinds = {}
    for t, k, n in zip(_layer_type_names(cfg, man), man["layer_kinds"], counts):
        kinds[t] = {"layers": n, "tensors": [x["name"] for x in k["per_layer"]],
                    "values_per_token": k["values_per_token"], "bytes_per_token": k["values_per_token"] * dtype_bytes,
                    "bounded_values": k["bounded_bytes_per_batch_row"] / itemsize,
                    "bounded_bytes": k["bounded_bytes_per_batch_row"] / itemsize * dtype_bytes}
    per_token = man["bytes_per_token"] / itemsize * dtype_bytes
    bounded = man["bounded_bytes_per_batch_row"] / itemsize * dtype_bytes
    exact = {str(T): dtype_bytes * sum(t.values_per_token() * (1 if t.rule == "fixed" else t.rows_for(T))
                                       for layer in spec.layers for t in layer) for T in contexts}
    return {"num_layers": man["num_layers"], "layer_types": kinds, "bytes_per_token": per_token,
            "bounded_bytes": bounded, "manifest_dtype": man["dtype"],
            "bytes_at": {str(T): per_token * T + bounded for T in contexts}, "exact_bytes_at": exact}


def cache_table(cfg, dtype_bytes: int = 2, context: int = 2**20, v4_presets=V4_PRESETS,
                contexts=TABLE_CONTEXTS) -> dict:
    """Cache size per token per layer and for a whole context: latent vs naive MLA vs textbook MHA at cfg's
    (V3) dims; under "v4", DeepSeek-V4's compressed cache of each config-only preset, with ratios against the
    latent (MLA) row at the same contexts. Every figure is priced at dtype_bytes per cached value (bf16 = 2)."""
    from models.family import preset_family
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    latent = models.family_for(cfg.model_type).cache_spec(cfg, "latent")
    rows = {f"latent ({' + '.join(latent.names)})": cfg.latent_cache_width,
            "naive MLA (K nope+rope, V per head)": cfg.expanded_cache_width,
            "textbook MHA 2*n_h*d_h": 2 * H * cfg.v_head_dim}
    table = {name: {"elements": n, "bytes": n * dtype_bytes, "bytes_all_layers": n * dtype_bytes * L,
                    "bytes_context": n * dtype_bytes * L * context,
                    "bytes_at": {str(T): n * dtype_bytes * L * T for T in contexts}} for name, n in rows.items()}
    mla = next(iter(table.values()))["bytes_at"]
    for r in table.values():
        r["vs_mla_at"] = {T: b / mla[T] for T, b in r["bytes_at"].items()}
    v4 = {}
    for name in v4_presets:
        r = v4_cache_rows(preset_family(name).preset_config(name), dtype_bytes, contexts)
        r["vs_mla_at"] = {T: b / mla[T] for T, b in r["bytes_at"].items()}
        v4[name] = r
    if v4:
        table["v4"] = v4
    table["assumes"] = {"dtype_bytes": dtype_bytes, "contexts": list(contexts), "batch": 1,
                        "note": "every cached value priced at dtype_bytes (2 = bf16, what the deployments cache "
                                "besides fp8); the reference and the packages hold the cache in fp32 (2x these)"}
    return table


def format_cache_table(table: dict, name: str, dtype: str = "bf16", context: int = 2**20) -> str:
    rows = {k: v for k, v in table.items() if k not in ("v4", "assumes")}
    latent = next(iter(rows.values()))["elements"]  # the latent row comes first
    lines = [f"cache per token per layer at {name} dims ({dtype}; context {context:,} tokens)",
             f"  {'form':<38}{'elements':>10}{'bytes':>10}{'all layers':>14}{'context':>14}  vs latent"]
    for form, r in rows.items():
        lines.append(f"  {form:<38}{r['elements']:>10,}{r['bytes']:>10,}{r['bytes_all_layers'] / 2**10:>11.1f} KiB"
                     f"{r['bytes_context'] / 2**30:>11.1f} GiB  {r['elements'] / latent:8.2f}x")
    if table.get("v4"):
        lines += ["", _format_v4_rows(table, name, dtype)]
    return "\n".join(lines)


def _format_v4_rows(table: dict, name: str, dtype: str) -> str:
    contexts = table["assumes"]["contexts"]
    rows = {k: v for k, v in table.items() if k not in ("v4", "assumes")}
    ctx = lambda T: f"{T // 2**20}M" if T >= 2**20 else f"{T // 2**10}K"  # noqa: E731
    lines = [f"DeepSeek-V4 compressed cache (spec manifest; {dtype}, batch 1) vs {name}",
             f"  {'model / layer type':<40}{'layers':>7}{'B/token':>10}{'bounded':>12}"
             + "".join(f"{'at ' + ctx(T):>12}{'vs MLA':>9}" for T in contexts)]
    for model, r in table["v4"].items():
        lines.append(f"  {model:<40}{r['num_layers']:>7}{r['bytes_per_token']:>10,.0f}"
                     f"{r['bounded_bytes'] / 2**20:>8.1f} MiB"
                     + "".join(f"{r['bytes_at'][str(T)] / 2**30:>8.2f} GiB{r['vs_mla_at'][str(T)]:>8.4f}x"
                               for T in contexts))
        for t, k in r["layer_types"].items():
            lines.append(f"    {t:<38}{k['layers']:>7}{k['bytes_per_token']:>10,.0f}{k['bounded_bytes'] / 2**10:>8.1f} KiB"
                         "   (per layer)")
    for form, r in rows.items():
        lines.append(f"  {name + ' ' + form.split(' (')[0]:<40}{'':>7}{r['bytes_all_layers']:>10,}{'0':>8} MiB"
                     + "".join(f"{r['bytes_at'][str(T)] / 2**30:>8.2f} GiB{r['vs_mla_at'][str(T)]:>8.4f}x"
                               for T in contexts))
    return "\n".join(lines)


def run_bench(model_spec: str, target: str, threads: int, cache_lengths, package: Path | None = None,
              progress=None) -> dict:
    model = models.load(model_spec)
    with tempfile.TemporaryDirectory(prefix="mlamoe-bench-") as tmp:
        if package is None:
            package = compile_package(model_spec, target, Path(tmp) / "pkg", progress=progress)
        result = bench_package(Path(package), model, threads, cache_lengths)
    result["model"], result["target"] = model_spec, target
    return result


def format_bench(r: dict) -> str:
    lines = [f"model {r['model']}  target {r['target']}  threads {r['threads']}  (medians; same threads for both)", "",
             f"prefill ({r['prompt_len']} tokens)      package {r['prefill']['package_tokens_per_s']:10.1f} tok/s   "
             f"eager {r['prefill']['eager_tokens_per_s']:10.1f} tok/s   ratio "
             f"{r['prefill']['package_tokens_per_s'] / r['prefill']['eager_tokens_per_s']:.2f}x", "",
             "decode ms/token   cache len   package     eager   eager/package"]
    for L, d in r["decode_ms"].items():
        lines.append(f"                  {int(L):>9}  {d['package']:8.2f}  {d['eager']:8.2f}   {d['eager_over_package']:6.2f}x")
    c = r["cache_bytes_per_token"]
    lines += ["", f"cache bytes/token (fp32, all layers): latent {c['latent']:,}  expanded {c['expanded']:,}  "
                  f"latent/expanded {c['latent_over_expanded']:.4f}"]
    return "\n".join(lines)
