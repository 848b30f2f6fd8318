"""`mlamoe inspect`: a human summary of a package's manifest."""
from __future__ import annotations

import targets


def describe(manifest: dict, build_log: dict | None = None) -> str:
    m, t = manifest["model"], manifest["target"]
    cfg = m["config"]
    out = [f"model     {m['source']} ({m['kind']}, {cfg['model_type']}, {m['parameters']:,} parameters)",
           f"          weights sha256 {m['weights_sha256']}",
           f"target    {t['name']}: {t['description']}; quantization {t['quantization']}",
           f"toolchain " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["toolchain"].items()))]
    if "io" in manifest:
        cache = manifest["io"]["cache"]
        if "layer_kinds" in cache:  # a per-layer spec (models/cache.py)
            out.append(f"cache     {cache['layout']}: {len(cache['layer_kinds'])} layer kinds, {cache['num_layers']} "
                       f"layers, {cache['bytes_per_token']:g} bytes per token + {cache['bounded_bytes_per_batch_row']} "
                       "bytes bounded state per sequence")
        else:
            out.append(f"cache     {cache['layout']}: {cache['values_per_token_per_layer']} values = "
                       f"{cache['bytes_per_token_per_layer']} bytes per token per layer, {cache['num_layers']} layers")
    target = targets.find(t["name"])
    if target is not None:
        out += target.describe(manifest)
    out += ["", "stages"]
    runs = {r["name"]: r for r in (build_log or {}).get("stages", [])}
    for s in manifest["stages"]:
        parity = s.get("parity") or []
        verdict = ("SKIP" if s["params"].get("skipped") else "-" if not parity
                   else "PASS" if all(p["passed"] for p in parity) else "FAIL")
        run = runs.get(s["name"])
        when = (f"{run['seconds']:>8.2f} s{'  (cached)' if run.get('cached') else ''}" if run
                else f"{'':>8}  ")  # times live in the build log beside the package, not in the package
        out.append(f"  {s['name']:<28} {verdict:<5} {when}  {len(parity)} parity report(s)")
    out.append("")
    out.append("io")
    for g, spec in manifest.get("io", {}).get("graphs", {}).items():
        out.append(f"  {g} ({spec['file']})")
        for kind in ("inputs", "outputs"):
            shown = spec[kind][:3]
            more = len(spec[kind]) - len(shown)
            for v in shown:
                out.append(f"    {kind[:-1]:<6} {v['name']:<22} {v['dtype']:<8} {v['shape']}")
            if more > 0:
                out.append(f"    ... {more} more {kind} (past./present. cache tensors per layer)")
    files = manifest["files"]
    out += ["", f"files     {len(files)} files, {sum(f['size'] for f in files):,} bytes"]
    w = manifest.get("io", {}).get("weights") or manifest.get("ascend", {}).get("weights")
    if isinstance(w, dict) and "file" in w:
        out.append(f"weights   {w['file']}: {w.get('bytes', 0):,} bytes shared by {len(w.get('graphs', []))} graphs "
                   f"(separate files would hold the {w.get('referenced_bytes', 0):,} bytes they reference)")
    ver = manifest.get("verification", {})
    for v in ver.get("verified_here", []):
        out.append(f"verified  {v}")
    for v in ver.get("not_verified", []):
        out.append(f"NOT verified  {v}")
    return "\n".join(out)
