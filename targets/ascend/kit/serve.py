#!/usr/bin/env python3
"""Reference serving loop over this package's fixed-shape graphs (numpy + a backend; nothing from mlamoe).

Run from the package root (or pass --package):

    python3 ascend/kit/serve.py --prompt-ids 1,2,3 [--max-new-tokens 16] [--backend ort|ais_bench] [--device 0] [--json]

It follows the runtime contract of the package README ("Shapes and gears"), read from manifest.json
(`ascend.shapes`, `ascend.graphs`) and ascend/atc_config.json (each graph's inputs, in order):

- every sequence of the batch holds the same prompt length (one `position` per call; a server batching prompts of
  other lengths would pad them, outside this loop); `--prompt-ids` is repeated over the batch;
- a prompt runs as chunks of at most `chunk` tokens, each at `position` = its first token's index, in the smallest
  gear G with G >= position + bucket and the smallest bucket holding the chunk (right-padded);
- decode at `position` runs the smallest gear with G >= position + 1;
- a step that needs a larger gear first copies each cache tensor into that gear's buffer (its rows beyond the old
  gear zero); `present.*` becomes the next `past.*`.

Backends: `ort` runs onnx/<graph>.onnx with ONNX Runtime on CPU (the graphs the .om files are built from);
`ais_bench` runs ascend/om/<graph>.om on the NPU through ais_bench's InferSession (outputs in graph order: logits,
then present.* in past.* order). Greedy decoding; prints the tokens (and the step logits with --json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

INDEX_DTYPE = np.int32
GROW_AXIS = 1  # the cache tensors are [B, G, ...]: rows along axis 1


class GearLoop:
    def __init__(self, root: Path, run):
        """run(graph name, {input name: array}) -> {output name: array}."""
        self.root, self.run = Path(root), run
        manifest = json.loads((self.root / "manifest.json").read_text())
        a = manifest["ascend"]
        self.shapes, self.graphs = a["shapes"], a["graphs"]
        config = json.loads((self.root / a["build"]["config"]).read_text())
        self.inputs = {g["name"]: [(i["name"], i["shape"]) for i in g["inputs"]] for g in config["graphs"]}
        self.gears = sorted(self.shapes["gears"])
        self.batch, self.chunk = self.shapes["batch"], self.shapes["chunk"]
        self.decode_of = {g["gear"]: n for n, g in self.graphs.items() if g["seq"] == 1}
        self.prefills = sorted(((g["gear"], g["seq"], n) for n, g in self.graphs.items() if g["seq"] > 1))

    def empty_cache(self, gear: int | None = None) -> dict[str, np.ndarray]:
        name = self.decode_of[gear or self.gears[0]]
        return {n: np.zeros(s, np.float32) for n, s in self.inputs[name] if n.startswith("past.")}

    @staticmethod
    def rows(cache: dict) -> int:
        return next(iter(cache.values())).shape[GROW_AXIS]

    def to_gear(self, cache: dict, gear: int) -> dict:
        rows = self.rows(cache)
        if rows == gear:
            return cache
        pad = [(0, 0)] * next(iter(cache.values())).ndim
        pad[GROW_AXIS] = (0, gear - rows)
        return {k: np.pad(v, pad) for k, v in cache.items()}

    def _step(self, name: str, ids: np.ndarray, position: int, cache: dict):
        feeds = {"input_ids": ids.astype(INDEX_DTYPE), "position": np.full((self.batch,), position, INDEX_DTYPE),
                 **cache}
        out = self.run(name, feeds)
        return out["logits"], {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}

    def prefill(self, prompt: np.ndarray, cache: dict | None = None, start: int = 0):
        """prompt [B, L] -> (logits [B, L, V], cache)."""
        cache = self.empty_cache() if cache is None else cache
        L, done, logits = prompt.shape[1], 0, []
        while done < L:
            n, pos = min(self.chunk, L - done), start + done
            fit = [(g, s, name) for g, s, name in self.prefills if g >= self.rows(cache) and s >= n and pos + s <= g]
            if not fit:
                raise SystemExit(f"prefill of {n} tokens at position {pos}: no graph holds it (gears {self.gears})")
            gear, seq, name = fit[0]
            cache = self.to_gear(cache, gear)
            ids = np.zeros((self.batch, seq), INDEX_DTYPE)
            ids[:, :n] = prompt[:, done:done + n]
            out, cache = self._step(name, ids, pos, cache)
            logits.append(out[:, :n])
            done += n
        return np.concatenate(logits, 1), cache

    def decode(self, token: np.ndarray, position: int, cache: dict):
        fit = [g for g in self.gears if g >= max(position + 1, self.rows(cache))]
        if not fit:
            raise SystemExit(f"decode at position {position}: past the largest gear {self.gears[-1]}")
        cache = self.to_gear(cache, fit[0])
        return self._step(self.decode_of[fit[0]], token.reshape(self.batch, 1), position, cache)

    def generate(self, prompt: np.ndarray, n: int):
        """Greedy: -> tokens [B, n], step logits [B, n, V]."""
        logits, cache = self.prefill(prompt)
        last, pos, tokens, steps = logits[:, -1], prompt.shape[1], [], []
        for i in range(n):
            tok = last.argmax(-1)
            tokens.append(tok)
            steps.append(last)
            if i == n - 1:
                break
            logits, cache = self.decode(tok, pos, cache)
            last, pos = logits[:, -1], pos + 1
        return np.stack(tokens, 1), np.stack(steps, 1)


def ort_backend(root: Path, graphs: dict):
    import onnxruntime as ort
    sessions = {}

    def run(name, feeds):
        if name not in sessions:
            sessions[name] = ort.InferenceSession(str(root / graphs[name]["file"]), providers=["CPUExecutionProvider"])
        s = sessions[name]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
    return run


def ais_bench_backend(root: Path, loop_inputs: dict, device: int):
    from ais_bench.infer.interface import InferSession  # CANN's ais_bench wheel
    sessions = {}

    def run(name, feeds):
        if name not in sessions:
            sessions[name] = InferSession(device, str(root / "ascend" / "om" / f"{name}.om"))
        order = [n for n, _ in loop_inputs[name]]
        outs = [np.asarray(o) for o in sessions[name].infer([feeds[n] for n in order])]
        names = ["logits"] + [n.replace("past.", "present.", 1) for n in order if n.startswith("past.")]
        return dict(zip(names, outs))
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", type=Path, default=Path(__file__).resolve().parents[2])
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--backend", choices=["ort", "ais_bench"], default="ort")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    loop = GearLoop(a.package, None)
    loop.run = (ort_backend(a.package, loop.graphs) if a.backend == "ort"
                else ais_bench_backend(a.package, loop.inputs, a.device))
    ids = np.array([int(x) for x in a.prompt_ids.split(",")], np.int64)
    prompt = np.tile(ids, (loop.batch, 1))
    tokens, steps = loop.generate(prompt, a.max_new_tokens)
    if a.json:
        print(json.dumps({"tokens": tokens[0].tolist(), "step_logits": steps[0].astype(float).tolist()}))
    else:
        print(" ".join(map(str, tokens[0].tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
