"""Expert-parallel runtime: a package's per-rank ONNX graphs on N processes, experts exchanged with
torch.distributed all-to-all (gloo on CPU, NCCL on GPUs), started with torchrun.

Self-contained (numpy, onnxruntime, torch): every expert-parallel package ships a copy as
runtime/ep_runtime.py next to launch.sh, so it runs without the compiler's repository:

    torchrun --nproc_per_node 2 runtime/ep_runtime.py --package . --prompt-ids 1,2,3 --max-new-tokens 8 --json
    python -m runtime.ep_runtime --package DIR ...   (same, from the repository; world size 1 without torchrun)

Package: see parallel/expert_parallel.py (segment graphs replicated on every rank, one expert graph
per rank and MoE layer, partition.json, ep_manifest.json).

Execution, every rank, every decoding step (prefill is step 0; the graphs take any seq length):
  * Data-parallel attention: the batch rows are split over the ranks (np.array_split order: rank r
    gets a contiguous slice; a rank with no row - fewer prompts than ranks - runs no segment graph but
    still serves its experts). Each rank keeps the cache of its own rows (past.{i}.{name} per layer,
    names and shapes from ep_manifest.json's "cache", the model family's cache spec).
  * Segment j (embedding / dense layers / attention of MoE layer m_j, router, shared experts) runs on
    the local rows -> x [n, h], topk ids/weights [n, k].
  * Dispatch. Every (token, chosen expert) pair is one row. The destination is a rank holding the
    expert; with redundant replicas (partition.json) the pairs of an expert are split between its
    replicas by token: replica (global batch row + absolute position) mod replicas, replicas in rank
    order (consecutive positions and rows alternate; deterministic, independent of the world size). Rows are packed [x | weight | local
    slot] (fp32) and ordered by destination; the per-destination counts are exchanged first
    (all_to_all_single of an int64 [world] vector), then the rows (all_to_all_single with those split
    sizes).
  * Each rank runs its expert graph for that layer on the rows it received (weight * expert(x)).
  * Combine: all_to_all_single back with the split sizes swapped; the source rank adds the returned
    rows into routed [n, h] per token in increasing expert id order (the eager model's index_add order,
    so results match it bit for bit up to the MatMul kernels), and segment j + 1 adds routed + shared
    to the residual.
  * After the last segment each rank takes the argmax of its rows' logits; at the end the tokens and
    step logits of all rows are gathered (all_gather_object) so every rank returns the whole batch.
  Rank 0 prints the result: {"tokens": [...], "step_logits": [[...], ...]} for one prompt (the format of
  `mlamoe generate --json`), {"prompts": [those per prompt]} for several ("1,2,3;4,5,6"), plus "ranks",
  "seconds" and "expert_rows" {layer: {expert: {rank: rows run}}} (how the replicas shared the work);
  --out FILE.npz keeps tokens and step_logits bit-exact.

Failure handling (no hangs):
  * Plan problems are found before any process group starts (`load_package`): partition.json for
    another model (model hash / config hash mismatch), an expert on no rank, a rank whose expert graph
    does not hold the plan's experts, a plan or package for another number of ranks than the world
    size, a missing graph file. `EPError`, exit code 2, on every rank.
  * Every collective and the process group itself run under `--timeout` seconds (default 60): gloo
    raises when a peer closes its connection (a dead process) or when the timeout passes (a hung one).
    After the group starts the ranks exchange (host, pid) once; each rank records in the rendezvous
    store (torchrun's agent store, or rank 0's TCPStore when started by hand) the step it is working
    on. When a collective fails the rank raises `EPError` naming the rank(s) that exited (pid gone,
    same host) or stopped responding (heartbeat behind its own step), and those that failed after it:
      "rank 0: all-to-all of dispatch sizes (MoE layer 1) failed at step 4: rank 1 exited (pid 812,
      last seen at step 3) (timeout 20s; RuntimeError: ... Connection closed by peer ...)"
      "rank 0: ... failed at step 3: rank 1 stopped responding (last seen at step 2; this rank is at
      step 3) (timeout 3s; RuntimeError: ... Timed out waiting 3000ms ...)"
    It prints that line to stderr, closes its own connections (so peers blocked on it fail at once)
    and leaves with exit code 1 through os._exit (a broken group's destructor can block). Started by
    hand, rank 0 (the store's host) first waits up to 5 s for the other live ranks to record their
    own failure, so their diagnosis can still read the store; if the store is gone they fall back to
    the pid table. Under torchrun, the agent also stops the other workers as soon as one exits and
    names the failed rank and its exit code.
  * Test hook: MLAMOE_EP_FAIL="RANK:STEP[:MODE]" makes RANK leave right after completing step STEP
    (0 = prefill) with os._exit(MODE) (MODE an exit code, default 3) or sleep forever (MODE "hang").

NCCL: `--backend nccl` puts the exchanged tensors on cuda:LOCAL_RANK (ORT sessions stay on the
providers given by --providers, default CPU). Not exercised by the CPU test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

try:  # inside the compiler's repository the CLI prints MlamoeError without a traceback
    from models.errors import MlamoeError as _Base
except Exception:  # the package copy runs without the repository
    _Base = Exception

SCHEMA_VERSION = 1
KEY = "mlamoe_ep"
FAIL_ENV = "MLAMOE_EP_FAIL"


class EPError(_Base):
    """An expert-parallel run that cannot start or cannot go on; the message says why and where."""


# ---- package + plan checks (before any process group) ------------------------------------------------
def load_package(package_dir, world_size: int | None = None) -> tuple[dict, dict]:
    """Read ep_manifest.json and partition.json and check the plan against the package (module doc)."""
    root = Path(package_dir)
    mpath = root / "ep_manifest.json"
    if not mpath.is_file():
        raise EPError(f"{root}: not an expert-parallel package (no ep_manifest.json)")
    man = json.loads(mpath.read_text())
    if man.get("schema_version") != SCHEMA_VERSION or man.get("kind") != "expert-parallel":
        raise EPError(f"{mpath}: unsupported manifest (schema_version {man.get('schema_version')!r})")
    ppath = root / "partition.json"
    if not ppath.is_file():
        raise EPError(f"{root}: partition.json missing")
    try:
        plan = json.loads(ppath.read_text())
    except json.JSONDecodeError as e:
        raise EPError(f"{ppath}: not valid JSON ({e})") from None
    check_plan(plan, man, world_size)
    for entry in man["segments"]:
        _need(root / entry["file"])
    for r, layers in man["experts"].items():
        for e in layers.values():
            _need(root / e["file"])
    return man, plan


def _need(path: Path) -> None:
    if not path.is_file():
        raise EPError(f"{path}: graph file missing from the package")


def check_plan(plan: dict, man: dict, world_size: int | None = None) -> None:
    if not isinstance(plan, dict) or "layers" not in plan or "ranks" not in plan:
        raise EPError("partition.json is not a partition plan (expected 'ranks' and 'layers')")
    if plan.get("model_hash") != man["model_hash"]:
        raise EPError(f"stale partition plan: partition.json was made for model {plan.get('model_hash')} but this "
                      f"package holds model {man['model_hash']}; rebuild the package with a plan for this model")
    if plan.get("config_hash") != man["config_hash"]:
        raise EPError(f"stale partition plan: partition.json was made for config {plan.get('config_hash')} but this "
                      f"package's config is {man['config_hash']}")
    R = plan["ranks"]
    if R != man["ranks"]:
        raise EPError(f"partition.json is for {R} ranks but the package's graphs are for {man['ranks']} ranks")
    if world_size is not None and world_size != R:
        raise EPError(f"this package runs on exactly {R} ranks (partition.json), but the world size is "
                      f"{world_size}: use torchrun --nproc_per_node {R} (or launch.sh)")
    E, layers = man["model"]["n_routed_experts"], man["model"]["moe_layers"]
    if [L.get("layer") for L in plan["layers"]] != layers:
        raise EPError(f"partition.json covers layers {[L.get('layer') for L in plan['layers']]}, the model's MoE "
                      f"layers are {layers}")
    for L in plan["layers"]:
        held = L.get("rank_experts")
        if not isinstance(held, list) or len(held) != R:
            raise EPError(f"partition.json, layer {L['layer']}: rank_experts must list {R} ranks")
        missing = sorted(set(range(E)) - {e for h in held for e in h})
        if missing:
            raise EPError(f"partition plan does not cover every expert: layer {L['layer']} has no rank for experts "
                          f"{missing}")
        for r, h in enumerate(held):
            graph = man["experts"].get(str(r), {}).get(str(L["layer"]))
            if graph is None or list(graph["experts"]) != list(h):
                raise EPError(f"partition.json, layer {L['layer']}, rank {r}: the plan assigns experts {h} but the "
                              f"rank's expert graph holds {graph['experts'] if graph else 'nothing'}; the plan was "
                              "changed after the package was built")


# ---- communication -----------------------------------------------------------------------------------
class LocalComm:
    """World size 1: collectives are identities (the single-device reference run)."""

    rank, world, device = 0, 1, None

    def alltoall(self, send: np.ndarray, send_counts, recv_counts, what: str) -> np.ndarray:
        return send

    def counts(self, send_counts: np.ndarray, what: str) -> np.ndarray:
        return send_counts

    def gather(self, obj, what: str) -> list:
        return [obj]

    def heartbeat(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class DistComm:
    """torch.distributed process group with a timeout and failure diagnosis through the store."""

    def __init__(self, backend: str = "gloo", timeout_s: float = 60.0):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.timeout = timedelta(seconds=timeout_s)
        self.step, self.stuck, self.pids = -1, set(), {}
        self.host = socket.gethostname()
        self.device = None
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise EPError("--backend nccl needs CUDA devices; use --backend gloo on CPU")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        try:
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world, timeout=self.timeout))
        except Exception as e:
            raise EPError(f"rank {self.rank}: could not reach the rendezvous store within {timeout_s:g}s "
                          f"({_first_line(e)})") from None
        self.store = dist.PrefixStore(KEY + "/", store)
        self.store.set(f"pid/{self.rank}", f"{self.host}:{os.getpid()}")
        self.store.set(f"hb/{self.rank}", "-1")
        try:
            dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=self.rank,
                                    world_size=self.world, timeout=self.timeout)
        except Exception as e:
            raise self._failure("process group start-up", e) from None
        self.group_up = True
        self.pids = {}
        table = self._run("exchange of process ids", lambda: self._gather_pids())
        self.pids = {q: (h, int(p)) for q, (h, p) in enumerate(table)}
        # started by hand, rank 0 hosts the store: on failure it waits (briefly) for the others' diagnoses
        self.hosts_store = self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"

    def _gather_pids(self):
        out = [None] * self.world
        self.dist.all_gather_object(out, (self.host, os.getpid()))
        return out

    def abort(self) -> None:
        """Close this rank's connections now (peers blocked on it fail at once); never blocks long."""
        import threading
        if not self.group_up:
            return
        self.group_up = False
        t = threading.Thread(target=self.dist.destroy_process_group, daemon=True)
        t.start()
        t.join(2.0)

    def linger(self, limit_s: float = 5.0) -> None:
        """After a failure, keep the store up until every other rank has failed, finished or exited."""
        if not self.hosts_store:
            return
        deadline = time.monotonic() + min(limit_s, self.timeout.total_seconds())
        while time.monotonic() < deadline:
            pending = []
            for q in range(1, self.world):
                if q in self.stuck:
                    continue
                try:
                    if self.store.check([f"failed/{q}"]):
                        continue
                    pid_s = self.store.get(f"pid/{q}").decode()
                except Exception:
                    return
                host, _, pid = pid_s.rpartition(":")
                if host != self.host or _pid_alive(int(pid)):
                    pending.append(q)
            if not pending:
                return
            time.sleep(0.1)

    # heartbeat: the step each rank is working on (-1: started, none begun)
    def heartbeat(self, step: int) -> None:
        self.step = step
        try:
            self.store.set(f"hb/{self.rank}", str(step))
        except Exception:
            pass

    def _peers(self) -> list[str]:
        """What the store (or, when it is gone, the pid table) says about the other ranks."""
        try:
            self.store.set_timeout(timedelta(seconds=2))
        except Exception:
            pass
        notes, suspects = [], []
        store_ok = True
        for q in range(self.world):
            if q == self.rank:
                continue
            hb = failed = None
            if store_ok:
                try:
                    hb = int(self.store.get(f"hb/{q}")) if self.store.check([f"hb/{q}"]) else None
                    failed = self.store.get(f"failed/{q}").decode() if self.store.check([f"failed/{q}"]) else None
                except Exception:
                    store_ok = False
            host, pid = self.pids.get(q, (None, None))
            seen = ("" if not store_ok else "never joined" if hb is None else
                    "before step 0" if hb < 0 else f"last seen at step {hb}")
            gone = host == self.host and pid is not None and not _pid_alive(pid)
            if failed:
                notes.append(f"rank {q} failed too ({failed})")
            elif gone:
                suspects.append(f"rank {q} exited (pid {pid}" + (f", {seen})" if seen else ")"))
            elif store_ok and (hb is None or hb < self.step):
                suspects.append(f"rank {q} stopped responding ({seen}; this rank is at step {self.step})")
                self.stuck.add(q)
        if not store_ok:
            notes.append("the rendezvous store is gone too (its host, rank 0 or the launcher, has exited)")
        return suspects + notes

    def _failure(self, what: str, e: BaseException) -> EPError:
        msg = f"rank {self.rank}: {what} failed"
        if self.step >= 0:
            msg += f" at step {self.step}"
        peers = self._peers()
        msg += ": " + ("; ".join(peers) if peers else "a peer closed its connection or did not answer, no rank "
                       "identified")
        msg += f" (timeout {self.timeout.total_seconds():g}s; {type(e).__name__}: {_first_line(e)})"
        try:
            self.store.set(f"failed/{self.rank}", f"{what} at step {self.step}")
        except Exception:
            pass
        return EPError(msg)

    def _run(self, what, fn):
        try:
            return fn()
        except EPError:
            raise
        except Exception as e:
            raise self._failure(what, e) from None

    def _t(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device) if self.device is not None else t

    def counts(self, send_counts: np.ndarray, what: str) -> np.ndarray:
        out = self.torch.empty(self.world, dtype=self.torch.int64, device=self.device)
        self._run(what, lambda: self.dist.all_to_all_single(out, self._t(send_counts.astype(np.int64))))
        return out.cpu().numpy()

    def alltoall(self, send: np.ndarray, send_counts, recv_counts, what: str) -> np.ndarray:
        out = self.torch.empty((int(np.sum(recv_counts)), *send.shape[1:]), dtype=self.torch.float32,
                               device=self.device)
        self._run(what, lambda: self.dist.all_to_all_single(
            out, self._t(send.astype(np.float32)), output_split_sizes=[int(c) for c in recv_counts],
            input_split_sizes=[int(c) for c in send_counts]))
        return out.cpu().numpy()

    def gather(self, obj, what: str) -> list:
        out = [None] * self.world
        self._run(what, lambda: self.dist.all_gather_object(out, obj))
        return out

    def close(self) -> None:
        if self.group_up:
            self.dist.destroy_process_group()
            self.group_up = False


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its launcher) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# ---- the runtime ------------------------------------------------------------------------------------
class ExpertParallelRuntime:
    """One rank of an expert-parallel run (module docstring). comm: LocalComm() or DistComm(...)."""

    def __init__(self, package_dir, comm=None, providers=None, threads: int = 1, manifest=None, plan=None):
        import onnxruntime as ort
        self.root = Path(package_dir)
        self.comm = comm or LocalComm()
        if manifest is None or plan is None:
            manifest, plan = load_package(self.root, self.comm.world)
        self.man, self.plan = manifest, plan
        self.rank, self.world = self.comm.rank, self.comm.world
        m = manifest["model"]
        self.hidden, self.vocab, self.k = m["hidden_size"], m["vocab_size"], m["num_experts_per_tok"]
        self.E = m["n_routed_experts"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        self.segments = [(e, ort.InferenceSession(str(self.root / e["file"]), so, providers=providers))
                         for e in manifest["segments"]]
        self.experts = {int(L): ort.InferenceSession(str(self.root / spec["file"]), so, providers=providers)
                        for L, spec in manifest["experts"][str(self.rank)].items()}
        # owners[layer]: [E, max replicas] rank table (-1 padded), n_rep [E], slot [world, E] local index
        self.routes = {}
        for L in plan["layers"]:
            owners = [[] for _ in range(self.E)]
            slot = np.full((self.world, self.E), -1, dtype=np.int64)
            for r, held in enumerate(L["rank_experts"]):
                for j, e in enumerate(held):
                    owners[e].append(r)
                    slot[r, e] = j
            width = max(len(o) for o in owners)
            table = np.array([o + [-1] * (width - len(o)) for o in owners], dtype=np.int64)
            self.routes[L["layer"]] = (table, np.array([len(o) for o in owners], dtype=np.int64), slot)
        self.fail = _fail_hook(self.rank)
        self.served: dict[int, np.ndarray] = {}  # rows each local expert ran, per MoE layer
        self.expert_rows: dict[int, dict[int, dict[int, int]]] = {}  # after generate: layer -> expert -> rank -> rows

    # one MoE layer: dispatch -> local experts -> combine
    def moe(self, layer: int, x: np.ndarray, w: np.ndarray, ids: np.ndarray, key: np.ndarray) -> np.ndarray:
        """x [n, h], w / ids [n, k] of the local tokens; key [n] int64 splits tokens between replicas."""
        table, n_rep, slot_of = self.routes[layer]
        n, k, h = x.shape[0], ids.shape[1], self.hidden
        tok = np.repeat(np.arange(n, dtype=np.int64), k)
        e = ids.reshape(-1).astype(np.int64)
        wv = w.reshape(-1).astype(np.float32)
        dest = table[e, key[tok] % n_rep[e]]
        slot = slot_of[dest, e]
        order = np.argsort(dest, kind="stable")
        send_counts = np.bincount(dest, minlength=self.world).astype(np.int64)
        send = np.concatenate([x[tok[order]], wv[order, None], slot[order, None].astype(np.float32)], axis=1)
        where = f"MoE layer {layer}"
        recv_counts = self.comm.counts(send_counts, f"all-to-all of dispatch sizes ({where})")
        recv = self.comm.alltoall(send, send_counts, recv_counts, f"all-to-all dispatch ({where})")
        served = self.served.setdefault(layer, np.zeros(len(self.man["experts"][str(self.rank)][str(layer)]["experts"]),
                                                          np.int64))
        served += np.bincount(recv[:, h + 1].astype(np.int64), minlength=served.shape[0])
        if recv.shape[0]:
            y = self.experts[layer].run(None, {"x": np.ascontiguousarray(recv[:, :h]),
                                               "slot": recv[:, h + 1].astype(np.int64),
                                               "weight": np.ascontiguousarray(recv[:, h])})[0]
        else:
            y = np.zeros((0, h), np.float32)
        back = self.comm.alltoall(y, recv_counts, send_counts, f"all-to-all combine ({where})")
        rows = np.empty_like(back)
        rows[order] = back  # rows in (token, k) pair order again
        by_expert = np.lexsort((e, tok))  # per token, increasing expert id (the eager index_add order)
        routed = np.zeros((n, h), np.float32)
        np.add.at(routed, tok[by_expert], rows[by_expert])
        return routed

    def step(self, ids: np.ndarray, cache: dict, row0: int, past: int) -> tuple[np.ndarray, dict]:
        """Local rows ids [b, S] (b may be 0; global rows row0..row0+b-1) after `past` cached tokens ->
        logits [b, S, V], updated cache."""
        b, S = ids.shape
        # replica key of each local token: global row + absolute position (independent of the world size)
        key = ((row0 + np.arange(b))[:, None] + past + np.arange(S)[None, :]).reshape(-1).astype(np.int64)
        present = {}
        carry = None
        for entry, sess in self.segments:
            layer = entry["moe_layer"]
            if b:
                feeds = {"input_ids": ids} if entry["first"] else dict(zip(("h", "shared", "routed"), carry))
                for i in entry["layers"]:
                    for c in self.cache_names:
                        feeds[f"past.{i}.{c}"] = cache[f"past.{i}.{c}"]
                outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
                present.update({n.replace("present.", "past.", 1): v for n, v in outs.items()
                                if n.startswith("present.")})
            if layer is None:
                return (outs["logits"] if b else np.zeros((0, S, self.vocab), np.float32)), present
            if b:
                x, w, idx = outs["x"], outs["topk_weights"], outs["topk_ids"]
            else:
                x, w, idx = (np.zeros((0, self.hidden), np.float32), np.zeros((0, self.k), np.float32),
                             np.zeros((0, self.k), np.int64))
            routed = self.moe(layer, x, w, idx, key)
            if b:
                carry = (outs["h_out"], outs["shared_out"], routed.reshape(b, S, self.hidden))
        raise EPError("package has no final segment")

    @property
    def cache_names(self) -> list[str]:
        return [t["name"] for t in self.man["cache"]["per_layer"]]

    def empty_cache(self, b: int) -> dict:
        """Zero-length past.* arrays: each cache tensor's shape with batch b and 0 rows on its growing axis."""
        c = self.man["cache"]
        out = {}
        for i in range(c["num_layers"]):
            for t in c["per_layer"]:
                shape = [b if d == "batch" else 0 if d == "past" else d for d in t["shape"]]
                out[f"past.{i}.{t['name']}"] = np.zeros(shape, np.dtype(c["dtype"]))
        return out

    def generate(self, prompt_ids, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """prompt_ids [B, S] (all ranks pass the same) -> tokens [B, N], step_logits [B, N, V] (whole batch)."""
        ids_all = np.asarray(prompt_ids, dtype=np.int64)
        if ids_all.ndim == 1:
            ids_all = ids_all[None]
        B, S0 = ids_all.shape
        if ((ids_all < 0) | (ids_all >= self.vocab)).any():
            raise EPError(f"token ids outside the vocabulary [0, {self.vocab})")
        rows = np.array_split(np.arange(B), self.world)[self.rank]
        row0 = int(rows[0]) if len(rows) else 0
        ids = ids_all[rows]
        cache = self.empty_cache(len(rows))
        tokens, logits_steps = [], []
        past = 0
        for step in range(max_new_tokens):
            self.comm.heartbeat(step)
            S = ids.shape[1] if len(rows) else (S0 if step == 0 else 1)
            if not len(rows):
                ids = np.zeros((0, S), np.int64)
            logits, cache = self.step(ids, cache, row0, past)
            last = logits[:, -1].astype(np.float32)
            ids = last.argmax(-1)[:, None].astype(np.int64)
            tokens.append(ids)
            logits_steps.append(last)
            past += S
            if self.fail is not None and step == self.fail[0]:
                _fail_now(self.fail[1])
        if tokens:
            mine = (np.concatenate(tokens, 1), np.stack(logits_steps, 1))
        else:
            mine = (np.zeros((len(rows), 0), np.int64), np.zeros((len(rows), 0, self.vocab), np.float32))
        parts = self.comm.gather((*mine, self.served), "gathering the results")
        self.expert_rows = {}
        for r, part in enumerate(parts):
            for layer, counts in part[2].items():
                held = self.man["experts"][str(r)][str(layer)]["experts"]
                for e, c in zip(held, counts):
                    self.expert_rows.setdefault(layer, {}).setdefault(e, {})[r] = int(c)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _fail_hook(rank: int):
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if int(parts[0]) != rank:
        return None
    return int(parts[1]), (parts[2] if len(parts) > 2 else "3")


def _fail_now(mode: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == "hang":
        while True:
            time.sleep(3600)
    os._exit(int(mode))


# ---- CLI --------------------------------------------------------------------------------------------
def parse_prompts(text: str) -> np.ndarray:
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise EPError(f"--prompt-ids {text!r}: expected comma-separated integers (';' between prompts)") from None
    if not rows or any(not r for r in rows) or len({len(r) for r in rows}) != 1:
        raise EPError("--prompt-ids: give one or more prompts of the same, non-zero length (1,2,3;4,5,6)")
    return np.array(rows, dtype=np.int64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--prompt-ids", required=True, help="comma-separated ids; ';' between prompts of equal length")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: the package's (gloo)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for start-up and every collective")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per rank")
    p.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated ORT providers")
    p.add_argument("--json", action="store_true", help='print {"tokens", "step_logits", "ranks"} (rank 0)')
    p.add_argument("--out", default=None, help="rank 0 writes tokens and step_logits to this .npz")
    args = p.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if distributed else 1
    rank = int(os.environ.get("RANK", "0"))
    try:
        prompts = parse_prompts(args.prompt_ids)
        manifest, plan = load_package(args.package, world)  # before any process group starts
    except EPError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        import torch
        torch.set_num_threads(args.threads)
        comm = DistComm(args.backend or manifest.get("backend", "gloo"), args.timeout) if distributed else LocalComm()
        rt = ExpertParallelRuntime(args.package, comm, providers=args.providers.split(","), threads=args.threads,
                                   manifest=manifest, plan=plan)
        t = time.perf_counter()
        tokens, logits = rt.generate(prompts, args.max_new_tokens)
        seconds = time.perf_counter() - t
    except EPError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if isinstance(locals().get("comm"), DistComm):
            comm.abort()
            comm.linger()
        os._exit(1)  # a broken process group can block in its destructor
    if rank == 0:
        if args.out:
            np.savez(args.out, tokens=tokens, step_logits=logits)
        if args.json:
            one = lambda b: {"tokens": tokens[b].tolist(),  # noqa: E731
                             "step_logits": [[float(v) for v in row] for row in logits[b]]}
            res = one(0) if len(prompts) == 1 else {"prompts": [one(b) for b in range(len(prompts))]}
            rows = {str(L): {str(e): {str(r): n for r, n in sorted(by.items())} for e, by in sorted(d.items())}
                    for L, d in sorted(rt.expert_rows.items())}
            print(json.dumps({**res, "ranks": world, "seconds": round(seconds, 3), "expert_rows": rows}), flush=True)
        else:
            for row in tokens:
                print(" ".join(map(str, row.tolist())), flush=True)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
