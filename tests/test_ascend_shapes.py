"""Ascend serving shapes (targets/ascend/shapes.py, issue 16 item 4): --batch / --max-cache / --cache-gears /
--prefill-buckets parse and refuse bad values naming the option; the default max cache and its HBM cap against a
numpy/arithmetic reference from the config; a tiny package with cache-length gears (one weights file for every
graph, the manifest's and README's gear and memory tables, `mlamoe verify`); chunked prefill beyond the largest
bucket and decode across gears vs the eager model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import models
from pipeline.cli import main
from pipeline.compile import compile_package
from pipeline.static_export import StaticRunner, ort_sessions
from targets.ascend.shapes import HBM_USABLE, AscendShapeError, resolve_shapes

QUIET = {"progress": lambda *_: None}
B, GEARS, BUCKETS = 2, (32, 64), (8, 16)


def _latent_bytes_per_token(cfg) -> int:
    """fp32 past + present of the MLA latent cache: c_kv (kv_lora_rank) and k_pe (qk_rope_head_dim) per layer."""
    return 2 * 4 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


# ------------------------------------------------------------------------------------ shapes, no build
def test_defaults_from_max_position_embeddings():
    tiny = models.load_config("tiny")
    s = resolve_shapes(tiny, "Ascend910B3", "mixed_float16")
    assert (s.batch, s.max_cache, s.gears, s.buckets) == (1, tiny.max_position_embeddings, (1024,), (16, 64, 256))
    small = models.load_config("small")
    s = resolve_shapes(small, "Ascend910B3", "mixed_float16", batch=8, max_cache=131072)
    assert s.gears == (4096, 32768, 131072)
    assert [x.name for x in s.gear_specs(32768)] == ["decode_g32768", "prefill_s256_g32768"]
    assert [x.name for x in s.base_specs()] == ["decode", "prefill_s16", "prefill_s64", "prefill_s256"]
    s = resolve_shapes(small, "Ascend910B3", "mixed_float16", batch=8)
    assert s.max_cache == small.max_position_embeddings and s.gears[-1] == 163840
    # the per-gear estimate: weights (params x 2 bytes fp16) per graph + past and present latent cache
    m = s.memory()[-1]
    expected = 2 * small.param_count() * 2 + _latent_bytes_per_token(small) * 8 * 163840
    assert m.resident_bytes == expected


def test_hbm_caps_the_default_max_cache():
    small = models.load_config("small")
    batch = 512
    s = resolve_shapes(small, "Ascend910B3", "mixed_float16", batch=batch)
    usable = HBM_USABLE * 64e9
    per_token = _latent_bytes_per_token(small) * batch
    cap = int((usable - 2 * 2 * small.param_count()) // per_token)
    cap -= cap % 256
    assert s.max_cache == cap < small.max_position_embeddings
    assert "capped by the HBM estimate" in s.why
    assert all(m.resident_bytes <= usable for m in s.memory())
    # no sourced HBM figure: no cap, said so
    s = resolve_shapes(small, "Ascend910B4", "mixed_float16", batch=batch)
    assert s.max_cache == small.max_position_embeddings and s.hbm_bytes is None


@pytest.mark.parametrize("kw, match", [
    ({"batch": 0}, r"--batch 0: must be an integer >= 1"),
    ({"max_cache": 2048}, r"--max-cache 2048: over the model's max_position_embeddings 1024.*--max-cache 1024"),
    ({"max_cache": 100}, r"--max-cache 100: below the largest prefill bucket 256.*--max-cache 256 or more"),
    ({"max_cache": 1024, "gears": "256,512"}, r"--cache-gears 256,512: the largest gear must equal --max-cache 1024"),
    ({"max_cache": 512, "gears": "128,512"}, r"--cache-gears 128,512: the smallest gear 128 is below the largest "
                                             r"prefill bucket 256"),
    ({"gears": "512,2048"}, r"--cache-gears 512,2048: over the model's max_position_embeddings 1024.*gears of at "
                            r"most 1024"),
    ({"gears": "64,x"}, r"--cache-gears '64,x': expected comma-separated integers"),
    ({"buckets": "8,8"}, r"--prefill-buckets '8,8': duplicate values"),
])
def test_bad_values_name_the_option(kw, match):
    with pytest.raises(AscendShapeError, match=match):
        resolve_shapes(models.load_config("tiny"), "Ascend910B3", "mixed_float16", **kw)


def test_over_hbm_names_the_option_and_the_fix():
    with pytest.raises(AscendShapeError, match=r"--max-cache 163840 at --batch 64: gear 163840 needs .* GB on the NPU .*"
                                               r"over the usable 57.60 GB .*lower --max-cache or --batch"):
        resolve_shapes(models.load_config("small"), "Ascend910B3", "mixed_float16", batch=64, max_cache=163840)


def test_no_room_for_one_bucket_names_the_batch():
    with pytest.raises(AscendShapeError, match=r"--batch 100000: the HBM estimate leaves room for \d+ cache tokens .*"
                                               r"less than one prefill bucket \(256\): lower --batch"):
        resolve_shapes(models.load_config("small"), "Ascend910B3", "mixed_float16", batch=100000)


@pytest.mark.parametrize("args, match", [
    (["--batch", "0"], "--batch 0: must be an integer >= 1"),
    (["--max-cache", "4096"], "--max-cache 4096: over the model's max_position_embeddings 1024"),
    (["--cache-gears", "abc"], "--cache-gears 'abc': expected comma-separated integers"),
])
def test_cli_refuses_bad_values(tmp_path, args, match):
    res = CliRunner().invoke(main, ["compile", "--model", "tiny", "--target", "ascend", "--out",
                                    str(tmp_path / "p"), "--no-cache", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p").exists()


def test_cli_options_belong_to_ascend(tmp_path):
    res = CliRunner().invoke(main, ["compile", "--model", "tiny", "--target", "ort-cpu", "--batch", "8",
                                    "--out", str(tmp_path / "p")])
    assert res.exit_code != 0 and "--batch applies to --target ascend only" in res.output


def test_help_lists_the_options():
    out = CliRunner().invoke(main, ["compile", "--help"]).output
    for flag in ("--batch", "--max-cache", "--cache-gears", "--prefill-buckets"):
        assert flag in out


# ------------------------------------------------------------------------------------ a tiny package with gears
@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    out = tmp_path_factory.mktemp("ascend_gears") / "tiny-ascend"
    compile_package("tiny", "ascend", out, use_cache=False, batch=B, max_cache=GEARS[-1],
                    cache_gears=",".join(map(str, GEARS)), prefill_buckets=",".join(map(str, BUCKETS)), **QUIET)
    return out, json.loads((out / "manifest.json").read_text())


def test_gears_share_one_weights_file(pkg):
    out, man = pkg
    graphs = man["ascend"]["graphs"]
    assert set(graphs) == {"decode", "prefill_s8", "prefill_s16", "decode_g64", "prefill_s16_g64"}
    assert {g["gear"] for g in graphs.values()} == set(GEARS)
    onnx_files = sorted(p.name for p in (out / "onnx").iterdir())
    assert onnx_files == sorted([f"{n}.onnx" for n in graphs] + ["weights.data"])
    biggest = 0
    for n in graphs:
        m = onnx.load(str(out / "onnx" / f"{n}.onnx"), load_external_data=False)
        ext = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and {dict((e.key, e.value) for e in i.external_data)["location"] for i in ext} == {"weights.data"}
        biggest = max(biggest, sum(int(dict((e.key, e.value) for e in i.external_data)["length"]) for i in ext))
    # one copy of the shared weights (+ the gear-sized tables), not one per graph
    assert (out / "onnx" / "weights.data").stat().st_size < 1.5 * biggest


def test_manifest_and_readme_list_gears_and_hbm(pkg, tiny):
    out, man = pkg
    sh = man["ascend"]["shapes"]
    assert sh["gears"] == list(GEARS) and sh["batch"] == B and sh["chunk"] == BUCKETS[-1] and sh["verified_gear"] == 32
    per_gear = {m["gear"]: m for m in sh["hbm"]["per_gear"]}
    cfg = tiny.config
    for g in GEARS:
        cache = cfg.num_hidden_layers * B * g * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        assert per_gear[g]["cache_bytes_past"] == cache
        assert per_gear[g]["resident_bytes"] == len(per_gear[g]["graphs"]) * cfg.param_count() * 2 + 2 * cache
    assert sh["hbm"]["bytes"] == 64 * 10**9 and "Atlas 800I A2" in sh["hbm"]["source"]
    assert man["ascend"]["graphs"]["decode"]["verified_here"] and not man["ascend"]["graphs"]["decode_g64"]["verified_here"]
    readme = (out / "README.md").read_text()
    assert "smallest gear with `G >= position + 1`" in readme
    for g in GEARS:
        assert f"| {g:,} | " in readme
    assert "resident" in readme and "decode_g64" in readme
    not_verified = " ".join(man["verification"]["not_verified"])
    assert "decode_g64" in not_verified and "not run here" in not_verified
    cases = json.loads((out / "golden/ascend/cases.json").read_text())["cases"]
    assert {c["graph"] for c in cases} == {"decode", "prefill_s8", "prefill_s16"}  # the smallest gear only
    stages = [s["stage"] for s in json.loads((out / "reports/parity.json").read_text())["stages"]]
    assert "export/ascend-static/chunked-prefill" in stages


def test_verify_reruns_the_golden_data(pkg):
    out, _ = pkg
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("ok   golden") == 3


@torch.no_grad()
def test_chunked_prefill_and_decode_across_gears_match_eager(pkg, tiny):
    out, man = pkg
    specs = {}
    from pipeline.static_export import StaticGraphSpec
    for n, g in man["ascend"]["graphs"].items():
        specs[n] = StaticGraphSpec(n, g["batch"], g["seq"], g["max_cache"], g["moe_form"])
    runner = StaticRunner(ort_sessions({n: out / g["file"] for n, g in man["ascend"]["graphs"].items()}), specs,
                          tiny.config)
    L = 45  # chunks 16 + 16 + 13 (padded to 16); the third at position 32 runs in gear 64
    prompt = torch.randint(0, tiny.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(3))
    ref, cache = tiny.step(prompt, tiny.empty_cache(B))
    logits, c = runner.prefill(prompt.numpy())
    assert logits.shape == ref.shape and np.abs(logits - ref.numpy()).max() < 1e-4
    assert c["past.2.c_kv"].shape[1] == 64
    for i in range(tiny.config.num_hidden_layers):
        assert np.abs(c[f"past.{i}.c_kv"][:, :L] - cache[i][0].numpy()).max() < 1e-4
    tok = ref[:, -1].argmax(-1, keepdim=True)
    for pos in range(L, L + 3):
        ref, cache = tiny.step(tok, cache)
        got, c = runner.decode(tok.numpy(), pos, c)
        assert np.abs(got - ref.numpy()).max() < 1e-4
        tok = ref[:, -1].argmax(-1, keepdim=True)
    # a cache in gear 32 moves up to gear 64 for decode past row 31
    short = prompt[:, :30]
    ref, cache = tiny.step(short, tiny.empty_cache(B))
    _, c = runner.prefill(short.numpy())
    assert c["past.0.c_kv"].shape[1] == 32
    tok = ref[:, -1].argmax(-1, keepdim=True)
    for pos in range(30, 34):
        ref, cache = tiny.step(tok, cache)
        got, c = runner.decode(tok.numpy(), pos, c)
        assert np.abs(got - ref.numpy()).max() < 1e-4
        tok = ref[:, -1].argmax(-1, keepdim=True)
    assert c["past.0.c_kv"].shape[1] == 64


def test_prefill_past_the_largest_gear_is_refused(pkg, tiny):
    out, man = pkg
    from pipeline.static_export import StaticExportError, StaticGraphSpec
    specs = {n: StaticGraphSpec(n, g["batch"], g["seq"], g["max_cache"], g["moe_form"])
             for n, g in man["ascend"]["graphs"].items()}
    runner = StaticRunner(ort_sessions({n: out / g["file"] for n, g in man["ascend"]["graphs"].items()}), specs,
                          tiny.config)
    with pytest.raises(StaticExportError, match="no prefill graph holds it"):
        runner.prefill(np.zeros((B, 70), np.int64))


@torch.no_grad()
def test_shipped_serve_loop_matches_eager_across_gears(pkg, tiny):
    """ascend/kit/serve.py as shipped (a subprocess, --backend ort): a 45-token prompt in chunks (the last in gear
    64) and greedy decoding, against eager greedy generation."""
    import subprocess
    import sys
    from models.generation import greedy_generate
    out, man = pkg
    assert man["ascend"]["kit"]["serve"] == "ascend/kit/serve.py"
    ids = torch.randint(0, tiny.config.vocab_size, (45,), generator=torch.Generator().manual_seed(5))
    res = subprocess.run([sys.executable, str(out / "ascend/kit/serve.py"), "--prompt-ids", ",".join(map(str, ids.tolist())),
                          "--max-new-tokens", "6", "--json"], capture_output=True, text=True, cwd=out)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    ref_tokens, ref_steps = greedy_generate(tiny, ids.repeat(B, 1), 6)
    assert got["tokens"] == ref_tokens[0].tolist()
    assert np.abs(np.array(got["step_logits"]) - ref_steps[0].numpy()).max() < 1e-4
