"""Golden choices: the discrete choices each golden case makes in the package graph on ORT CPU (every MoE layer's
gate logits, the lightning indexer's selection scores and ids; passes/routing_probes.py), recorded at build, and
the re-run of a case that fails on the target with those choices forced.

Why: a choice whose two candidates score within the target's rounding of each other (a near tie) may go the other
way on the GPU; the outputs downstream of it then differ by far more than any elementwise tolerance, without a fault.
The greedy run has a rule for that (golden greedy.choice_margins); a golden case gets this one, which proves more:
`mlamoe verify` calls a failing case a near tie only when

1. with the reference's choices forced (each reader of the gate logits / selection scores reads the recorded ones)
   the case is within its tolerance: given the same choices the target computes the same thing;
2. the target's own choice scores (computed with the choices forced, so from the same inputs) moved from the
   recorded ones by at most half the build's allowed flip margin (golden tolerance "choices": FLIP_MARGIN_FACTOR x
   2 x the score error the build measured, so at most FLIP_MARGIN_FACTOR x that error): a rounding difference;
Otherwise the case fails, and the message says which condition did not hold. The selections the target makes
differently are named with their reference margins; by 2. each is within the allowed flip margin (the two scores
moved at most half of it each). A router's turned choice is made inside the MoE op and not named.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.parity import Router, selection_margin, top_ids

CHOICE_PREFIXES = ("routing.", "selection.")


@contextlib.contextmanager
def probed_graph(graph_file: Path, force: bool):
    """A copy of the package graph `graph_file` with its choices exposed (force=False) or forced (True), saved beside
    it (its weights are references into the package's shared weights file) and removed on exit; -> its path, or
    None for a graph that makes no choice."""
    import onnx
    import onnx_ir as ir

    from passes.routing_probes import (MOE_OPS, expose_gate_logits, expose_selections, force_gate_logits,
                                       force_selections, selection_topks, static_routers)
    model = ir.from_proto(onnx.load(str(graph_file), load_external_data=False))
    topks = selection_topks(model)
    has_gates = any((n.domain, n.op_type) in MOE_OPS for n in model.graph) or bool(static_routers(model))
    if not topks and not has_gates:
        yield None
        return
    if has_gates:
        (force_gate_logits if force else expose_gate_logits)(model)
    if topks:
        (force_selections if force else expose_selections)(model, topks)
    fd, name = tempfile.mkstemp(suffix=".choices.onnx", dir=graph_file.parent)
    os.close(fd)
    try:
        onnx.save(ir.to_proto(model), name)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _session(path: Path, providers, session_options=None):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), session_options, providers=providers)


def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from runtime.cuda_runtime import _ORT_TYPES
    types = {i.name: _ORT_TYPES[i.type] for i in sess.get_inputs()}
    missing = sorted(set(types) - set(feeds))
    if missing:
        raise ValueError(f"no value for graph inputs {missing}")
    cast = {n: np.asarray(feeds[n]).astype(t, copy=False) for n, t in types.items()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, cast)))


def record_case_choices(pkg: Path, golden_section: dict, graphs: dict[str, str]) -> None:
    """At build: run each golden case through its graph with the choices exposed on ORT CPU (one session per graph)
    and save them as golden/{case}.choice.{output}.npy, listed in the case's "choices" (in place); graphs: {graph:
    file relative to pkg}. A case whose graph makes no choice gets none."""
    for graph in dict.fromkeys(c["graph"] for c in golden_section["cases"]):
        with probed_graph(pkg / graphs[graph], force=False) as path:
            if path is None:
                continue
            sess = _session(path, ["CPUExecutionProvider"])
            for case in (c for c in golden_section["cases"] if c["graph"] == graph):
                got = _run(sess, {n: np.load(pkg / f) for n, f in case["inputs"].items()})
                files = {}
                for n, a in got.items():
                    if n.startswith(CHOICE_PREFIXES):
                        f = pkg / "golden" / f"{case['name']}.choice.{n}.npy"
                        np.save(f, np.ascontiguousarray(a), allow_pickle=False)
                        files[n] = f.relative_to(pkg).as_posix()
                case["choices"] = files
            del sess


def explain_case(root: Path, case: dict, graph_file: Path, feeds: dict[str, np.ndarray], providers,
                 session_options, judge, limits: dict | None, scoring_func: str) -> tuple[bool, str]:
    """On the target: re-run the failing golden case `case` with its recorded choices forced and apply the module
    docstring's two conditions. judge(outputs) -> the case's failure messages against its golden outputs.
    -> (a near tie, the sentence saying what was measured)."""
    if not limits:
        return False, "the package records no choice limits (golden tolerance \"choices\"): not re-run"
    ref = {n: np.load(root / f) for n, f in case["choices"].items()}
    forced = {f"{n}.forced": a for n, a in ref.items() if not n.endswith(".ids")}
    with probed_graph(graph_file, force=True) as path:
        got = _run(_session(path, providers, session_options), {**feeds, **forced})
    still = judge(got)
    if still:
        return False, f"with the reference's choices forced it still fails ({still[0]}): not a choice that turned"
    moved = {"routing": 0.0, "selection": 0.0}
    flips, said = [], []
    for n, r in ref.items():
        if n.endswith(".ids") or n not in got:
            continue
        own = got[n].astype(np.float64)
        r = r.astype(np.float64)
        if n.startswith("routing."):  # in choice-score units (the correction bias, unknown here, cancels)
            plain = Router(k=1, scoring_func=scoring_func)
            d = np.abs(plain.choice_scores(own) - plain.choice_scores(r))
            moved["routing"] = max(moved["routing"], float(d.max()) if d.size else 0.0)
            continue
        fin = np.isfinite(own) & np.isfinite(r)
        if (np.isfinite(own) != np.isfinite(r)).any():
            return False, f"{n}: the target's scores are finite where the reference's are not (a masking fault)"
        moved["selection"] = max(moved["selection"], float(np.abs(own[fin] - r[fin]).max()) if fin.any() else 0.0)
        ids = ref.get(n.replace(".scores", ".ids"))
        if ids is None:
            continue
        k, T = ids.shape[-1], r.shape[-1]
        r2 = np.where(np.isfinite(r), r, -np.inf).reshape(-1, T)
        own2 = np.where(np.isfinite(own), own, -np.inf).reshape(-1, T)
        margin = selection_margin(r2, k)
        for i in np.flatnonzero((top_ids(own2, k) != top_ids(r2, k)).any(-1))[:8]:
            flips.append((n.split(".")[1], tuple(int(x) for x in np.unravel_index(int(i), r.shape[:-1])),
                          float(margin[i])))
    for kind, m in moved.items():
        allowed = float(limits.get(kind) or 0.0) / 2
        if m > allowed:
            return False, (f"with the choices forced the target's {kind} scores moved {m:.3g} from the reference's, "
                           f"more than {allowed:.3g} (half the build's allowed flip margin): not rounding")
        said.append(f"{kind} scores moved <= {m:.3g} (allowed {allowed:.3g})")
    what = "; ".join(f"selection {j} at index {list(where)} of its scores chose other keys (reference margin {m:.3g})"
                     for j, where, m in flips) or ("no selection differs, so a router's choice turned (made inside "
                                                   "the MoE op: not identified here)")
    return True, (f"with the reference's choices forced it is within tolerance and {', '.join(said)}: {what}: "
                  f"a near tie turned by the target's rounding")


def explain(rt, root: Path, case: dict, feeds: dict[str, np.ndarray], tol: dict, judge) -> tuple[bool, str]:
    """runtime/cuda_runtime.py verify_golden's `explain`: explain_case on the runtime's providers and session."""
    from runtime.cuda_runtime import session_options
    scoring = (rt.manifest.get("model", {}).get("config") or {}).get("scoring_func", "softmax")
    return explain_case(root, case, root / rt.graph_files[case["graph"]], feeds, rt.provider_request,
                        session_options(dict(rt.manifest["target"].get("session", {}))), judge, tol.get("choices"),
                        scoring)
