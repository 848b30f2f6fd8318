"""Where ascend W8A8's error comes from on tests/test_routing_parity.py's randomized x3 checkpoints (not a pytest test).

    python -m benchmarks.ascend_w8a8_sensitivity [--ckpt v3-s0 v2-s1] [--variants ...] [--json OUT]

For each checkpoint the fp32 static graphs of the ascend target (soc Ascend910B3, the default shapes: decode and
the prefill buckets at the smallest gear) are exported once, the attention activations calibrated as
targets/ascend/flow.py does (4 seeded prompts on the first prefill bucket), and the graphs quantized with one site
group at a time (or with a changed activation scheme), then judged as the compile's quantize stage judges them
(emulation.quant_parity: QDQ graphs vs eager, teacher-forced routing, budget quantize-w8a8: cosine >= 0.98,
KL <= 0.1, rel euclid <= 0.2). Recorded per variant: logits cosine / KL / rel euclid of prefill, decode-0..3 and
the greedy steps, and whether each passes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402


def _layer_sites(cfg):
    """Site groups: name -> (W8A8Pass exclude-complement patterns, expert layers to quantize)."""
    L = cfg.num_hidden_layers
    groups = {}
    for i in range(L):
        for p in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            groups[f"L{i}.{p}"] = ([f"model.layers.{i}.self_attn.{p}/*"], set())
        if cfg.is_moe_layer(i):
            groups[f"L{i}.shared"] = ([f"model.layers.{i}.mlp.shared_experts*"], set())
            groups[f"L{i}.experts"] = ([], {i})
        else:
            groups[f"L{i}.dense_mlp"] = ([f"model.layers.{i}.mlp.*"], set())
    return groups


def quantize(m: ir.Model, cfg, calibration: dict, only: tuple[list[str], set[int]] | None = None,
             dynamic_attention: tuple[str, ...] = (), weights_only: tuple[str, ...] = (),
             activations_only: tuple[str, ...] = ()):
    """targets/ascend/quant.quantize_static_graph with a site filter: `only` (node patterns, expert layers) quantizes
    just those; `dynamic_attention` (node patterns) quantizes those attention activations per token instead of
    statically."""
    import fnmatch
    from onnx_ir.passes import common as common_passes
    from passes.quant_w8a8 import W8A8Pass
    from passes.quant_weights import DEFAULT_EXCLUDE, find_linear_sites, QuantReport
    from targets.ascend import quant as aq
    keys = aq.static_activation_keys(m)
    node_of = {}
    for s in find_linear_sites(m.graph):
        node_of.setdefault(s.activation.name, s.node.name)
    exclude = list(DEFAULT_EXCLUDE + aq.EXPERT_EXCLUDE + aq.INDEXER_EXCLUDE)
    expert_layers = None
    if only is not None:
        pats, expert_layers = only
        names = [s.node.name for s in find_linear_sites(m.graph)]
        exclude += [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in pats)]
    cal = {a: calibration[k] for a, k in keys.items()
           if not any(fnmatch.fnmatchcase(node_of.get(a, ""), p) for p in dynamic_attention)}
    def hit(n, pats):
        return any(fnmatch.fnmatchcase(n, p) for p in pats)
    orig_act, orig_w = {}, {}
    for s in find_linear_sites(m.graph):
        if hit(s.node.name, weights_only):
            orig_act[s.node.name] = s.activation
        if hit(s.node.name, activations_only):
            oi_form = s.node.op_type == "Gemm" and s.weight_is_oi
            orig_w[s.node.name] = s.weight_oi if oi_form else np.ascontiguousarray(s.weight_oi.T)
    p = W8A8Pass(calibration=cal, exclude=tuple(exclude))
    p(m)
    from passes.quant_weights import add_initializer
    for node in list(m.graph):
        if node.name in orig_act:  # weights int8, activation fp32
            node.replace_input_with(0, orig_act[node.name])
        if node.name in orig_w:  # activation int8, weights fp32
            node.replace_input_with(1, add_initializer(m.graph, node.name.replace("/", "_") + ".fp32w", orig_w[node.name]))
    common_passes.RemoveUnusedNodesPass()(m)
    rep = p.report
    if expert_layers is None or expert_layers:
        if expert_layers is not None:  # drop the other layers' tables from the rewrite by renaming them temporarily
            hide = [k for k in list(m.graph.initializers) if aq.EXPERT_TABLE.match(k)
                    and int(aq.EXPERT_TABLE.match(k).group(2)) not in expert_layers]
            for k in hide:
                v = m.graph.initializers.pop(k)
                v.name = "hidden." + k
                m.graph.initializers[v.name] = v
        aq.quantize_experts(m, cfg, rep)
        if expert_layers is not None:
            for k in [k for k in list(m.graph.initializers) if k.startswith("hidden.")]:
                v = m.graph.initializers.pop(k)
                v.name = k[len("hidden."):]
                m.graph.initializers[v.name] = v
    common_passes.TopologicalSortPass()(m)
    aq._infer_types(m)
    return rep


def _metrics(reports) -> dict:
    out = {}
    for r in reports:
        step = r.stage.rsplit("/", 1)[-1]
        o = next(o for o in r.outputs if o.name in ("logits", "step_logits"))
        out[step] = {"cosine": round(o.cosine, 5), "kl": round(o.kl, 4), "rel_euclid": round(o.rel_euclid, 4),
                     "passed": bool(r.passed)}
    return out


def run_checkpoint(name: str, variants: list[str], work: Path, emulate: bool = False) -> dict:
    from test_routing_parity import randomized_checkpoint
    from pipeline.build import moe_routers
    from pipeline.weights_file import WeightsFile
    from targets.ascend import emulation
    from targets.ascend.flow import calibrate_on_first_prefill
    from targets.ascend.quant import quant_node_names
    from targets.ascend.static_export import fp32_island_nodes
    from targets.ascend.shapes import resolve_shapes
    from targets.ascend.static_export import export_static_graph

    model = randomized_checkpoint(name, work / f"ckpt-{name}")
    cfg = model.config
    shapes = resolve_shapes(cfg, "Ascend910B3", "mixed_float16", None, None, None, None)
    specs = shapes.base_specs()
    fp32_dir = work / f"fp32-{name}"
    graphs = {}
    with WeightsFile(fp32_dir) as w:
        for spec in specs:
            graphs[spec.name] = (spec, w.save(export_static_graph(model, spec), f"{spec.name}.onnx"))
    cal_name, calibration = calibrate_on_first_prefill(cfg, graphs, 0)
    spec, path = graphs[cal_name]
    groups = _layer_sites(cfg)
    routers = moe_routers(model)
    res = {"calibration_amax": {k: round(v, 4) for k, v in calibration.items()}, "variants": {}}
    for var in variants:
        label, dyn = var, var.endswith(",dyn")  # ",dyn": every attention activation per-token dynamic too
        var = var[:-4] if dyn else var
        if var == "all":
            kw = {}
        elif var == "none":
            kw = {"only": ([], set())}
        elif var == "attention_dynamic":
            kw = {"dynamic_attention": ("*",)}
        elif var.startswith("only:"):
            sel = var[5:].split("+")
            pats, layers = [], set()
            for g in groups:
                if any(g == s or g.startswith(s + ".") or g.endswith("." + s) or s == "*attn" and "proj" in g
                       for s in sel):
                    pats += groups[g][0]
                    layers |= groups[g][1]
            kw = {"only": (pats, layers)}
        elif var.startswith("except:"):  # every group but these quantized (these stay fp32 here, fp16 on the NPU)
            sel = var[7:].split("+")
            pats, layers = [], set()
            for g in groups:
                if not any(g == s or g.startswith(s + ".") or g.endswith("." + s) for s in sel):
                    pats += groups[g][0]
                    layers |= groups[g][1]
            kw = {"only": (pats, layers)}
        elif var.startswith("dynamic:"):  # attention sites of this group dynamic, the rest as shipped
            sel = var[8:].split("+")
            kw = {"dynamic_attention": tuple(p for g in groups for p in groups[g][0]
                                             if any(g == s or g.endswith("." + s) for s in sel))}
        elif var.startswith(("wonly:", "aonly:")):  # the group's weights (activations) alone int8, the rest as shipped
            sel = var[6:].split("+")
            pats = tuple(p for g in groups for p in groups[g][0] if any(g == s or g.endswith("." + s) for s in sel))
            kw = {"weights_only" if var.startswith("wonly") else "activations_only": pats}
        else:
            raise SystemExit(f"unknown variant {var!r}")
        if dyn:
            kw["dynamic_attention"] = ("*",)
        var = label
        t = time.perf_counter()
        qdir = work / f"q-{name}-{len(res['variants'])}"
        qgraphs, keep = {}, {}
        with WeightsFile(qdir) as w:
            for n, (s, p) in graphs.items():
                m = ir.load(p)
                quantize(m, cfg, calibration, **kw)
                qgraphs[n] = (s, w.save(m, f"{n}.onnx"))
                keep[n] = list(dict.fromkeys([x for names in fp32_island_nodes(m).values() for x in names]
                                             + quant_node_names(m)))
        reps = emulation.quant_parity(model, graphs, qgraphs, "quantize-w8a8/ascend-static", seed=0, routers=routers)
        met = _metrics(reps)
        if emulate:
            emu = emulation.emulate(emulation.static_reference(qgraphs, cfg), qgraphs, keep, seed=0, routers=routers)
            met.update({"emul-" + k: v for k, v in _metrics(emu).items()})
        res["variants"][var] = met
        worst = min(v["cosine"] for k, v in met.items() if k != "greedy" and not k.startswith("emul"))
        print(f"{name} {var:28s} worst cos {worst:.4f} " + " ".join(
            f"{k}:{v['cosine']:.4f}/{v['kl']:.3f}/{v['rel_euclid']:.3f}{'' if v['passed'] else '!'}" for k, v in met.items())
            + f"  ({time.perf_counter() - t:.0f}s)", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", nargs="+", default=["v3-s0", "v2-s1"])
    ap.add_argument("--variants", nargs="+", default=["all", "none"])
    ap.add_argument("--json")
    ap.add_argument("--emulate", action="store_true", help="also the fp16 emulation of each variant's QDQ graphs")
    a = ap.parse_args(argv)
    out = {"command": "python -m benchmarks.ascend_w8a8_sensitivity " + " ".join(sys.argv[1:]), "checkpoints": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for c in a.ckpt:
            out["checkpoints"][c] = run_checkpoint(c, a.variants, Path(tmp), a.emulate)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
